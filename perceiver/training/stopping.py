"""When training stops on its own: Keras-style early stopping, and the one policy for non-finite losses."""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)


def divergence_advice(precision: str) -> str:
    """How to get past a diverging loss, naming the settings; fp32 is advised only to a run that is not in it."""
    fp32 = "" if precision == "fp32" else f" or use trainer.precision=fp32 (not {precision})"
    return f"lower optimizer.lr, set trainer.grad_clip_norm{fp32}"


class EarlyStopping:
    """Keras `EarlyStopping(monitor="val_loss", patience)`: stop after `patience` epochs in a row
    without a lower validation loss; remember the best weights to restore them."""

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.best_loss = math.inf
        self.best_epoch = 0
        self.epochs_without_improvement = 0

    def update(self, val_loss: float, epoch: int) -> bool:
        """Record an epoch's validation loss; True when it is the best so far."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.epochs_without_improvement >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("best_loss", "best_epoch", "epochs_without_improvement")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (trainer.nonfinite_loss=error); the message says where.

    `checkpoint` is the last good state's file (None when nothing was saved) and `run_dir` the run it
    belongs to, so an entry point can say how to go on from there.
    """

    def __init__(self, message: str, batch: int, value: float, checkpoint: Any = None, run_dir: Any = None) -> None:
        super().__init__(message)
        self.batch, self.value = batch, value
        self.checkpoint, self.run_dir = checkpoint, run_dir


def warn_skipped(where: str, batch: int, value: float) -> None:
    """The first skipped step of an epoch is logged; the rest are counted in train/skipped_steps."""
    log.warning(
        "%s, batch %d: non-finite loss (%s), step skipped (trainer.nonfinite_loss=skip); "
        "this epoch's skips are counted in train/skipped_steps",
        where,
        batch,
        value,
    )


def check_epoch_trained(epoch: int, trained: int, skipped: int, precision: str) -> None:
    """An epoch whose every step was skipped trained nothing: stop rather than go on in silence."""
    if trained == 0 and skipped:
        raise NonFiniteLossError(
            f"every training step of epoch {epoch} had a non-finite loss ({skipped} skipped); "
            + divergence_advice(precision),
            0,
            math.nan,
        )


def check_some_epoch_was_finite(best_epoch: int, history: list[dict[str, float]], precision: str) -> None:
    if best_epoch == 0:
        raise FloatingPointError(
            f"the validation loss was never finite in {len(history)} epochs "
            f"(last: {history[-1]['val/loss'] if history else None}); {divergence_advice(precision)}"
        )
