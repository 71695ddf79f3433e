"""The sync-free training step (trainer.sync_free, perceiver/training/deferred.py): no host read per step, the
same numbers as the per-step check, and the same stops (non-finite loss, SIGTERM) at the next read.

On the CPU the device path is chosen with `sync_free=True`; host reads are counted by patching the tensor
methods that read a value (`item`, `tolist`, `cpu`, `numpy`, `bool`, `float`, `int`).
"""

from __future__ import annotations

import math
import os
import signal
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from timm.optim import create_optimizer_v2

from perceiver import BatchAugment, Perceiver, TrainSettings, fit
from perceiver.data import ArrayDataset, DeviceBatches
from perceiver.training import TrainingParts
from perceiver.training.checkpoint import read_checkpoint
from perceiver.training.deferred import DeferredChecks, masked_update
from perceiver.training.signals import TrainingInterrupted
from perceiver.training.stopping import NonFiniteLossError
from tests.helpers.training import TINY_CLASSIFIER as MODEL
from tests.helpers.training import NaNAtCall, random_batches, tiny_problem, without_timing

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
OPTIMIZERS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "adam-fused": lambda model: torch.optim.Adam(model.parameters(), lr=1e-2, fused=True),  # found_inf
    "adam": lambda model: torch.optim.Adam(model.parameters(), lr=1e-2),  # parameters and state put back
    "lamb": lambda model: create_optimizer_v2(model, "lamb", lr=1e-2),  # timm: a host-side step count
}


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts every call of a tensor method that reads its value on the host."""
    counts: Counter = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def fit_counting(run_dir: Path, batches: int, reads: Counter, **settings) -> int:
    """Host reads during a 2-epoch fit of `batches` steps per epoch (fused Adam, as conf/optimizer/adam.yaml)."""
    torch.manual_seed(0)
    model = Perceiver(**MODEL)
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    options = {"epochs": 2, "progress_bar": False, "device": "cpu", "peak_tflops": None, "save_checkpoints": False}
    options.update(settings)
    train, val = random_batches(batches), random_batches(2)
    reads.clear()
    fit(TrainingParts(model, augment, optimizer, None, num_classes=2), train, val, TrainSettings(**options), run_dir)
    return sum(reads.values())


def test_the_device_path_reads_the_host_as_often_for_4_steps_an_epoch_as_for_16(
    tmp_path: Path, host_reads: Counter
) -> None:
    short = fit_counting(tmp_path / "a", 4, host_reads, sync_free=True, log_every_n_steps=1000)
    long = fit_counting(tmp_path / "b", 16, host_reads, sync_free=True, log_every_n_steps=1000)
    assert long == short, host_reads  # O(epochs): nothing read per step
    per_step_short = fit_counting(tmp_path / "c", 4, host_reads, sync_free=False, log_every_n_steps=1000)
    per_step_long = fit_counting(tmp_path / "d", 16, host_reads, sync_free=False, log_every_n_steps=1000)
    assert per_step_long - per_step_short >= 2 * 12  # the per-step check reads once a step (what is avoided)


def test_the_device_path_reads_once_or_twice_per_log_interval(tmp_path: Path, host_reads: Counter) -> None:
    short = fit_counting(tmp_path / "a", 4, host_reads, sync_free=True, log_every_n_steps=4)
    long = fit_counting(tmp_path / "b", 16, host_reads, sync_free=True, log_every_n_steps=4)
    intervals = 2 * 16 // 4  # two epochs
    assert long - short <= 2 * intervals < 2 * (16 - 4)  # the flags and the running loss, not a read per step


def fit_nan(run_dir: Path, optimizer: str, **settings):
    """test_checkpoint's tiny fit with NaN logits at the 5th training step (epoch 2, batch 2 of 3)."""
    torch.manual_seed(0)
    model = NaNAtCall(5, **MODEL)
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    train, val = tiny_problem()
    options = {"epochs": 3, "progress_bar": False, "device": "cpu", "early_stopping_patience": None, **settings}
    parts = TrainingParts(model, augment, OPTIMIZERS[optimizer](model), None, num_classes=2)
    return fit(parts, train, val, TrainSettings(**options), run_dir), model


@pytest.mark.parametrize(("optimizer", "every"), [("adam-fused", 1), ("adam-fused", 50), ("adam", 50), ("lamb", 50)])
def test_a_nan_loss_on_the_device_path_stops_where_the_per_step_check_does(
    tmp_path: Path, optimizer: str, every: int
) -> None:
    """Read at once (every=1) or at the epoch's end (every=50, a step later): the same stop, the same file."""
    with pytest.raises(NonFiniteLossError) as error:
        fit_nan(tmp_path, optimizer, sync_free=True, log_every_n_steps=every)
    message = str(error.value)
    assert "the training loss became nan at epoch 2, step 5 (batch 2 of 3)" in message
    path = tmp_path / "checkpoints" / "step-00000004.pt"
    assert f"saved in {path}" in message
    state = read_checkpoint(path)
    assert (state["next_epoch"], state["next_batch"], state["global_step"]) == (2, 1, 4)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert state["epoch_progress"]["metrics"]["count"] == 32  # batch 1 of epoch 2 only: later steps were halted


@pytest.mark.parametrize("optimizer", ["adam-fused", "adam"])
def test_skipping_on_the_device_gives_the_numbers_of_skipping_on_the_host(tmp_path: Path, optimizer: str) -> None:
    host, host_model = fit_nan(tmp_path / "host", optimizer, nonfinite_loss="skip", sync_free=False)
    device, device_model = fit_nan(tmp_path / "device", optimizer, nonfinite_loss="skip", sync_free=True)
    assert [row["train/skipped_steps"] for row in device.history] == [0, 1, 0]
    assert without_timing(device.history) == without_timing(host.history)
    for name, tensor in host_model.state_dict().items():
        assert torch.equal(tensor, device_model.state_dict()[name]), name


def test_skipping_with_lamb_keeps_the_weights_finite(tmp_path: Path) -> None:
    result, model = fit_nan(tmp_path, "lamb", nonfinite_loss="skip", sync_free=True)
    assert [row["train/skipped_steps"] for row in result.history] == [0, 1, 0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def quadratic_problem(optimizer: str) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, OPTIMIZERS[optimizer](model)


def backward(model: torch.nn.Linear, scaler: torch.amp.GradScaler, scale: float = 1.0) -> None:
    model.zero_grad(set_to_none=True)
    scaler.scale(model(torch.ones(1, 3)).square().sum() * scale).backward()


@pytest.mark.parametrize("mechanism", ["adam-fused", "adam", "lamb", "grad-scaler"])
def test_a_masked_update_leaves_parameters_and_state_alone_and_an_unmasked_one_steps(mechanism: str) -> None:
    model, optimizer = quadratic_problem("adam" if mechanism == "grad-scaler" else mechanism)
    scaler = torch.amp.GradScaler("cpu", enabled=mechanism == "grad-scaler")
    backward(model, scaler)
    masked_update(optimizer, scaler, torch.tensor(True))  # creates the optimizer's state
    before = [p.detach().clone() for p in model.parameters()]
    state = [v.clone() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    backward(model, scaler, scale=math.nan)
    masked_update(optimizer, scaler, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    after = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert all(torch.equal(a, b) for a, b in zip(state, after, strict=True))
    backward(model, scaler)
    masked_update(optimizer, scaler, torch.tensor(True))
    assert not torch.equal(before[0], model.weight)


def test_the_generic_path_decides_the_first_step_on_the_host_and_creates_no_state_for_a_bad_one() -> None:
    model, optimizer = quadratic_problem("adam")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    backward(model, scaler, scale=math.nan)
    masked_update(optimizer, scaler, torch.tensor(False))
    assert not optimizer.state and all(torch.isfinite(p).all() for p in model.parameters())


def test_deferred_checks_report_the_first_bad_step_and_halt_after_it() -> None:
    checks = DeferredChecks(torch.device("cpu"), halt_after_bad=True)
    losses = [1.0, math.inf, 2.0, math.nan]
    oks = [bool(checks.observe(torch.tensor(loss), batch)) for batch, loss in enumerate(losses, start=11)]
    assert oks == [True, False, False, False]
    report = checks.read()
    assert (report.count, report.batch, report.value, report.steps_since) == (2, 12, math.inf, 3)
    assert checks.read() is None and bool(checks.observe(torch.tensor(1.0), 15))  # read resets, halt lifted
    skipping = DeferredChecks(torch.device("cpu"), halt_after_bad=False)
    oks = [bool(skipping.observe(torch.tensor(loss), batch)) for batch, loss in enumerate(losses)]
    assert oks == [True, False, True, False]


class SignalAtCall(Perceiver):
    """Sends this process SIGTERM during its `call`-th training forward pass (a scheduler's preemption)."""

    def __init__(self, call: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls, self.call = 0, call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.call:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)


@pytest.mark.parametrize(("sync_free", "stopped_after"), [(False, 1), (True, 2)])
def test_a_stop_request_is_honoured_at_the_next_read(tmp_path: Path, sync_free: bool, stopped_after: int) -> None:
    torch.manual_seed(0)
    model = SignalAtCall(1, **MODEL)
    augment = BatchAugment(image_size=8, num_classes=2)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    train, val = tiny_problem()
    settings = TrainSettings(epochs=2, progress_bar=False, device="cpu", sync_free=sync_free, log_every_n_steps=2)
    parts = TrainingParts(model, augment, torch.optim.Adam(model.parameters(), fused=True), None, num_classes=2)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(parts, train, val, settings, tmp_path)
    assert f"after step {stopped_after};" in str(stop.value)
    assert read_checkpoint(tmp_path / "last.pt")["next_batch"] == stopped_after


def test_sync_free_settings() -> None:
    assert TrainSettings(device="cpu").checks_on_device(torch.device("cpu")) is False  # auto: the CPU checks per step
    assert TrainSettings(device="cpu").checks_on_device(torch.device("cuda")) is True
    assert TrainSettings(device="cpu", sync_free=True).checks_on_device(torch.device("cpu")) is True
    with pytest.raises(ValueError, match=r"trainer.sync_free='yes' is invalid: auto \(on CUDA\), true or false"):
        TrainSettings(device="cpu", sync_free="yes")


def cuda_syncs(run_dir: Path, batches: int) -> int:
    """The synchronisations torch's own detector reports during a 2-epoch fit on CUDA (sync_free by default)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = Perceiver(**MODEL).to(device)
    augment = BatchAugment(image_size=8, num_classes=2).to(device)
    augment.set_statistics([100.0] * 3, [60.0] * 3)
    data, held_out = random_batches(batches), random_batches(8)
    train = DeviceBatches(ArrayDataset(data.images.cpu(), data.labels.cpu()), 4, device, shuffle=True)
    val = DeviceBatches(ArrayDataset(held_out.images.cpu(), held_out.labels.cpu()), 4, device)
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    settings = TrainSettings(epochs=2, progress_bar=False, device="cuda", peak_tflops=None)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(TrainingParts(model, augment, optimizer, None, num_classes=2), train, val, settings, run_dir)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_training_step_never_synchronises(tmp_path: Path) -> None:
    """torch's own sync detector, on for a whole fit: twice the steps, not one synchronisation more (the epoch
    ends, validation and checkpoints synchronise; a training step and its step boundary never do)."""
    assert cuda_syncs(tmp_path / "a", 8) == cuda_syncs(tmp_path / "b", 16)
