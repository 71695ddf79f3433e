"""Non-finite losses checked on the device, so that a training step never waits for the host.

Reading a device tensor on the host (`.item()`, `bool(tensor)`) waits for every kernel queued before it: on
a GPU a per-step check of the loss drains the queue once per step. The training step does this instead:

- each step's loss is tested on the device (under torchrun the ranks agree on it with an all-reduce, which
  is queued like any kernel, not read);
- the update is masked rather than skipped: fused torch optimizers take the flag as their `found_inf`
  (the mechanism GradScaler uses), GradScaler itself sees poisoned gradients, and any other optimizer has
  its parameters and state tensors put back with `torch.where`;
- with `nonfinite_loss=error` the first bad step also halts every later update until the flags are read, so
  the weights stay those before it: the last good state that the error saves;
- the flags are read (one host sync) after every step, or with `trainer.sync_free` (on CUDA by default) only
  every `log_every_n_steps`, before a checkpoint and at the epoch's end.

What a masked step does not put back: counters an optimizer keeps on the host (timm's LAMB counts steps in
its param group) or on another device than the parameters (torch's non-fused Adam keeps them on the CPU
for CUDA parameters); with `nonfinite_loss=skip` such a counter runs ahead by the steps skipped, and fp16's
loss scale is lowered as for any step with non-finite gradients. The state a masked error saves has the random
generators of the read, not of the bad step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perceiver.training import distributed


@dataclass(frozen=True)
class NonFiniteReport:
    """What a read of the flags found: `count` bad steps since the last read, the first at `batch`."""

    count: int
    batch: int
    value: float  # the first bad step's loss
    steps_since: int  # steps from the first bad one up to the read, itself included


class DeferredChecks:
    """The device-side record of non-finite losses between two reads (see the module docstring)."""

    def __init__(self, device: torch.device, halt_after_bad: bool) -> None:
        self.halt_after_bad = halt_after_bad
        # bad steps since the read, the 1-based position of the first of them, its loss
        self.flags = torch.zeros(3, device=device, dtype=torch.float64)
        self.halted = torch.zeros((), device=device, dtype=torch.bool)
        self.batches: list[int] = []  # the batch numbers of the steps since the read (host-side)

    def observe(self, loss: torch.Tensor, batch: int) -> torch.Tensor:
        """Record this step's loss; the device flag that says whether its update may touch the weights."""
        loss = loss.detach()
        bad = distributed.any_rank_on_device(~torch.isfinite(loss))
        self.batches.append(batch)
        count, first_position, first_value = self.flags.unbind()
        is_first = bad & (count == 0)
        self.flags = torch.stack(
            [
                count + bad.double(),
                torch.where(is_first, float(len(self.batches)), first_position),
                torch.where(is_first, loss.double(), first_value),
            ]
        )
        ok = ~bad & ~self.halted
        if self.halt_after_bad:
            self.halted = self.halted | bad
        return ok

    def read(self) -> NonFiniteReport | None:
        """One host sync: what happened since the last read (None when every loss was finite); then reset."""
        if not self.batches:
            return None
        count, position, value = self.flags.tolist()
        batches, self.batches = self.batches, []
        self.flags = torch.zeros_like(self.flags)
        self.halted = torch.zeros_like(self.halted)
        if count == 0:
            return None
        first = int(position)
        return NonFiniteReport(int(count), batches[first - 1], value, len(batches) - first + 1)


def masked_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ok: torch.Tensor) -> None:
    """`optimizer.step()` (through `scaler` when it scales) that leaves the weights as they are where `ok` is
    False, without reading `ok` on the host."""
    if scaler.is_enabled():  # fp16: GradScaler skips a step whose gradients are not finite
        poison = torch.where(ok, 1.0, torch.nan).to(torch.float32)
        for group in optimizer.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, poison)
        scaler.step(optimizer)
        scaler.update()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):  # fused torch optimizers
        optimizer.found_inf = (~ok).to(torch.float32)  # read by their step, as GradScaler sets it
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    else:
        _step_and_put_back(optimizer, ok)


@torch.no_grad()
def _step_and_put_back(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """Any other optimizer: step, then restore the parameters and their state tensors where `ok` is False."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if any(not optimizer.state.get(p) for p in params):
        # The first step creates the optimizer's state, which cannot be put back: decide it on the host (once).
        if bool(ok):
            optimizer.step()
        return
    states = [
        value
        for p in params
        for value in optimizer.state[p].values()
        if torch.is_tensor(value) and value.device == p.device
    ]
    tensors = params + states
    saved = [t.clone() for t in tensors]
    optimizer.step()
    for tensor, before in zip(tensors, saved, strict=True):
        tensor.copy_(torch.where(ok, tensor, before))
