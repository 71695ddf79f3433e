"""Checkpoint files: atomic writes, rotation, and finding what to resume from.

A checkpoint (a `TrainState.to_dict()`, see state.py) is written atomically (temporary file, fsync, rename)
so that a crash mid-write leaves the previous one intact. The newest `keep` live in
`<run dir>/checkpoints/` and `last.pt` is a hard link to the newest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perceiver.files import write_atomic
from perceiver.training.state import CheckpointError, TrainState, check_header

log = logging.getLogger(__name__)

FOLDER = "checkpoints"


# ----------------------------------------------------------------------------- writing


def save_atomic(path: Path, state: dict[str, Any]) -> None:
    """`torch.save` a state dict atomically."""
    write_atomic(path, lambda file: torch.save(state, file))


def _link_atomic(source: Path, target: Path) -> None:
    """Point `target` at `source`'s bytes (a hard link, or a copy where links are unsupported), atomically."""
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    temporary.replace(target)


_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_files(run_dir: Path) -> list[Path]:
    """A run directory's resumable checkpoints, newest (highest step) first; `last.pt` when there are none."""
    folder = Path(run_dir) / FOLDER
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := _NAME.match(p.name))]
    files = [path for _, path in sorted(found, reverse=True)]
    last = Path(run_dir) / "last.pt"
    if not files and last.is_file():
        files.append(last)
    return files


class Checkpointer:
    """Writes `<run dir>/checkpoints/step-<N>.pt`, keeps the newest `keep`, and links `last.pt` to the newest."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / FOLDER
        self.keep = keep

    def clear(self) -> None:
        """A fresh run in a directory that holds an earlier run's checkpoints: they would outrank ours."""
        stale = [p for p in self.folder.glob("step-*.pt") if _NAME.match(p.name)]
        if stale:
            log.warning("starting afresh: removing %d checkpoint(s) of an earlier run in %s", len(stale), self.folder)
            for path in stale:
                path.unlink()

    def save(self, state: dict[str, Any], step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:08d}.pt"
        save_atomic(path, state)
        _link_atomic(path, self.run_dir / "last.pt")
        for old in checkpoint_files(self.run_dir)[self.keep :]:
            old.unlink(missing_ok=True)
        return path


# ----------------------------------------------------------------------------- reading


def load_file(path: Path) -> Any:
    """`torch.load` a checkpoint or model file on the CPU (tensors and plain values only); CheckpointError
    when it is truncated or corrupt."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        reason = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({reason[:200]})") from error


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a resumable checkpoint on the CPU; CheckpointError when it is unreadable or something else."""
    state = load_file(path)
    check_header(state, TrainState.FORMAT, TrainState.VERSION, path, TrainState.WHAT)
    return state


def _readable(path: Path) -> bool:
    try:
        read_checkpoint(path)
    except CheckpointError:
        return False
    return True


def load_newest(candidates: Sequence[Path]) -> tuple[Path, dict[str, Any]]:
    """Read the first candidate; when it is damaged, refuse, naming the newest intact one to use instead."""
    first, *others = candidates
    try:
        return first, read_checkpoint(first)
    except CheckpointError as error:
        intact = next((p for p in others if not p.samefile(first) and _readable(p)), None)
        if intact is not None:
            hint = f"the newest intact checkpoint is {intact}: resume from it with resume={intact}"
        else:
            hint = "no intact checkpoint is left; start again with resume=null"
        raise CheckpointError(f"{error}\n  {hint}") from error


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file belongs to, or None for a file outside any run directory."""
    folder = checkpoint.parent
    if folder.name == FOLDER:
        folder = folder.parent
    return folder if (folder / "config.yaml").is_file() else None


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The metrics of a run that got to the end (metrics.json is written last), else None."""
    path = Path(run_dir) / "metrics.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


@dataclass
class ResumePoint:
    """Where a run continues from: the checkpoint, its state, and the run directory to keep writing to."""

    path: Path | None
    run_dir: Path
    state: dict[str, Any] | None
    finished: dict[str, Any] | None = None


def locate(resume: str | None, run_dir: Path) -> ResumePoint | None:
    """`resume` -> the checkpoint to continue from: null = none; auto = this run directory's newest, if
    any; else a run directory or a checkpoint file. A finished run is reported, not resumed."""
    if resume is None or str(resume).lower() in ("", "null", "none"):
        return None
    if str(resume) == "auto":
        if not checkpoint_files(run_dir):
            return None
        target = Path(run_dir)
    else:
        target = Path(os.path.expanduser(str(resume)))
        if not target.exists():
            raise CheckpointError(
                f"resume={resume!r} does not exist; give a run directory (outputs/runs/<date>/<time>) "
                "or a checkpoint file in it, or resume=null to start afresh"
            )
    if target.is_dir():
        candidates = checkpoint_files(target)
        target_run_dir = target
    else:
        target_run_dir = run_dir_of(target) or Path(run_dir)
        others = [p for p in checkpoint_files(target_run_dir) if p.resolve() != target.resolve()]
        candidates = [target, *others]
    finished = finished_metrics(target_run_dir)
    if finished is not None:
        return ResumePoint(None, target_run_dir, None, finished)
    if not candidates:
        raise CheckpointError(
            f"resume={resume!r}: {target} holds no checkpoint (looked for {FOLDER}/step-*.pt and last.pt); "
            "was it run with trainer.save_checkpoints=false? Start afresh with resume=null"
        )
    path, state = load_newest(candidates)
    return ResumePoint(path, target_run_dir, state)
