"""Hydra launchers and the Optuna sweeper (conf/hydra/launcher/, conf/hparams_search/): a real 2-job
sweep through submitit's local executor, the SLURM launcher's real submission (its sbatch script and
pickled jobs) with a stand-in `sbatch`, the joblib launcher's one-GPU-per-job setting, and a real
2-trial Optuna search."""

from __future__ import annotations

import copy
import json
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import submitit
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import DelayedSubmission, JobPaths, UncompletedJobError

from tests.helpers import compose_config, job_dirs, offline_runs, run_script

TINY_JOBS = ["experiment=cpu_smoke", "logger.mode=offline", "trainer.epochs=1", "data.source.num_train=600"]


def python(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script("train.py", *arguments, timeout=timeout)


@pytest.fixture
def compose_with_hydra(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """conf/train.yaml with its `hydra` node (launcher, sweeper), as `python train.py --multirun ...` sees it;
    Hydra's singletons (HydraConfig, the plugins) are put back afterwards."""
    state = Singleton.get_state()

    def _compose(*overrides: str) -> DictConfig:
        return compose_config("train", f"paths.output_dir={tmp_path / 'outputs'}", *overrides, hydra_node=True)

    yield _compose
    Singleton.set_state(state)


def instantiate_launcher(cfg: DictConfig) -> Launcher:
    """The launcher as Hydra makes it for a multirun: instantiated from cfg.hydra.launcher, then set up."""
    context = HydraContext(config_loader=None, callbacks=None)  # type: ignore[arg-type]
    return Plugins.instance().instantiate_launcher(hydra_context=context, task_function=lambda _: None, config=cfg)


# --- submitit's local executor, for real ----------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_runs_through_submitits_local_executor(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "local_sweep"
    result = python(
        "--multirun", "hydra/launcher=local", *TINY_JOBS, "model.num_iterations=1,2", f"hydra.sweep.dir={sweep_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in result.stdout + result.stderr
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1"]

    # Each job ran in its own submitit process, which left its log and result pickle in the sweep dir.
    submitted = sorted(sweep_dir.glob(".submitit/*/*_result.pkl"))
    assert len(submitted) == 2
    logs = "".join(p.read_text() for p in sweep_dir.glob(".submitit/*/*_log.*"))
    assert logs.count("test: top1") == 2

    runs = [offline_runs(job) for job in jobs]
    assert [len(r) for r in runs] == [1, 1], "one W&B run per job"
    runs = [r[0] for r in runs]
    assert {run.group for run in runs} == {sweep_dir.name}
    assert [run.name for run in runs] == ["num_iterations=1", "num_iterations=2"]
    assert len({run.run_id for run in runs}) == 2
    for number, (job, run) in enumerate(zip(jobs, runs, strict=True)):
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["job_num"] == number == run.config["job_num"]
        assert metrics["settings"]["model"]["num_iterations"] == number + 1
        assert run.run_id == metrics["wandb_run_id"] and run.exit_code == 0
        assert run.summary["test/top1"] == pytest.approx(metrics["test"]["top1"])


# --- SLURM: the real submission, with a stand-in sbatch --------------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`srun` and `sbatch` on PATH that submit nothing; jobs report a result instead of waiting for SLURM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"srun": "exit 0", "sbatch": "echo 'Submitted batch job 4242'"}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setattr(submitit.SlurmJob, "results", lambda self: [JobReturn()])


def test_the_slurm_launcher_submits_a_job_array_with_the_configured_resources(
    compose_with_hydra: Callable[..., DictConfig], fake_slurm: None, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "slurm_sweep"
    cfg = compose_with_hydra(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "+hydra.launcher.additional_parameters.mail-type=END",
        f"hydra.sweep.dir={sweep_dir}",
    )
    launcher = instantiate_launcher(cfg)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["submitit_folder"] == f"{sweep_dir}/.submitit/%j"
    jobs = [["model.num_iterations=1"], ["model.num_iterations=2"]]
    assert len(launcher.launch(jobs, initial_job_idx=0)) == 2

    # The sbatch script that submitit handed to `sbatch`, kept as 4242_submission.sh.
    (script,) = sweep_dir.glob(".submitit/4242/*_submission.sh")
    lines = script.read_text().splitlines()
    sbatch = {
        line.split("=", 1)[0].removeprefix("#SBATCH --"): line.split("=", 1)[-1] for line in lines if "#SBATCH" in line
    }
    assert sbatch["partition"] == "gpu"
    assert sbatch["gpus-per-node"] == "1" and sbatch["nodes"] == "1" and sbatch["ntasks-per-node"] == "1"
    assert sbatch["cpus-per-task"] == "8" and sbatch["mem"] == "32GB"
    assert sbatch["time"] == "720"
    assert sbatch["array"] == "0-1%2", "one array task per job; at once: min(jobs, array_parallelism=64)"
    assert sbatch["signal"] == "USR2@120", "the signal submitit catches to requeue the job"
    assert sbatch["mail-type"] == "END"
    assert sbatch["job-name"] == "train"
    assert sbatch["output"] == f"{sweep_dir}/.submitit/%A_%a/%A_%a_0_log.out", "the jobs' logs in the sweep dir"
    assert any(line.startswith("srun") and f"{sys.executable} -u -m submitit.core._submit" in line for line in lines)

    # The pickled jobs: the launcher with each job's overrides and number (hence its job dir).
    for number, overrides in enumerate(jobs):
        paths = JobPaths(f"{sweep_dir}/.submitit/%j", job_id=f"4242_{number}")
        with paths.submitted_pickle.open("rb") as handle:
            delayed = pickle.load(handle)
        assert delayed.args[0] == overrides and delayed.args[2] == number
        # USR2 in the running job: submitit asks the launcher's `checkpoint` for the job to requeue, which
        # is the same job unchanged (train.py runs again in the same job dir), and calls `scontrol requeue`.
        assert requeue_on_usr2(delayed, paths, timed_out=False) == [3], "a preempted job is requeued, uncounted"
        with pickle_of(paths) as requeued:
            assert type(requeued.function).__name__ == "SlurmLauncher"
            assert requeued.args[:4] == (overrides, "hydra.sweep.dir", number, f"job_id_for_{number}")
        # A timed-out job is requeued too, max_num_timeout=3 times (it resumes from its newest checkpoint).
        assert requeue_on_usr2(delayed, paths, timed_out=True) == [2]
        delayed._timeout_countdown = 0  # type: ignore[attr-defined]  # the third requeue has been used
        with pytest.raises(UncompletedJobError, match="timed-out too many times"):
            requeue_on_usr2(delayed, paths, timed_out=True)


class FakeJobEnvironment:
    global_rank = 0

    def __init__(self) -> None:
        self.requeued: list[int] = []

    def _requeue(self, countdown: int) -> None:
        self.requeued.append(countdown)


def requeue_on_usr2(delayed: DelayedSubmission, paths: JobPaths, timed_out: bool) -> list[int]:
    """What submitit's handler does when the job gets USR2 (preemption, or signal_delay_s before its limit)."""
    environment = FakeJobEnvironment()
    handler = SignalHandler(environment, paths, delayed)  # type: ignore[arg-type]
    handler.has_timed_out = lambda: timed_out  # type: ignore[method-assign]
    handler._exit = lambda: None  # type: ignore[method-assign]
    handler.checkpoint_and_try_requeue(signal.SIGUSR2)
    return environment.requeued


@contextmanager
def pickle_of(paths: JobPaths) -> Iterator[DelayedSubmission]:
    with paths.submitted_pickle.open("rb") as handle:
        yield pickle.load(handle)


def test_the_slurm_config_composes_without_a_partition(compose_with_hydra: Callable[..., DictConfig]) -> None:
    launcher = compose_with_hydra("hydra/launcher=slurm").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition is None  # the cluster's default partition
    assert (launcher.timeout_min, launcher.max_num_timeout, launcher.gpus_per_node) == (720, 3, 1)


# --- joblib: several jobs at once, one GPU each ---------------------------------------------------------------


def test_the_parallel_launcher_gives_each_job_its_own_gpu(compose_with_hydra: Callable[..., DictConfig]) -> None:
    cfg = compose_with_hydra(
        "hydra/launcher=parallel", "hydra.launcher.n_jobs=4", "trainer.device=cuda:${hydra:job.num}"
    )
    launcher = instantiate_launcher(cfg)
    assert type(launcher).__name__ == "JoblibLauncher"
    assert launcher.joblib["n_jobs"] == 4 and launcher.joblib["prefer"] == "processes"
    for number in range(4):  # what each job's train.py resolves (the joblib launcher sets hydra.job.num)
        job = copy.deepcopy(cfg)
        with open_dict(job):
            job.hydra.job.num = number
        HydraConfig.instance().set_config(job)
        assert OmegaConf.to_container(job.trainer, resolve=True)["device"] == f"cuda:{number}"


# --- Optuna --------------------------------------------------------------------------------------------------


def hparams_search(name: str) -> str:
    return f"hparams_search={name}"


def test_the_optuna_search_composes_and_maximises_top1(compose_with_hydra: Callable[..., DictConfig]) -> None:
    cfg = compose_with_hydra(hparams_search("optuna"))
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.direction == "maximize" and sweeper.sampler.seed == cfg.seed
    assert cfg.ablation.name == "optuna"
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not a config field"


@pytest.mark.slow
def test_an_optuna_search_runs_and_reports_the_best_trial(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna_sweep"
    small = ["model.projection_dim=32", "model.num_iterations=1", "model.num_transformer_blocks=1"]
    result = python(
        "--multirun",
        hparams_search("optuna"),
        *TINY_JOBS,
        *small,  # fixed here: the trials search latent_dim (below), dropout_rate and lr (the config's own)
        "model.latent_dim=16,32",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1"]
    top1 = [json.loads((job / "metrics.json").read_text())["test"]["top1"] for job in jobs]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(top1))
    assert set(best["best_params"]) == {"model.latent_dim", "model.dropout_rate", "optimizer.lr"}
    runs = [run for job in jobs for run in offline_runs(job)]
    assert len(runs) == 2 and {run.group for run in runs} == {sweep_dir.name}
    assert {run.job_type for run in runs} == {"optuna"}
