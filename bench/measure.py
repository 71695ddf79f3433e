"""One implementation at one setting, measured in a process of its own (allocator state, thread pools and
imports differ between peers, so each gets a fresh interpreter), printed as one JSON line.

    python -m bench.measure --impl ours --setting small [--allocator default] [--precision bf16] [--compile]

Training throughput: forward, backward and an Adam step on one fixed random batch, dropout on (as the
example trains). Warm-up steps first, then each step is timed until `--seconds` have passed (at least
`--min-steps`); the median step is reported, with the minor page faults per timed step (the allocator's
cost: memory returned to the OS and faulted in again). FLOPs per step are counted once with
`torch.utils.flop_counter` (every peer runs on torch). glibc's allocator is what the process was started
with (`MALLOC_*` environment variables, reported as `env`), plus `--allocator keep`'s mallopt calls.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.settings import SETTINGS, Setting
from perceiver.training.device import keep_freed_memory

# ours-unfolded: this project with the self-attention unfolded (model.fold_attention_weights=false), to show
# what the fold buys.
IMPLEMENTATIONS = ("ours", "ours-unfolded", "straightforward", "keras", "perceiver-pytorch")


def device_for_bench() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def perceiver_kwargs(setting: Setting) -> dict[str, int | float]:
    return {**setting.model_kwargs(), "num_classes": setting.num_classes}


def make_torch_step(
    model: torch.nn.Module, setting: Setting, precision: str, compile_model: bool, seed: int = 0
) -> Callable[[], None]:
    """The training step of perceiver.training.loop with fused Adam as conf/optimizer/adam.yaml."""
    device = device_for_bench()
    generator = torch.Generator().manual_seed(seed)
    size, batch = setting.image_size, setting.batch_size
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, setting.num_classes, (batch,), generator=generator).to(device)
    model = model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7, fused=True)
    return fixed_batch_step(model, optimizer, images, labels, precision, compile_model)


def fixed_batch_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    precision: str,
    compile_model: bool,
) -> Callable[[], None]:
    """The training step of perceiver.training.loop on one batch, again and again: forward under autocast (the
    model compiled as the loop compiles it), fp32 cross-entropy, backward, optimizer step."""
    from perceiver.training.device import autocast
    from perceiver.training.loop import training_and_evaluation_models
    from perceiver.training.metrics import classification_loss

    device = images.device
    forward = training_and_evaluation_models(model, device, compile_model)[0]

    def step() -> None:
        with autocast(device, precision):
            logits = forward(images)
        loss = classification_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def build_step(impl: str, setting: Setting, precision: str, compile_model: bool) -> tuple[Callable[[], None], int]:
    torch.manual_seed(0)
    if impl in ("ours", "ours-unfolded", "straightforward"):
        from bench.straightforward import StraightforwardPerceiver
        from perceiver import Perceiver

        kwargs = {**perceiver_kwargs(setting), "fold_attention_weights": impl != "ours-unfolded"}
        model = (StraightforwardPerceiver if impl == "straightforward" else Perceiver)(**kwargs)
        return make_torch_step(model, setting, precision, compile_model), sum(p.numel() for p in model.parameters())
    if precision != "fp32" or compile_model:
        raise SystemExit(f"--precision/--compile are options of this project's model, not of {impl}")
    if impl == "keras":
        from bench.keras_example import make_keras_step

        return make_keras_step(setting)
    from bench.perceiver_pytorch_peer import make_perceiver_pytorch_step

    return make_perceiver_pytorch_step(setting)


def time_steps(step: Callable[[], None], warmup: int, seconds: float, min_steps: int) -> tuple[float, int]:
    """Mean seconds per step after `warmup` steps, over at least `min_steps` and about `seconds`."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < seconds:
        step()
        steps += 1
        if steps % 8 == 0 or steps >= min_steps:
            sync()
    sync()
    return (time.perf_counter() - start) / steps, steps


def time_each_step(step: Callable[[], None], warmup: int, seconds: float, min_steps: int) -> list[float]:
    """Seconds of each step after `warmup` steps (each synchronised), over at least `min_steps` and `seconds`."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - began)
    return times


def minor_faults() -> int:
    """Minor page faults of this process so far: memory the allocator handed back and touched again."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def allocator_in_use(kept: bool) -> str:
    """keep: this process called mallopt (train.py's way); env: glibc read MALLOC_* at start-up; or default."""
    env = any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ)
    return "+".join([name for name, on in (("env", env), ("keep", kept)) if on]) or "default"


def count_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_memory_mib() -> float:
    """The process's peak resident memory (CPU), or the peak of allocated GPU memory on CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def measure(
    impl: str,
    setting: Setting,
    allocator: str,
    precision: str,
    compile_model: bool,
    seconds: float,
    min_steps: int,
    warmup: int,
) -> dict[str, object]:
    kept = keep_freed_memory() if allocator == "keep" else False
    step, params = build_step(impl, setting, precision, compile_model)
    time_each_step(step, 0, 0.0, warmup)  # warm-up: its faults (first touches) are not the steady state's
    faults = minor_faults()
    times = time_each_step(step, 0, seconds, min_steps)
    faults = minor_faults() - faults
    step_seconds = statistics.median(times)
    return {
        "impl": impl,
        "setting": setting.name,
        "allocator": allocator_in_use(kept),
        "precision": precision,
        "compile": compile_model,
        "params": params,
        "step_seconds": step_seconds,  # the median step
        "mean_step_seconds": statistics.fmean(times),
        "steps_timed": len(times),
        "minor_faults_per_step": faults / len(times),
        "images_per_second": setting.batch_size / step_seconds,
        "flops_per_step": count_flops(step),
        "peak_memory_mib": peak_memory_mib(),
        "threads": torch.get_num_threads(),
        "device": str(device_for_bench()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, required=True)
    parser.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    parser.add_argument(
        "--allocator",
        choices=("keep", "default"),
        default="default",
        help="keep: glibc keeps freed large blocks (what train.py does at start-up); default: glibc's defaults",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (this project only)")
    parser.add_argument("--seconds", type=float, default=10.0, help="time steps for about this long")
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    result = measure(
        args.impl,
        SETTINGS[args.setting],
        args.allocator,
        args.precision,
        args.compile,
        args.seconds,
        args.min_steps,
        args.warmup,
    )
    print(json.dumps(result))


def at_least(lowest: int, hint: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number >= `lowest`, else an error that quotes the text (and `hint`, how to fix it)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lowest - 1
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {lowest}{hint}")
        return value

    return parse


if __name__ == "__main__":
    main()
