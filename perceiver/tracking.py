"""Experiment tracking behind one small interface: Weights & Biases, or nothing.

A tracking failure must never cost a training run: every W&B call is guarded, and after the first
failure the tracker warns once and turns into a no-op.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")


class NullTracker:
    """Tracks nothing; `logger=none`."""

    mode = "disabled"
    run_id: str | None = None

    def __init__(self, **settings: Any) -> None:
        """Accepts and ignores the W&B tracker's settings, so `logger=none` composes like `logger=wandb`."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summarize(self, metrics: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: Path, name: str, kind: str = "model") -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


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


class WandbTracker:
    """One W&B run: resolved config, per-epoch curves, final metrics in the summary."""

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
    ) -> None:
        self.mode = resolve_mode(mode)
        self.log_model = log_model
        self.run = None
        self.run_id: str | None = None
        if self.mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(
                project=project,
                entity=entity,
                group=group,
                job_type=job_type,
                name=name,
                tags=list(tags or []),
                notes=notes,
                config=config,
                dir=str(run_dir),
                mode=self.mode,
                reinit="create_new",
            )
            self.run_id = self.run.id
        except Exception as error:  # network, credentials, service: training goes on regardless
            self._disable(f"could not start a W&B run ({type(error).__name__}: {error})")
            return
        if self.mode == "offline":
            log.info(
                "W&B is offline (no credentials found or mode=offline); upload later with: wandb sync %s",
                Path(self.run.dir).parent,
            )

    def _disable(self, reason: str) -> None:
        log.warning("W&B tracking is off for the rest of this run: %s. Training continues.", reason)
        self.run = None

    def _guarded(self, action: str, call) -> None:
        if self.run is None:
            return
        try:
            call()
        except Exception as error:
            self._disable(f"{action} failed ({type(error).__name__}: {error})")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._guarded("logging", lambda: self.run.log(metrics, step=step))

    def summarize(self, metrics: dict[str, Any]) -> None:
        self._guarded("updating the summary", lambda: self.run.summary.update(metrics))

    def log_artifact(self, path: Path, name: str, kind: str = "model") -> None:
        if not self.log_model:
            return

        def upload() -> None:
            import wandb

            artifact = wandb.Artifact(name, type=kind)
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

        self._guarded("logging the artifact", upload)

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as error:
                log.warning("W&B could not finish the run cleanly (%s); local files are kept.", error)
