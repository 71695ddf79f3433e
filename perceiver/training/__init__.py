"""Training: the loop over an explicit state, its settings, metrics, stopping rules, checkpoint format and
files, signals, devices and distributed runs. Nothing here knows about configs, command lines or W&B."""

from perceiver.training.checkpoint import Checkpointer, locate, read_checkpoint
from perceiver.training.loop import EpochEnd, FitResult, TrainingParts, evaluate, fit
from perceiver.training.settings import TrainSettings
from perceiver.training.signals import TrainingInterrupted
from perceiver.training.state import BestModel, CheckpointError, RunRecord, TrainState
from perceiver.training.stopping import NonFiniteLossError

__all__ = [
    "BestModel",
    "CheckpointError",
    "Checkpointer",
    "EpochEnd",
    "FitResult",
    "NonFiniteLossError",
    "RunRecord",
    "TrainSettings",
    "TrainState",
    "TrainingInterrupted",
    "TrainingParts",
    "evaluate",
    "fit",
    "locate",
    "read_checkpoint",
]
