"""One run on several processes: each rank's shard of the data, and a real `torchrun --nproc_per_node=2`
on the CPU (Gloo) against a single process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perceiver.data import ArrayDataset, DeviceBatches, EpochSampler, Shard
from tests.helpers import REPO, environment
from tests.helpers.wandb_files import read_offline_run

# No randomness besides the data order, so one process and two must compute the same thing.
EXACT = [
    "experiment=cpu_smoke",
    "trainer.epochs=2",
    "augmentation=none",
    "model.dropout_rate=0",
    "model.attention_dropout_rate=0",
    "model.logit_dropout=false",
    "trainer.deterministic=true",
]


@pytest.mark.parametrize("count", [20, 21, 23])
def test_training_shards_are_disjoint_equal_and_interleave_into_the_global_batches(count: int) -> None:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(count))
    world, per_rank_batch = 2, 3
    shards = [Shard(rank, world, even=True).select(order) for rank in range(world)]
    assert len(shards[0]) == len(shards[1]) == count // world, "every rank must take the same number of steps"
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    global_batch = per_rank_batch * world
    for i in range(count // world // per_rank_batch):
        single = order[i * global_batch : (i + 1) * global_batch]
        ranks = torch.cat([shard[i * per_rank_batch : (i + 1) * per_rank_batch] for shard in shards])
        assert sorted(ranks.tolist()) == sorted(single.tolist()), f"global batch {i} differs"


def test_evaluation_shards_cover_every_image_once() -> None:
    order = torch.arange(11)
    shards = [Shard(rank, 3, even=False).select(order).tolist() for rank in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))
    assert [Shard(rank, 3, even=False).length(11) for rank in range(3)] == [len(s) for s in shards]


def test_loaders_serve_each_rank_its_own_images() -> None:
    dataset = ArrayDataset(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.arange(10))
    seen = []
    for rank in range(2):
        loader = DeviceBatches(dataset, 2, torch.device("cpu"), shuffle=True, seed=1, shard=Shard(rank, 2))
        assert len(loader) == 3
        seen.append(torch.cat([labels for _, labels in loader]).tolist())
        sampler = EpochSampler(10, shuffle=True, seed=1, shard=Shard(rank, 2))
        assert list(sampler) == seen[-1], "the DataLoader path shards like the device-resident one"
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 5


@pytest.mark.slow
def test_torchrun_on_two_cpu_ranks_equals_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    def run(*command: str, run_dir: Path) -> dict:
        result = subprocess.run(
            [*command, *EXACT, f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env=environment(OMP_NUM_THREADS="1"),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((run_dir / "metrics.json").read_text())

    single = run(sys.executable, "train.py", "logger=none", "trainer.batch_size=64", run_dir=tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    double = run(*torchrun, "logger.mode=offline", "trainer.batch_size=32", run_dir=tmp_path / "two")

    # Float sums are reduced in another order (gradients averaged over ranks), so equal within 1e-4.
    assert double["test"]["loss"] == pytest.approx(single["test"]["loss"], rel=1e-4)
    assert abs(double["test"]["top1"] - single["test"]["top1"]) <= 2 / 500  # at most 2 of 500 test images
    for one, two in zip(single["history"], double["history"], strict=True):
        for key in ("train/loss", "train/top1", "val/loss", "val/top1"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    # Rank 0 alone wrote: one run dir, one W&B run with the global numbers.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    (wandb_file,) = (tmp_path / "two").glob("wandb/offline-run-*/run-*.wandb")
    recorded = read_offline_run(wandb_file)
    assert [row["epoch"] for row in recorded.history] == [1, 2]
    assert recorded.history[-1]["val/loss"] == pytest.approx(double["history"][-1]["val/loss"])
