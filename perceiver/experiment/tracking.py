"""Experiment tracking behind one small interface: Weights & Biases, or nothing.

A tracking failure must never cost a training run: every W&B call is guarded. When an online run
cannot start (no network, bad credentials) or fails mid-run, the tracker warns once and carries on with
an offline run of the same id, whose local files `wandb sync` uploads later; if that fails too, it turns
into a no-op (metrics.json still holds every epoch).
"""

from __future__ import annotations

import inspect
import logging
import netrc
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")

# Epoch rows are plotted against their `epoch` key rather than W&B's own step, so that curves of runs that
# log at different rates (or a resumed run) line up; the summary keeps the best validation loss and top-1
# (of the weights, `val/*`, and of their EMA, `val_ema/*`, with `trainer.ema_decay`), not the last epoch's.
# Named prefixes, not "*": a sweep's summary run logs tables that have no epoch.
EPOCH_METRICS = ("train/*", "val/*", "val_ema/*", "perf/*", "lr", "images_per_second", "epoch_seconds", "attention/*")
BEST_SUMMARIES = {"val/loss": "min", "val/top1": "max", "val_ema/loss": "min", "val_ema/top1": "max"}
# Step rows (the training loss and learning rate every `trainer.log_every_n_steps`) are plotted against the
# global step. W&B's own step is the global step for both kinds of rows: it only grows, also across a resume,
# and an epoch row merges with a step row of the same step.
STEP_METRICS = ("train_step/*",)
MODEL_ALIASES = ("best", "latest")  # the model artifact is the best checkpoint, uploaded last


class Tracker(Protocol):
    """What a tracker is: where one training run's rows, summary, media and model file go. `log`'s `step` is the
    global training step (it only grows, also across a resume); `run_id` is what a resumed run continues."""

    mode: str
    run_id: str | None
    prediction_rows: int  # rows of the predictions table; 0 = none

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...
    def summarize(self, metrics: dict[str, Any]) -> None: ...
    def log_artifact(self, path: Path, name: str, kind: str = "model") -> None: ...
    def log_media(self, make: Callable[[Any], dict[str, Any]]) -> None: ...
    def use_artifact(self, reference: str) -> Path: ...
    def log_images(self, images: dict[str, Path], step: int | None = None) -> None: ...
    def log_predictions(
        self, key: str, rows: Sequence[tuple[Any, str, str, float]], step: int | None = None
    ) -> None: ...
    def mark_preempting(self) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    """Tracks nothing; `logger=none`."""

    mode = "disabled"
    run_id: str | None = None
    prediction_rows = 0

    def __init__(self, **settings: Any) -> None:
        """Takes and ignores the W&B tracker's settings, so `logger=none` composes like `logger=wandb`; a setting
        the W&B tracker does not have is a TypeError, as it would be there."""
        unknown = sorted(set(settings) - set(inspect.signature(WandbTracker).parameters))
        if unknown:
            raise TypeError(f"NullTracker got unexpected settings: {', '.join(unknown)}")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summarize(self, metrics: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: Path, name: str, kind: str = "model") -> None:
        pass

    def log_media(self, make: Callable[[Any], dict[str, Any]]) -> None:
        pass

    def use_artifact(self, reference: str) -> Path:
        return download_artifact(reference)

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        pass

    def log_predictions(self, key: str, rows: Sequence[tuple[Any, str, str, float]], step: int | None = None) -> None:
        pass

    def mark_preempting(self) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def download_artifact(reference: str, run: Any = None) -> Path:
    """A W&B artifact's files, downloaded: through `run.use_artifact` (which records it as the run's input)
    when there is a run, else through the public API. ValueError with W&B's reason when it cannot be had."""
    import wandb

    try:
        artifact = run.use_artifact(reference) if run is not None else wandb.Api().artifact(reference)
        return Path(artifact.download())
    except Exception as error:
        raise ValueError(f"the W&B artifact {reference} cannot be downloaded ({one_line(error)})") from error


def has_wandb_credentials() -> bool:
    """True when W&B could authenticate without asking: an API key in the environment or in netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """`auto` -> online with credentials, else offline; explicit modes (and WANDB_MODE) win."""
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r} is invalid: choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if has_wandb_credentials() else "offline"


def one_line(error: BaseException) -> str:
    """An exception as one short line: W&B's messages span lines and can be long."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


class WandbTracker:
    """One W&B run: resolved config, per-epoch curves, final metrics in the summary. `run_id` continues
    an earlier run (a resumed training run) instead of starting a new one."""

    def __init__(
        self,
        config: dict[str, Any],
        run_dir: Path,
        mode: str = "auto",
        project: str = "perceiver",
        entity: str | None = None,
        group: str | None = None,
        job_type: str = "train",
        name: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        log_model: bool = False,
        prediction_rows: int = 32,
        init_timeout: float = 60.0,
        run_id: str | None = None,
    ) -> None:
        self.mode = resolve_mode(mode)
        self.log_model = log_model
        if isinstance(prediction_rows, bool) or not isinstance(prediction_rows, int) or prediction_rows < 0:
            raise ValueError(f"prediction_rows={prediction_rows!r} is invalid: a number of table rows >= 0")
        self.prediction_rows = prediction_rows
        self.init_timeout = init_timeout
        self.run = None
        self.run_id: str | None = run_id
        if self.mode == "disabled":
            return
        self._init_args = dict(project=project, entity=entity, group=group, job_type=job_type, name=name, notes=notes)
        self._init_args |= {"tags": list(tags or []), "config": config, "dir": str(run_dir)}
        try:
            self.run = self._start(self.mode)
            self.run_id = self.run.id
        except Exception as error:  # network, credentials, service: training goes on regardless
            self._fall_back(f"could not start a W&B run ({one_line(error)})")
            return
        define_metrics(self.run)
        if self.mode == "offline":
            log.info(
                "W&B is offline (no credentials found or mode=offline); upload later with: wandb sync %s",
                Path(self.run.dir).parent,
            )

    def _start(self, mode: str) -> Any:
        """`wandb.init`, continuing `self.run_id` when there is one; waits at most `init_timeout` seconds."""
        import wandb

        return wandb.init(
            **self._init_args,
            mode=mode,
            id=self.run_id,
            resume="allow" if self.run_id else None,
            settings=wandb.Settings(init_timeout=self.init_timeout),
            reinit="create_new",
        )

    def _disable(self, reason: str) -> None:
        log.warning("W&B tracking is off for the rest of this run: %s. Training continues.", reason)
        self.run = None

    def _fall_back(self, reason: str) -> None:
        """An online run that failed goes on as an offline run of the same id; anything else turns tracking off."""
        self.run = None  # a failed online run is dropped, not finished: finishing could wait on the network
        if self.mode != "online":
            self._disable(reason)
            return
        try:
            self.run = self._start("offline")
        except Exception as error:
            self._disable(f"{reason}; an offline run failed too ({one_line(error)})")
            return
        self.mode, self.run_id = "offline", self.run.id
        define_metrics(self.run)
        log.warning(
            "W&B: %s. Training continues; metrics go to an offline run, upload it later with: wandb sync %s",
            reason,
            Path(self.run.dir).parent,
        )

    def _guarded(self, action: str, call: Callable[[Any], Any]) -> None:
        """`call(wandb)` on the live run (wandb is imported only when there is one); a failure falls back."""
        if self.run is None:
            return
        try:
            import wandb

            call(wandb)
        except Exception as error:
            self._fall_back(f"{action} failed ({one_line(error)})")
            if self.run is not None:
                self._guarded(action, call)  # once more, on the offline run

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._guarded("logging", lambda wandb: self.run.log(metrics, step=step))

    def summarize(self, metrics: dict[str, Any]) -> None:
        self._guarded("updating the summary", lambda wandb: self.run.summary.update(metrics))

    def log_artifact(self, path: Path, name: str, kind: str = "model") -> None:
        if self.log_model:
            self._guarded("logging the artifact", lambda wandb: upload_file(self.run, wandb, path, name, kind))

    def log_media(self, make: Callable[[Any], dict[str, Any]]) -> None:
        """Log what `make(wandb)` builds (tables, plots, images): made only when there is a run to take it."""
        self._guarded("logging media", lambda wandb: self.run.log(make(wandb)))

    def use_artifact(self, reference: str) -> Path:
        """Download a W&B artifact (`entity/project/name:version`) as this run's input, so that the run's lineage
        shows where its starting weights came from; without a run, through the public API."""
        return download_artifact(reference, self.run)

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        """PNG files as W&B images (media panels), at the global step of the epoch row they belong to."""

        def send(wandb: Any) -> None:
            self.run.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=step)

        self._guarded("logging images", send)

    def log_predictions(self, key: str, rows: Sequence[tuple[Any, str, str, float]], step: int | None = None) -> None:
        """A table of (image as an (H, W, C) uint8 array, label, prediction, confidence), at most
        `prediction_rows` of them."""

        def send(wandb: Any) -> None:
            self.run.log({key: predictions_table(wandb, rows[: self.prediction_rows])}, step=step)

        if self.prediction_rows:
            self._guarded("logging the predictions table", send)

    def mark_preempting(self) -> None:
        """Tell W&B the run was preempted (SIGTERM) and will be resumed, rather than that it crashed."""
        self._guarded("marking the run preempting", lambda wandb: self.run.mark_preempting())

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as error:
                log.warning("W&B could not finish the run cleanly (%s); local files are kept.", error)


def define_metrics(run: Any) -> None:
    """Step metric and best-value summaries for the dashboards (see EPOCH_METRICS). A failure here only
    warns: the run itself still works, its curves just fall back to W&B's step."""
    try:
        run.define_metric("epoch")
        for name in EPOCH_METRICS:
            run.define_metric(name, step_metric="epoch")
        for name, summary in BEST_SUMMARIES.items():  # an exact name overrides its glob: repeat the step
            run.define_metric(name, step_metric="epoch", summary=summary)
        run.define_metric("global_step")
        for name in STEP_METRICS:
            run.define_metric(name, step_metric="global_step")
    except Exception as error:
        log.warning("W&B: could not define the epoch metrics (%s); curves use W&B's step.", one_line(error))


def upload_file(run: Any, wandb: Any, path: Path, name: str, kind: str) -> None:
    """`path` as an artifact of `run`; a model gets the aliases best and latest."""
    artifact = wandb.Artifact(name, type=kind)
    artifact.add_file(str(path))
    run.log_artifact(artifact, aliases=list(MODEL_ALIASES) if kind == "model" else None)


def predictions_table(wandb: Any, rows: Sequence[tuple[Any, str, str, float]]) -> Any:
    table = wandb.Table(columns=["image", "label", "prediction", "confidence"])
    for image, label, prediction, confidence in rows:
        table.add_data(wandb.Image(image), label, prediction, confidence)
    return table
