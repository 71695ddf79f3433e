"""Stop requests from outside: SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) become a flag that
the training loop honours at the next step boundary, after saving a checkpoint."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training at a step boundary, after saving a checkpoint (when saving is on)."""

    def __init__(self, signum: int, epoch: int, step: int, checkpoint: Path | None, run_dir: Path) -> None:
        self.signum, self.checkpoint, self.run_dir = signum, checkpoint, run_dir
        name = signal.Signals(signum).name
        if checkpoint is None:
            saved = "nothing was saved (trainer.save_checkpoints=false), so a new run starts from scratch"
        else:
            saved = f"checkpoint saved to {checkpoint}"
        super().__init__(f"stopped by {name} in epoch {epoch} after step {step}; {saved}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + self.signum


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
