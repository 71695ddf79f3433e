"""The whole benchmark in one run: `python -m bench [--out DIR] [--quick]` (the other commands: bench/__main__.py).

1. This machine's fp32 matmul peak (the reference of every "% of peak").
2. This project against the Keras example (its Keras 3 re-implementation) in interleaved pairs of processes
   at the "small" and "keras" settings (bench/settings.py), under three allocator conditions, with bf16
   autocast and perceiver-pytorch measured in the same pairs (bench/pairs.py): median ratio and range.
   `--once` instead runs every implementation once, as the first version of this benchmark did.
3. Step time against the number of inputs M for the Perceiver and a ViT, with a PNG plot.
4. The input pipeline against torchvision + DataLoader, and an epoch against step time x steps.

Writes results.json, results.md and scaling.png to DIR (default outputs/bench/<date>_<time>).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import pairs, pipeline, scaling
from bench.settings import SETTINGS
from perceiver.training.device import keep_freed_memory, matmul_peak, processor_name

# (implementation, allocator, precision, compile, label); the first row of a setting is the ratios' baseline.
RUNS = (
    ("keras", "default", "fp32", False, "Keras example, out of the box"),
    ("keras", "keep", "fp32", False, "Keras example + allocator fix"),
    ("perceiver-pytorch", "default", "fp32", False, "perceiver-pytorch, out of the box"),
    ("perceiver-pytorch", "keep", "fp32", False, "perceiver-pytorch + allocator fix"),
    ("straightforward", "default", "fp32", False, "straightforward PyTorch port"),
    ("ours", "default", "fp32", False, "this project, glibc's default allocator"),
    ("ours", "keep", "fp32", False, "this project, out of the box"),
    ("ours", "keep", "bf16", False, "this project, bf16 autocast"),
    ("ours", "keep", "fp32", True, "this project, torch.compile"),
)
NEEDS = {"keras": "keras", "perceiver-pytorch": "perceiver_pytorch"}


def available(impl: str) -> bool:
    module = NEEDS.get(impl)
    return module is None or importlib.util.find_spec(module) is not None


def run_measurement(impl: str, setting: str, allocator: str, precision: str, compiled: bool, seconds: float) -> dict:
    command = [sys.executable, "-m", "bench.measure", "--impl", impl, "--setting", setting]
    command += ["--allocator", allocator, "--precision", precision, "--seconds", str(seconds)]
    command += ["--compile"] if compiled else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput_rows(settings: list[str], seconds: dict[str, float], compile_at: set[str]) -> list[dict]:
    rows = []
    for setting in settings:
        for impl, allocator, precision, compiled, label in RUNS:
            if not available(impl):
                print(f"  {setting}: {label}: skipped ({NEEDS[impl]} is not installed: pip install -e '.[bench]')")
                continue
            if compiled and setting not in compile_at:
                continue
            row = run_measurement(impl, setting, allocator, precision, compiled, seconds[setting])
            row["label"] = label
            rows.append(row)
            print(f"  {setting}: {label:45s} {row['images_per_second']:8.1f} img/s", flush=True)
    return rows


def throughput_table(rows: list[dict], peak: float) -> str:
    lines = [
        "| setting | implementation | img/s | x Keras | x Keras + allocator | GFLOP/step | % of fp32 peak | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting in dict.fromkeys(row["setting"] for row in rows):
        here = [row for row in rows if row["setting"] == setting]
        keras = {row["allocator"]: row["images_per_second"] for row in here if row["impl"] == "keras"}
        for row in here:
            rate = row["images_per_second"]
            ratios = [f"{rate / keras[a]:.2f}" if a in keras else "-" for a in ("default", "keep")]
            utilisation = row["flops_per_step"] / row["step_seconds"] / peak
            lines.append(
                f"| {setting} | {row['label']} | {rate:.3g} | {ratios[0]} | {ratios[1]} | "
                f"{row['flops_per_step'] / 1e9:.1f} | {100 * utilisation:.0f}% | {row['peak_memory_mib']:.0f} |"
            )
    return "\n".join(lines)


def pair_rows(settings: list[str], counts: dict[str, int], seconds: dict[str, float], conditions: list[str]) -> list:
    rows = []
    for setting in settings:
        for condition in pairs.CONDITIONS:
            if condition.key not in conditions:
                continue
            missing = [p.impl for p in condition.peers if not available(p.impl)]
            for impl in dict.fromkeys(missing):
                print(f"  {setting}: {impl} skipped ({NEEDS[impl]} is not installed: pip install -e '.[bench]')")
            present = pairs.Condition(
                condition.key, condition.name, tuple(p for p in condition.peers if available(p.impl))
            )
            rows += pairs.run_pairs(present, setting, counts[setting], seconds[setting])
    return rows


def scaling_table(rows: list[dict]) -> str:
    lines = ["| M | image | patch | Perceiver ms/step | ViT ms/step | ViT / Perceiver |", "|---|---|---|---|---|---|"]
    for m in dict.fromkeys(row["num_inputs"] for row in rows):
        at = {row["model"]: row for row in rows if row["num_inputs"] == m}
        p, v = at["perceiver"], at.get("vit")
        vit = f"{v['step_seconds'] * 1e3:.1f} | {v['step_seconds'] / p['step_seconds']:.1f}" if v else "- | -"
        lines.append(f"| {m} | {p['image_size']} | {p['patch_size']} | {p['step_seconds'] * 1e3:.1f} | {vit} |")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    cpu = processor_name(torch.device("cpu"))
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "threads": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    parser.add_argument("--quick", action="store_true", help="small setting only, short timings (a smoke run)")
    parser.add_argument("--epoch-images", type=int, default=45_000, help="images in the timed epoch (CIFAR: 45,000)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "scaling", "pipeline"])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=None, help="throughput settings")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved pairs at the small setting")
    parser.add_argument("--keras-pairs", type=int, default=3, help="interleaved pairs at the keras setting")
    keys = [c.key for c in pairs.CONDITIONS]
    parser.add_argument(
        "--conditions", nargs="+", choices=keys, default=keys, help="allocator conditions (bench/pairs.py)"
    )
    parser.add_argument("--once", action="store_true", help="one process per implementation, no pairs (old way)")
    args = parser.parse_args(argv)
    out = args.out or Path("outputs/bench") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()  # for the in-process parts (scaling, pipeline), as train.py does
    command = " ".join(["python -m bench", shlex.join(sys.argv[1:])]).strip()
    results: dict[str, object] = {"command": command, "machine": machine()}
    print(f"{command}\nmachine: {results['machine']}", flush=True)
    peak = matmul_peak(torch.device("cuda" if torch.cuda.is_available() else "cpu"), seconds=3.0)
    results["fp32_matmul_peak_flops"] = peak
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    sections = [f"command: `{command}`", f"machine: {results['machine']}"]
    sections.append(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
    if "throughput" not in args.skip:
        settings = args.settings or (["small"] if args.quick else ["small", "keras"])
        if args.once:
            seconds = {"small": 3.0 if args.quick else 10.0, "keras": 20.0}
            rows = throughput_rows(settings, seconds, compile_at=set() if args.quick else {"small"})
            results["throughput"] = rows
            sections.append("## Training throughput, one run each\n\n" + throughput_table(rows, peak))
        else:
            seconds = {"small": 1.0 if args.quick else 5.0, "keras": 15.0}
            counts = {"small": 2 if args.quick else args.pairs, "keras": 2 if args.quick else args.keras_pairs}
            rows = pair_rows(settings, counts, seconds, args.conditions)
            summary = pairs.summary_rows(rows)
            results["pairs"], results["pairs_summary"] = rows, summary
            sections.append("## Training throughput, interleaved pairs\n\n" + pairs.pairs_table(summary))
    if "scaling" not in args.skip:
        rows = scaling.measure_scaling(seconds=0.5 if args.quick else 2.0)
        results["scaling"] = rows
        scaling.plot_scaling(rows, str(out / "scaling.png"))
        sections.append("## Step time against M\n\n" + scaling_table(rows))
    if "pipeline" not in args.skip:
        data = pipeline.random_cifar(5_000 if args.quick else 50_000)
        size = SETTINGS["keras"].image_size
        rates = {
            "device_batches": pipeline.device_pipeline_rate(data, size, 64),
            "torchvision_dataloader_2_workers": pipeline.dataloader_rate(data, size, 64, workers=2),
        }
        epoch = pipeline.epoch_against_steps(SETTINGS["small"], 640 if args.quick else args.epoch_images)
        results["pipeline"] = {"images": len(data), "images_per_second": rates, "epoch": epoch}
        sections.append(
            "## Input pipeline (Keras recipe at 64 x 64)\n\n"
            f"device batches: {rates['device_batches']:.0f} img/s; torchvision per-sample transforms, DataLoader "
            f"with 2 workers: {rates['torchvision_dataloader_2_workers']:.0f} img/s ({len(data)} images)\n\n"
            f"epoch of {epoch['steps']} steps (small setting): {epoch['epoch_seconds']:.1f} s against step time "
            f"{epoch['step_seconds'] * 1e3:.1f} ms x {epoch['steps']} = {epoch['step_seconds'] * epoch['steps']:.1f} s "
            f"(ratio {epoch['ratio']:.3f})"
        )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report = "\n\n".join(sections) + "\n"
    (out / "results.md").write_text(report)
    print("\n" + report + f"\nwritten to {out}/")


if __name__ == "__main__":
    main()
