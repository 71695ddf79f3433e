"""This project against the Keras example the way a sceptic would measure it: interleaved pairs of processes.

Single runs on a shared machine swing by up to 30%, so one Keras run against one run of ours says little.
Here every pair is a Keras process then one of ours (then the other peers of the pair), back to back; the
ratio is taken within each pair and the median over the pairs is reported with its range. Each condition
gives both peers the same allocator, applied the same way:

- **out of the box** (`box`): what each peer does by itself: the Keras example with glibc's defaults, this project
  with the mallopt calls train.py makes at start-up (`--allocator keep`);
- **same allocator (environment)** (`env`): both processes start with the same `MALLOC_*` environment variables
  (below) and neither calls mallopt: glibc reads them before the interpreter allocates anything, so the
  peers get identical allocators without running any of each other's code;
- **same allocator (mallopt)** (`mallopt`): both call train.py's mallopt (`--allocator keep`): the earlier benchmark's
  "allocator fix", kept to show how it differs from the environment variables.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

# What the independent measurement gave both processes: no mmap below 4 GiB, no trimming below
# 64 GiB of free heap top, and heap growth in 1 GiB steps (glibc mallopt(3) names: M_MMAP_THRESHOLD,
# M_TRIM_THRESHOLD, M_TOP_PAD).
ENV_ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}


@dataclass(frozen=True)
class Peer:
    """One process of a pair: an implementation with its `bench.measure` arguments and environment."""

    label: str
    impl: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    """How both peers' allocators are set; the first peer is the Keras example, the ratios' reference."""

    key: str  # its name on the command line (--conditions)
    name: str
    peers: tuple[Peer, ...]


KERAS, OURS = "Keras example", "this project"
CONDITIONS = (
    Condition(
        "box",
        "out of the box",
        (Peer(KERAS, "keras"), Peer(OURS, "ours", ("--allocator", "keep"))),
    ),
    Condition(
        "env",
        "same allocator (environment)",
        (
            Peer(KERAS, "keras", env=ENV_ALLOCATOR),
            Peer(OURS, "ours", env=ENV_ALLOCATOR),
            Peer("this project, self-attention unfolded", "ours-unfolded", env=ENV_ALLOCATOR),
            Peer("this project, bf16 autocast", "ours", ("--precision", "bf16"), ENV_ALLOCATOR),
            Peer("perceiver-pytorch", "perceiver-pytorch", env=ENV_ALLOCATOR),
        ),
    ),
    Condition(
        "mallopt",
        "same allocator (mallopt)",
        (Peer(KERAS, "keras", ("--allocator", "keep")), Peer(OURS, "ours", ("--allocator", "keep"))),
    ),
)


def measure_process(peer: Peer, setting: str, seconds: float) -> dict:
    """`python -m bench.measure` for one peer in a fresh process: glibc reads its environment at start-up."""
    command = [sys.executable, "-m", "bench.measure", "--impl", peer.impl, "--setting", setting]
    command += ["--seconds", str(seconds), *peer.args]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | peer.env
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_pairs(
    condition: Condition,
    setting: str,
    pairs: int,
    seconds: float,
    measure: Callable[[Peer, str, float], dict] = measure_process,
) -> list[dict]:
    """`pairs` rounds of the condition's peers in order (A B A B ...); each row says its round and peer."""
    rows = []
    for round_ in range(1, pairs + 1):
        for peer in condition.peers:
            row = measure(peer, setting, seconds) | {"pair": round_, "peer": peer.label, "condition": condition.name}
            rows.append(row)
            print(
                f"  {setting}, {condition.name}, pair {round_}: {peer.label:30s} "
                f"{row['step_seconds'] * 1e3:9.1f} ms/step  {row['minor_faults_per_step']:9.0f} faults/step",
                flush=True,
            )
    return rows


def ratios(rows: list[dict], peer: str, reference: str = KERAS) -> list[float]:
    """Per pair: the reference's step time over `peer`'s (above 1: `peer` is faster)."""
    steps = {(row["pair"], row["peer"]): row["step_seconds"] for row in rows}
    pairs = sorted({row["pair"] for row in rows if row["peer"] == peer})
    return [steps[(p, reference)] / steps[(p, peer)] for p in pairs if (p, reference) in steps]


def summary_rows(rows: list[dict]) -> list[dict]:
    """One line per (setting, condition, peer): median ratio over its pairs, the range, medians of the rest."""
    out = []
    for setting, condition, peer in dict.fromkeys((r["setting"], r["condition"], r["peer"]) for r in rows):
        here = [r for r in rows if r["setting"] == setting and r["condition"] == condition]
        mine = [r for r in here if r["peer"] == peer]
        values = ratios(here, peer)
        out.append(
            {
                "setting": setting,
                "condition": condition,
                "peer": peer,
                "pairs": len(values),
                "ratio": statistics.median(values) if values else None,
                "low": min(values) if values else None,
                "high": max(values) if values else None,
                "step_seconds": statistics.median(r["step_seconds"] for r in mine),
                "faults_per_step": statistics.median(r["minor_faults_per_step"] for r in mine),
                "peak_memory_mib": max(r["peak_memory_mib"] for r in mine),
            }
        )
    return out


def pairs_table(summary: list[dict]) -> str:
    lines = [
        "| setting | allocator | implementation | pairs | x Keras (median) | range | ms/step (median) "
        "| minor faults/step | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        spread = f"{row['low']:.2f}-{row['high']:.2f}" if row["ratio"] is not None else "-"
        lines.append(
            f"| {row['setting']} | {row['condition']} | {row['peer']} | {row['pairs']} | {ratio} | {spread} | "
            f"{row['step_seconds'] * 1e3:.1f} | {row['faults_per_step']:.0f} | {row['peak_memory_mib']:.0f} |"
        )
    return "\n".join(lines)
