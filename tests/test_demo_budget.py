"""Sizing the demo to a time budget: the projection, the choice of plan and ``--plan``, on made-up costs."""

from __future__ import annotations

import argparse

import pytest

from covid_cxr.cli.demo import parse_plan
from covid_cxr.pipeline.budget import PLANS, DemoPlan, SplitSizes, StepCost, choose_plan, projected_seconds
from covid_cxr.runtime import choose_runtime

SIZES = SplitSizes(phase_images=(176,) * 8, val_images=80, test_images=1175)  # the default demo's fold 1


def _area_cost(step_at_96: float) -> callable:
    """A machine whose step and forward costs scale with the image area; records the sizes measured."""
    measured: list[int] = []

    def measure(size: int) -> StepCost:
        measured.append(size)
        scale = (size / 96) ** 2
        return StepCost(size, train_step_s=step_at_96 * scale, eval_image_s=step_at_96 / 48 * scale)

    measure.measured = measured  # type: ignore[attr-defined]
    return measure


def test_projection_counts_steps_validation_checkpoints_test_and_export() -> None:
    cost = StepCost(96, train_step_s=1.0, eval_image_s=0.01, epoch_save_s=2.0)
    # 8 phases x 11 steps x 5 epochs; validation 5 x 8 x 80, test 1175, export 64 + 2 x 80 images; 40 epochs' writes
    expected = 440 * 1.0 + (3200 + 1175 + 64 + 160) * 0.01 + 40 * 2.0 + 30.0
    assert projected_seconds(DemoPlan(96, 5), cost, SIZES, 16) == pytest.approx(expected)
    assert projected_seconds(DemoPlan(96, 4), cost, SIZES, 16) < projected_seconds(DemoPlan(96, 5), cost, SIZES, 16)


def test_plans_shrink_in_cost_and_the_first_is_the_measured_demo() -> None:
    assert PLANS[0] == DemoPlan(96, 5)
    costs = [projected_seconds(p, _area_cost(1.0)(p.image_size), SIZES, 16) for p in PLANS]
    assert all(a > b for a, b in zip(costs, costs[1:]))


@pytest.mark.parametrize(("step_at_96", "expected"), [(0.5, PLANS[0]), (1.5, DemoPlan(72, 4)), (3.4, DemoPlan(72, 2)),
                                                   (20.0, PLANS[-1])])
def test_the_largest_plan_that_fits_is_chosen(step_at_96: float, expected: DemoPlan) -> None:
    """A fast machine gets the full demo, a slower one a smaller plan projected inside the budget."""
    budget = 8.5 * 60
    measure = _area_cost(step_at_96)
    plan, projections = choose_plan(measure, SIZES, 16, budget)
    assert plan == expected
    index = len(projections) - 1
    assert projections[index][0] == plan  # it stops at the plan it chose...
    assert all(seconds > budget for _, seconds in projections[:index])  # ...after every larger one was too long
    assert projections[index][1] <= budget or plan == PLANS[-1]  # nothing fits: the smallest runs (and is said so)
    # each size is measured once, from the largest down, only as far as the choice needed
    assert measure.measured == sorted(set(measure.measured), reverse=True) and measure.measured[-1] == plan.image_size
    if step_at_96 >= 3.4:  # far over at 96 px: 84 px is not timed, the smallest plan's 72 px is
        assert measure.measured == [96, 72]


def test_the_time_spent_measuring_comes_off_the_budget() -> None:
    cost = StepCost(96, train_step_s=1.0, eval_image_s=0.01)
    full = projected_seconds(PLANS[0], cost, SIZES, 16)
    cheap = {"probe_s": 0.0}

    def measure(size: int) -> StepCost:
        return StepCost(size, cost.train_step_s * (size / 96) ** 2, cost.eval_image_s, probe_s=cheap["probe_s"])

    assert choose_plan(measure, SIZES, 16, full + 5)[0] == PLANS[0]
    cheap["probe_s"] = 10.0  # measuring took longer than the 5 s to spare
    assert choose_plan(measure, SIZES, 16, full + 5)[0] == PLANS[1]


def test_plan_option() -> None:
    assert parse_plan("96x5") == DemoPlan(96, 5) and parse_plan("72X2") == DemoPlan(72, 2)
    for bad in ("96", "96x0", "64x5", "ax5", "96x", "5000x1"):
        with pytest.raises(argparse.ArgumentTypeError, match="SIDExEPOCHS"):
            parse_plan(bad)


def test_small_and_plan_are_refused_together(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from covid_cxr.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--small", "--plan", "72x2"]) == 2
    assert "--small or --plan" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("option", "said"), [
    (["--device", "gpu"], "unknown device 'gpu'"),
    (["--minutes", "inf"], "--minutes must be a number of minutes above 0"),
])
def test_a_bad_option_is_refused_before_any_data_is_written(tmp_path, capsys: pytest.CaptureFixture[str],
                                                             option: list[str], said: str) -> None:
    """An unknown device was met only at training, after the synthetic data and prepare, and what they left behind
    then blocked the corrected command ("already holds files")."""
    from covid_cxr.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--plan", "72x1", *option]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_measured_step_cost_is_positive(tmp_path) -> None:
    """The probe itself runs a real network's training step and evaluation batch and times them; given a folder, it
    also times one epoch's checkpoint writes there and leaves nothing behind."""
    from covid_cxr.pipeline.budget import measure_step_cost

    runtime = choose_runtime("cpu", "fp32")
    small = measure_step_cost("xception", 71, 2, runtime, lr=1e-4, steps=1, eval_batch=2)
    assert small.image_size == 71 and small.train_step_s > 0 and small.eval_image_s > 0 and small.epoch_save_s == 0
    saved = measure_step_cost("xception", 71, 2, runtime, lr=1e-4, steps=1, eval_batch=2, save_to=tmp_path / "runs")
    assert saved.epoch_save_s > 0 and list((tmp_path / "runs").iterdir()) == []


def test_the_demo_prints_what_it_measured_and_chose(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """On a prepared set, the demo reads the split sizes, probes as far as needed and says why it chose."""
    from covid_cxr.pipeline import demo
    from tests.test_train_runner import tiny_prepared

    data = tiny_prepared(tmp_path)
    seen: list[tuple[int, int]] = []

    def fake_measure(network: str, image_size: int, batch_size: int, runtime, *, lr: float, save_to=None) -> StepCost:
        seen.append((image_size, batch_size, save_to))
        return StepCost(image_size, train_step_s=75.0 * (image_size / 96) ** 2, eval_image_s=0.01,
                        epoch_save_s=2.5 if save_to else 0.0)  # fmt: skip

    monkeypatch.setattr(demo, "measure_step_cost", fake_measure)
    plan = demo.plan_for_budget(data, demo.SIZES["default"], "cpu", "fp32", minutes=10, elapsed_s=30,
                                runs=tmp_path / "runs")  # fmt: skip
    printed = capsys.readouterr().out
    # 5 training images a phase, 2 phases: one step of 16 a phase and epoch; 75 s a step at 96 px
    # the checkpoint writes are timed once, into the folder the run will write to
    assert plan == DemoPlan(84, 4) and seen == [(96, 16, tmp_path / "runs"), (84, 16, None)]
    assert "measured at 96 px: 75.00 s a training step of 16" in printed and "<- runs" in printed
    assert "2.5 s to write an epoch's checkpoints" in printed
    assert printed.count("too long") == 2 and "precision=fp32" in printed


def test_a_machine_too_slow_for_every_plan_is_told_how_long_the_smallest_takes(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Nothing fits: the smallest plan runs, and the demo says about how long it takes in all and what is shorter."""
    from covid_cxr.data.prepared import PreparedData
    from covid_cxr.pipeline import demo
    from tests.test_train_runner import tiny_prepared

    data = tiny_prepared(tmp_path)
    cost = {size: StepCost(size, train_step_s=400.0, eval_image_s=0.5, probe_s=20.0) for size in (96, 84, 72)}
    monkeypatch.setattr(demo, "measure_step_cost", lambda network, image_size, *a, **k: cost[image_size])
    plan = demo.plan_for_budget(data, demo.SIZES["default"], "cpu", "fp32", minutes=10, elapsed_s=30,
                                runs=tmp_path / "runs")  # fmt: skip
    printed = capsys.readouterr().out
    assert plan == PLANS[-1] == DemoPlan(72, 2)
    fold = PreparedData(data).fold(1)
    sizes = SplitSizes(tuple(len(p) for p in fold.phases), len(fold.val), len(fold.test))
    total_min = (30 + 2 * 20.0 + projected_seconds(plan, cost[72], sizes, 16)) / 60  # elapsed, two probes, the plan
    assert f"it runs anyway, about {total_min:.1f} min in all (--plan 72x1 trains half as long" in printed
