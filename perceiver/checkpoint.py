"""Resumable checkpoints: everything a run needs to go on as if it had never stopped.

A checkpoint is one `torch.save`d dict, written atomically (temporary file, fsync, rename) so that a
crash mid-write leaves the previous one intact. The newest `keep` live in `<run dir>/checkpoints/`
and `last.pt` is a hard link to the newest. SIGTERM (preemption) and SIGINT (Ctrl-C) become a request
that the training loop honours at the next step boundary: save, then stop with the resume command.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "perceiver-checkpoint"
VERSION = 1
FOLDER = "checkpoints"
# What may differ between a checkpoint's config and the run resuming it; everything else (model, data,
# optimizer, scheduler, augmentation, seed, batch size) defines the training being continued.
CHANGEABLE = ("trainer.", "logger.", "paths.", "resume")
FIXED_TRAINER_FIELDS = ("trainer.batch_size",)


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from; the message says which one and what to do instead."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training at a step boundary, after saving a checkpoint."""

    def __init__(self, signum: int, epoch: int, step: int, checkpoint: Path | None, run_dir: Path) -> None:
        self.signum, self.checkpoint, self.run_dir = signum, checkpoint, run_dir
        name = signal.Signals(signum).name
        if checkpoint is None:
            saved = "nothing was saved (trainer.save_checkpoints=false), so a new run starts from scratch"
        else:
            saved = f"checkpoint saved to {checkpoint}\n  resume with: python train.py resume={run_dir}"
        super().__init__(f"stopped by {name} in epoch {epoch} after step {step}; {saved}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + self.signum


# ----------------------------------------------------------------------------- writing


def save_atomic(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    temporary.replace(path)


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


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a resumable checkpoint on the CPU; CheckpointError when it is unreadable or something else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        reason = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({reason[:200]})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a resumable checkpoint (best.pt holds weights only); "
            "resume from the run directory or its last.pt"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; this code reads {VERSION}")
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
    import json

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


# ----------------------------------------------------------------------------- config


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def fixed_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields that differ between a checkpoint's config and this run's, other than those a resume may change."""
    old, new = _flatten(saved), _flatten(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        changeable = key.startswith(CHANGEABLE) and not key.startswith(FIXED_TRAINER_FIELDS)
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if not changeable and before != after:
            differences.append(f"{key} ({before!r} in the checkpoint, {after!r} now)")
    return differences


def resumed_config(
    saved: dict[str, Any], current: Any, overrides: Sequence[str] | None, saved_overrides: Sequence[str]
) -> Any:
    """The config to continue with. From the command line (`overrides` given) it is the checkpoint's config
    with this command's overrides on top, so `python train.py resume=DIR` needs no repeated settings;
    in-process (`overrides=None`) it is `current` as given. Either way, changing what is being trained
    (model, data, optimizer, ...) is refused, naming the fields."""
    from omegaconf import OmegaConf

    if overrides is None:
        config = current
    else:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        config = OmegaConf.create(saved)
        absent = object()
        for override in OverridesParser.create().parse_overrides(list(overrides)):
            key = override.key_or_group
            if key == "resume":
                continue
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(config, parent) if parent else config
                if node is not None and leaf in node:
                    node.pop(leaf)
                continue
            value = OmegaConf.select(current, key, default=absent)
            if value is absent:  # a group placed at the top level (experiment=...): its fields are unknown here
                if override.input_line not in saved_overrides:
                    raise CheckpointError(
                        f"{override.input_line} cannot be changed when resuming (the checkpoint was made with "
                        f"{', '.join(saved_overrides) or 'no overrides'}); drop it, or start a new run with resume=null"
                    )
                continue
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True)
            OmegaConf.update(config, key, value, merge=False, force_add=True)
        config.resume = current.get("resume")
    differences = fixed_differences(saved, OmegaConf.to_container(config, resolve=True))
    if differences:
        raise CheckpointError(
            "the checkpoint was trained with other settings: "
            + "; ".join(differences)
            + ". Only trainer.* (not batch_size), logger.* and paths.* may change when resuming: drop the "
            "conflicting overrides, or start a new run with resume=null"
        )
    return config


def carried_overrides(saved_overrides: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """The overrides a resumed run's checkpoints record: the original run's, then this command's new ones
    (not resume=; a sweep job re-run in its own directory repeats its overrides, which are kept once)."""
    return list(dict.fromkeys([*saved_overrides, *(o for o in overrides if not o.startswith("resume="))]))


# ----------------------------------------------------------------------------- random number generators


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch (CPU) and CUDA generator states, in types `torch.load(weights_only=True)` reads."""
    version, keys, gauss = random.getstate()
    kind, array, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [kind, torch.from_numpy(array.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(states: dict[str, Any]) -> None:
    version, keys, gauss = states["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, array, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, array.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        if len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
        else:
            log.warning(
                "the checkpoint saved %d CUDA generator states, this machine has %d GPUs: not restored",
                len(states["cuda"]),
                torch.cuda.device_count(),
            )


# ----------------------------------------------------------------------------- signals


class StopSignals:
    """While active, SIGTERM and SIGINT set `signum` instead of killing the process, so the training loop
    can save and stop at the next step boundary. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s received: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to stop now)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
