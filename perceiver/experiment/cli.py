"""How an entry point ends: every failure a user can cause becomes one line and an exit code, with the
entry point's own hint on how to go on; nothing a run wrote is lost.

Exit codes: 0 done; 1 the training (or a sweep's job) failed or Hydra refused the command line; 2 a bad
setting, missing data or an unusable checkpoint; 128 + N stopped by signal N after saving a checkpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from hydra.errors import ConfigCompositionException, HydraException
from omegaconf.errors import OmegaConfBaseException, ValidationError

from perceiver.experiment.config import ConfigError, composition_message, invalid_value_message
from perceiver.experiment.job import record_failure, run_directory, sweep_directory
from perceiver.experiment.summary import summarize_failed_sweep
from perceiver.training import CheckpointError, NonFiniteLossError, TrainingInterrupted

log = logging.getLogger(__name__)


def fail(message: str, code: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class SweepJobFailed(Exception):
    """A sweep job's failure on its way out: Hydra marks the job failed, runs the batch's other jobs, then ends
    the multirun with this error and without `on_multirun_end`; it names the sweep for the entry point to sum up."""

    def __init__(self, message: str, sweep_dir: Path) -> None:
        super().__init__(message, sweep_dir)  # both in args: it is pickled back from launchers' worker processes
        self.message, self.sweep_dir = message, Path(sweep_dir)

    def __str__(self) -> str:
        return self.message


def run_hydra_app(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` function, reporting Hydra's own failures (the command line, composing the config,
    creating the run dir) in one line instead of a traceback; a sweep with a failed job is summarised first."""
    # Hydra re-raises, and the messages are made here: whatever the caller's environment says (with
    # HYDRA_FULL_ERROR=0 Hydra would print its own traceback and exit 1 before these handlers see the error)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except SweepJobFailed as failure:  # now, not at exit: W&B's exit handler ends its service before others run
        summarize_failed_sweep(failure.sweep_dir)
        fail(str(failure), 1)
    except ConfigCompositionException as error:
        cause = error.__cause__
        if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
            fail(invalid_value_message(cause.full_key, override_value(str(error), cause.full_key)), 2)
        fail(composition_message(error), 1)
    except (HydraException, OmegaConfBaseException) as error:
        fail(composition_message(error), 1)
    except OSError as error:  # Hydra creating the run or sweep dir
        where = error.filename or "the output directory"
        fail(f"cannot create {where} ({error.strerror}); point hydra.run.dir or paths.output_dir elsewhere", 2)


def exit_without_teardown(code: int = 0) -> None:
    """End a finished entry point's process at once: the atexit handlers (W&B, logging, multiprocessing) run and
    the standard streams are flushed, then the interpreter's teardown is skipped. Freeing torch's, dynamo's and
    W&B's modules object by object took about 1 s of every run on a 2-core CPU (docs/benchmarks.md), for memory
    the OS takes back anyway. Returns (a normal exit follows) while any non-daemon thread still runs."""
    main = threading.main_thread()
    if any(t.is_alive() and not t.daemon and t is not main for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()  # what a normal exit runs first; each handler runs once
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def require(cfg: Any, key: str, example: str) -> None:
    """Exit with one line when a mandatory field (`???` in the config) was not given on the command line."""
    from omegaconf import OmegaConf

    if OmegaConf.is_missing(cfg, key):
        fail(f"{key}= is required: {example}", 2)


def override_value(message: str, key: str) -> str:
    """`Error merging override trainer.epochs=abc` -> `abc`."""
    marker = f"{key}="
    return message.split(marker, 1)[1].strip() if marker in message else "?"


def exit_on_failure(
    error: BaseException, cfg: Any, resume_hint: Callable[[Path], str], skip_hint: Callable[[Path], str]
) -> NoReturn:
    """Inside a job: record the failure in the run dir, then exit with one line (a single run) or raise
    `SweepJobFailed` (a sweep job, so that Hydra marks it failed and goes on with the others)."""
    if isinstance(error, TrainingInterrupted):  # SIGTERM/SIGINT: a checkpoint was saved; stop (a whole sweep too)
        hint = f"\n  resume with: {resume_hint(error.run_dir)}" if error.checkpoint is not None else ""
        print(f"{error}{hint}", file=sys.stderr)
        sys.exit(error.exit_code)
    run_dir = run_directory(cfg)
    record_failure(run_dir, error)
    if (sweep_dir := sweep_directory()) is not None:
        log.error("job failed: %s: %s (the sweep goes on; see error.txt)", type(error).__name__, error)
        message = f"a job of the sweep failed: {type(error).__name__}: {error} (traceback: {run_dir / 'error.txt'})"
        raise SweepJobFailed(message, sweep_dir) from error
    if isinstance(error, ConfigError | CheckpointError):
        fail(str(error), 2)
    if isinstance(error, NonFiniteLossError) and error.checkpoint is not None:
        fail(f"{error}\n  skip such steps: {skip_hint(error.run_dir)}", 1)
    if isinstance(error, FloatingPointError):  # a non-finite loss, after saving the last good state
        fail(str(error), 1)
    raise error
