"""`python -m bench step`'s plumbing (no timing is asserted): variants composed and built as train.py builds them,
timed in interleaved rounds, reported per variant against the first; a bad variant ends it before any timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import step

SMALL = "experiment=cpu_smoke"  # latent_dim 16, projection_dim 32
FEWER_LATENTS = "experiment=cpu_smoke model.latent_dim=8"
QUICK = ["--pairs", "2", "--steps", "1", "--warmup", "1"]


def test_rounds_time_every_variant_in_turn() -> None:
    assert step.schedule(2, 3) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert step.schedule(3, 1) == [(0, 0), (0, 1), (0, 2)]


def test_a_tiny_run_reports_both_variants_against_the_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "step.json"
    step.main([*QUICK, "--out", str(out), SMALL, FEWER_LATENTS])
    printed = capsys.readouterr().out
    assert f"command: `python -m bench step {' '.join(QUICK)} --out {out} {SMALL} '{FEWER_LATENTS}'`" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| `")]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{SMALL}`", f"| `{FEWER_LATENTS}`"]
    assert rows[0].endswith("| 1.000 [1.000, 1.000] |")  # the first against itself, in every round
    first, second = json.loads(out.read_text())["variants"]
    assert first["ratio_to_first"] == [1.0, 1.0] and first["median_ratio_to_first"] == 1.0
    assert len(second["images_per_second"]) == 2 and all(rate > 0 for rate in second["images_per_second"])
    assert first["params"] - second["params"] == (16 - 8) * 32  # the latent array: latent_dim x projection_dim
    assert first["batch_size"] == 64 and first["precision"] == "fp32" and first["compile"] is False
    assert first["train_flops_per_image"] > second["train_flops_per_image"] > 0


def test_the_steps_run_warm_up_first_then_in_interleaved_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def labelled_step(model, *_):  # the step of a variant, known by its parameter count
        params = sum(p.numel() for p in model.parameters())
        return lambda: calls.append(params)

    monkeypatch.setattr(step, "fixed_batch_step", labelled_step)
    step.main(["--pairs", "2", "--steps", "2", "--warmup", "1", SMALL, FEWER_LATENTS])
    a, b = calls[0], calls[1]
    assert a != b
    assert calls == [a, b, a, a, b, b, a, a, b, b]


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (f"{SMALL} model.latnt_dim=8", "latnt_dim"),  # does not compose
        ("experiment=nope", "choose one of cpu_smoke"),  # no such preset
        (f"{SMALL} model.image_size=15", "model.image_size=15 is not divisible"),  # composes, cannot be built
    ],
)
def test_a_bad_variant_ends_the_bench_naming_it_before_any_timing(
    monkeypatch: pytest.MonkeyPatch, bad: str, says: str
) -> None:
    def no_timing(*_):
        raise AssertionError("a step was timed")

    monkeypatch.setattr(step, "time_steps", no_timing)
    with pytest.raises(SystemExit) as ended:
        step.main([*QUICK, SMALL, bad])
    assert f"variant {bad!r}" in str(ended.value) and says in str(ended.value)


def test_variants_must_agree_on_what_is_set_for_the_whole_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(step, "time_steps", lambda *_: pytest.fail("a step was timed"))
    with pytest.raises(SystemExit, match=r"trainer\.keep_freed_memory is set for the whole process"):
        step.main([*QUICK, SMALL, f"{SMALL} trainer.keep_freed_memory=false"])
