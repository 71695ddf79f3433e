"""Training-step throughput of train.py variants, compared fairly: `python -m bench step VARIANT VARIANT ...`.

    python -m bench step [--pairs 5] [--steps 15] [--warmup 3] [--threads N] [--out FILE.json] \
        "experiment=fashion_mnist_fast" "experiment=fashion_mnist_fast model.latent_dim=64"

Each VARIANT is one string of train.py overrides, composed from conf/ as train.py composes them; its model and
optimizer are built as `build_parts` builds them (seeded with `seed`), and its step is the loop's training step
(bench.measure.fixed_batch_step: autocast in `trainer.precision`, cross-entropy, backward, optimizer step, the
model compiled when `trainer.compile=true`) on one random batch of `trainer.batch_size` images of the model's
input shape. No data set is read and no augmentation runs: this is the model's and the optimizer's cost.

Every variant is built (a bad one ends the bench here, naming it) and warmed up (the first step, compilation
included, is reported on its own); then each of `--pairs` rounds times `--steps` steps of every variant in turn
(A B A B ...), so the machine's swings fall on all of them alike. Reported per variant: the median img/s over
rounds with its range, and the median of its per-round ratio to the first variant, with its range.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bench.compose import compose_train
from bench.measure import at_least, fixed_batch_step, time_steps
from perceiver.experiment.build import (
    build,
    check_num_classes,
    configured_device,
    model_fields,
    seed_everything,
)
from perceiver.experiment.config import ConfigError, check_run_settings, train_settings
from perceiver.training.device import configure_determinism, keep_freed_memory
from perceiver.training.metrics import training_flops
from perceiver.training.settings import TrainSettings

PROCESS_WIDE = ("keep_freed_memory", "deterministic")  # trainer settings of the whole process: variants must agree


@dataclass
class Variant:
    """One variant, built and ready to step; `rates` gets its img/s of each round."""

    overrides: str
    step: Callable[[], None]
    settings: TrainSettings
    device: torch.device
    params: int
    flops_per_image: float | None  # training FLOPs (forward and backward) as the model counts them; None: no count
    first_step_seconds: float = 0.0
    rates: list[float] = field(default_factory=list)


def compose_variant(overrides: str) -> DictConfig:
    """conf/train.yaml with the variant's overrides, as `python train.py OVERRIDES` composes it."""
    return compose_train(shlex.split(overrides), f"variant {overrides!r}")


def build_variant(overrides: str, cfg: DictConfig) -> Variant:
    """The model and optimizer of `build_parts` (no data source: the classes and channels come from the config)
    and the loop's step on a seeded random batch."""
    try:
        check_run_settings(cfg)
        settings = train_settings(cfg)
        device = configured_device(cfg)
        if cfg.data.num_classes is None and cfg.model.get("num_classes") is None:
            raise ConfigError("the number of classes is known only once the data is read: set data.num_classes=K")
        num_classes = check_num_classes(cfg.model.get("num_classes"), cfg.data.num_classes)
        seed_everything(cfg.seed)
        fields = model_fields(cfg.model, num_classes)
        model = build("model", OmegaConf.create(fields)).to(device).train()
        optimizer = build("optimizer", cfg.optimizer, model)
    except ConfigError as error:
        raise SystemExit(f"variant {overrides!r}: {error}") from None
    generator = torch.Generator().manual_seed(cfg.seed)
    shape = (settings.batch_size, fields["in_channels"], fields["image_size"], fields["image_size"])
    images = torch.randn(shape, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (settings.batch_size,), generator=generator).to(device)
    try:
        per_image = training_flops(model, settings.batch_size) / settings.batch_size
    except TypeError:
        per_image = None
    step = fixed_batch_step(model, optimizer, images, labels, settings.precision, settings.compile)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Variant(overrides, step, settings, device, params, per_image)


def apply_process_settings(variants: Sequence[Variant]) -> dict[str, bool]:
    """What train.py sets for the whole process (glibc's allocator, deterministic kernels), set once: one
    process cannot give variants different ones, so they must agree."""
    chosen = {}
    for name in PROCESS_WIDE:
        values = {getattr(variant.settings, name) for variant in variants}
        if len(values) > 1:
            raise SystemExit(f"trainer.{name} is set for the whole process: give every variant the same value")
        chosen[name] = values.pop()
    if chosen["keep_freed_memory"]:
        chosen["keep_freed_memory"] = keep_freed_memory()
    configure_determinism(chosen["deterministic"])
    return chosen


def schedule(variants: int, rounds: int) -> list[tuple[int, int]]:
    """(round, variant index) in the order they are timed: every variant in turn, round after round."""
    return [(round_, index) for round_ in range(rounds) for index in range(variants)]


def warm_up(variant: Variant, steps: int) -> None:
    """`steps` untimed steps; the first one's seconds (torch.compile's included) are kept apart."""
    variant.first_step_seconds = time_steps(variant.step, 0, 0.0, 1)[0]
    for _ in range(steps - 1):
        variant.step()


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, lowest, highest)."""
    return statistics.median(values), min(values), max(values)


def ratios(variant: Variant, first: Variant) -> list[float]:
    """Per round: this variant's img/s over the first variant's in the same round."""
    return [mine / theirs for mine, theirs in zip(variant.rates, first.rates, strict=True)]


def table(variants: Sequence[Variant]) -> str:
    columns = ("variant", "params", "train GFLOP/img", "batch", "precision", "compile", "first step s")
    columns += ("img/s [range]", "vs first [range]")
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for variant in variants:
        flops = f"{variant.flops_per_image / 1e9:.3f}" if variant.flops_per_image is not None else "n/a"
        rate, ratio = spread(variant.rates), spread(ratios(variant, variants[0]))
        name = variant.overrides.replace("|", "\\|") or "(train.py defaults)"
        settings = variant.settings
        lines.append(
            f"| `{name}` | {variant.params:,} | {flops} | {settings.batch_size} | {settings.precision} "
            f"| {str(settings.compile).lower()} | {variant.first_step_seconds:.2f} "
            f"| {rate[0]:.1f} [{rate[1]:.1f}, {rate[2]:.1f}] | {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}] |"
        )
    return "\n".join(lines)


def record(variants: Sequence[Variant], context: dict[str, object]) -> dict[str, object]:
    """Everything printed, per round too: what --out writes."""
    rows = [
        {
            "overrides": variant.overrides,
            "params": variant.params,
            "train_flops_per_image": variant.flops_per_image,
            "batch_size": variant.settings.batch_size,
            "precision": variant.settings.precision,
            "compile": variant.settings.compile,
            "device": str(variant.device),
            "first_step_seconds": variant.first_step_seconds,
            "images_per_second": variant.rates,
            "median_images_per_second": spread(variant.rates)[0],
            "ratio_to_first": ratios(variant, variants[0]),
            "median_ratio_to_first": spread(ratios(variant, variants[0]))[0],
        }
        for variant in variants
    ]
    return {**context, "variants": rows}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench step", description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="VARIANT", help="one string of train.py overrides")
    parser.add_argument("--pairs", type=at_least(1), default=5, help="interleaved rounds (A B A B ...); default 5")
    parser.add_argument("--steps", type=at_least(1), default=15, help="timed steps per variant and round; default 15")
    parser.add_argument(
        "--warmup", type=at_least(1), default=3, help="untimed steps per variant first (compilation); default 3"
    )
    parser.add_argument("--threads", type=at_least(1), help="torch's intra-op threads; default: torch's own")
    parser.add_argument("--out", type=Path, help="also write the results, every round's, to this JSON file")
    return parser.parse_args(argv)


def report(variants: Sequence[Variant], context: dict) -> str:
    load = "load average (1/5/15 min): start {}, end {}".format(
        *(" ".join(f"{x:.2f}" for x in context[key]) for key in ("load_average_start", "load_average_end"))
    )
    devices = ", ".join(sorted({str(variant.device) for variant in variants}))
    process = ", ".join(f"trainer.{name}={str(value).lower()}" for name, value in context["process"].items())
    lines = [
        f"command: `{context['command']}`",
        f"date: {context['date']}; torch {context['torch']} on {devices} ({context['processor']}), "
        f"{context['threads']} torch thread(s); {process}",
        load,
        f"{context['pairs']} interleaved round(s) (A B A B ...) of {context['steps']} timed step(s) per variant, "
        f"after {context['warmup']} warm-up step(s) each",
        "",
        table(variants),
        "",
        "img/s: batch size over the mean step of a round; median over the rounds [lowest, highest]. vs first: this "
        "variant's img/s over the first's in the same round, median [lowest, highest]. first step s: the first "
        "warm-up step, torch.compile included (trainer.compile=true); never in img/s.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    load_start, started = os.getloadavg(), datetime.now().astimezone()
    configs = [compose_variant(overrides) for overrides in args.variants]  # every variant, before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [build_variant(overrides, cfg) for overrides, cfg in zip(args.variants, configs, strict=True)]
    process = apply_process_settings(variants)
    for variant in variants:
        warm_up(variant, args.warmup)
    for _, index in schedule(len(variants), args.pairs):
        variant = variants[index]
        seconds, _ = time_steps(variant.step, 0, 0.0, args.steps)
        variant.rates.append(variant.settings.batch_size / seconds)
    load_end = os.getloadavg()
    context = {
        "command": shlex.join(["python", "-m", "bench", "step", *argv]),
        "date": started.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "process": process,
        "load_average_start": load_start,
        "load_average_end": load_end,
        "pairs": args.pairs,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    print(report(variants, context))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record(variants, context), indent=2) + "\n")
        print(f"\n  -> {args.out}")


if __name__ == "__main__":
    main()
