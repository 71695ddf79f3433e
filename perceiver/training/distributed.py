"""One run on several processes: torch.distributed as torchrun sets it up, or nothing.

`torchrun --nproc_per_node=N train.py ...` starts N processes with RANK / WORLD_SIZE / LOCAL_RANK in
their environment; a plain `python train.py` has none of them and stays a single process with no
process group. Backend: NCCL on CUDA, Gloo on CPU. Rank 0 alone writes files and the W&B run; the
metrics every rank logs are the all-reduced, global ones.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run: rank 0 of 1 when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current() -> Context:
    """This process's place in the process group (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return Context()


def join(device: torch.device) -> Context:
    """Join the process group torchrun describes (once per process); a no-op without torchrun."""
    if not launched_by_torchrun():
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return current()


def rank_device(device: torch.device, context: Context) -> torch.device:
    """One GPU per rank (LOCAL_RANK); CPU ranks share the CPU."""
    if context.enabled and device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    return device


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op in one process); the tensor lives on the rank's device."""
    if enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: torch.Tensor | bool, device: torch.device | None = None) -> bool:
    """True when the flag is set on any rank: the ranks take the same branch, so none waits forever in
    a collective the others skipped (a non-finite loss, a stop request). One host sync."""
    if not enabled():
        return bool(flag)
    value = flag.detach().float().reshape(1) if torch.is_tensor(flag) else torch.tensor([float(flag)], device=device)
    return all_reduce_sum(value).item() > 0


def any_rank_on_device(flag: torch.Tensor) -> torch.Tensor:
    """`any_rank` without the host read: a boolean device tensor, from an all-reduce queued on the device
    like any kernel (the flag itself where there is one process)."""
    if not enabled():
        return flag
    return all_reduce_sum(flag.detach().to(torch.float32).reshape(1))[0] > 0


def broadcast_object(value: object, source: int = 0) -> object:
    """Rank `source`'s value on every rank (e.g. the run directory)."""
    if not enabled():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def barrier() -> None:
    if enabled():
        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel in a process group, the model itself otherwise. Buffers (a fixed
    permutation, Fourier features) never change, so they are not re-broadcast every forward."""
    if not enabled():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device] if device.type == "cuda" else None
    no_buffer_sync = {"forward_sync_buffers": False}  # torch >= 2.14; `broadcast_buffers` before
    if "forward_sync_buffers" not in inspect.signature(DistributedDataParallel).parameters:
        no_buffer_sync = {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)
