"""The demo as library code: synthetic data -> prepare -> train -> evaluate -> report -> ONNX + int8.

The concatenated network is trained with the ``cpu`` preset on fold 1 through every phase of a synthetic
set made on the spot, evaluated on the fold's test split, reported, and exported (ONNX, and int8 checked
against it on the fold's validation images). Needs no data and no download. The default sizes its
training to a time budget on the machine it runs on: it times a few training steps first and picks the
largest plan of :data:`~covid_cxr.pipeline.budget.PLANS` that fits (:mod:`covid_cxr.pipeline.budget`);
a given plan fixes it. ``small`` (CI) is one fixed, smaller run of a few minutes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from covid_cxr.config import make_config
from covid_cxr.data.prepare import PrepareSettings, prepare_dataset
from covid_cxr.data.prepared import PreparedData
from covid_cxr.data.splits import SplitSettings
from covid_cxr.deploy.export import Int8Settings, export_checkpoint, int8_path
from covid_cxr.evaluate.run import evaluate_run
from covid_cxr.inference.settings import InferenceSettings
from covid_cxr.pipeline.budget import (
    PLANS,
    DemoPlan,
    SplitSizes,
    StepCost,
    choose_plan,
    measure_step_cost,
)
from covid_cxr.report.report import write_report
from covid_cxr.runtime import choose_runtime
from covid_cxr.synth import make_synthetic
from covid_cxr.train.runner import train_fold

BUDGET_SHARE = 0.95
"""Share of ``minutes`` the projected demo may take (the projection rests on a few timed steps, and is
conservative: the median step, a cold evaluation batch)."""


@dataclass(frozen=True)
class DemoSize:
    """How big the synthetic set and the training are."""

    n_covid: int
    n_pneumonia: int
    n_normal: int
    source_size: int  # RSNA DICOM side; covid-chestxray images get 35-90% of it
    phases: int
    batch_size: int
    plan: DemoPlan | None  # None: chosen on the machine, by a timed probe (see covid_cxr.pipeline.budget)


# The RSNA pools are large next to covid-chestxray, as in the real data: prepare draws each phase's
# normal and pneumonia images in the paper's proportions (250 of 8851, 200 of 6012).
SIZES: dict[str, DemoSize] = {
    "default": DemoSize(n_covid=120, n_pneumonia=760, n_normal=880, source_size=160, phases=8, batch_size=16,
                        plan=None),
    "small": DemoSize(n_covid=48, n_pneumonia=480, n_normal=560, source_size=96, phases=2, batch_size=12,
                      plan=DemoPlan(image_size=72, epochs_per_phase=8)),
}  # fmt: skip


def run_demo(out: Path, *, small: bool = False, seed: int = 0, device: str = "auto", precision: str = "auto",
             progress: bool = True, minutes: float = 10.0, plan: DemoPlan | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the pipeline into ``out``; returns the paths made, the plan, the test accuracy and the seconds taken.

    ``plan`` fixes the training size; without it (and without ``small``) the plan is the largest that
    this machine is projected to finish, demo included, in ``minutes``.
    """
    size = SIZES["small" if small else "default"]
    out = Path(out)
    run_dir = out / "runs" / "concat-fold1"
    if (run_dir / "run.json").exists():
        raise FileExistsError(f"{out} already holds a demo; give another --out or remove it")
    choose_runtime(device, precision)  # an unknown device is refused before minutes of data are written
    timings: dict[str, float] = {}
    start = time.perf_counter()
    synth = make_synthetic(out / "synthetic", seed=seed, n_covid=size.n_covid, n_pneumonia=size.n_pneumonia,
                           n_normal=size.n_normal, size=size.source_size)  # fmt: skip
    timings["synthetic"] = time.perf_counter() - start
    data = out / "data"
    plan = plan or size.plan
    t = time.perf_counter()

    def prepare(image_size: int) -> None:
        prepare_dataset(PrepareSettings(out=data, covid_chestxray=synth.covid_chestxray, rsna=synth.rsna,
                                        image_size=image_size, split=SplitSettings(phases=size.phases, seed=seed)),
                        progress=progress)  # fmt: skip

    prepare((plan or PLANS[0]).image_size)
    timings["prepare"] = time.perf_counter() - t
    if plan is None:
        t = time.perf_counter()
        plan = plan_for_budget(data, size, device, precision, minutes=minutes, elapsed_s=t - start, runs=out / "runs")
        timings["probe"] = time.perf_counter() - t
        if plan.image_size != PLANS[0].image_size:
            t = time.perf_counter()
            prepare(plan.image_size)  # the same splits; one more image cache
            timings["prepare"] += time.perf_counter() - t
    else:
        print(f"demo plan: {plan.describe()} ({'--small' if plan == size.plan else 'given'})", flush=True)
    config = make_config("cpu", data=str(data), network="concat", fold=1, image_size=plan.image_size,
                         epochs_per_phase=plan.epochs_per_phase, batch_size=size.batch_size, seed=seed,
                         device=device, precision=precision, out=str(out / "runs"), name=run_dir.name)  # fmt: skip
    t = time.perf_counter()
    train_fold(config, live=None if progress else False)
    timings["train"] = time.perf_counter() - t
    t = time.perf_counter()
    result = evaluate_run(run_dir, InferenceSettings(device=device, precision=precision), progress=progress, n_boot=200)
    timings["evaluate"] = time.perf_counter() - t
    t = time.perf_counter()
    report = write_report([run_dir], out / "report", n_boot=200)
    timings["report"] = time.perf_counter() - t
    t = time.perf_counter()
    onnx_path, int8_check = _export(run_dir / "best.pt", out / "deploy" / "concat.onnx")
    timings["export"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    return {
        "synthetic": synth.out, "data": data, "run": run_dir, "best": run_dir / "best.pt",
        "evaluation": result.out_dir, "report": report, "test_accuracy": float(result.metrics["accuracy"]),
        "test_accuracy_ci": (float(result.metrics["accuracy_ci_low"]), float(result.metrics["accuracy_ci_high"])),
        "balanced_accuracy": float(result.metrics["balanced_accuracy"]), "test_images": int(result.metrics["n"]),
        "onnx": onnx_path, "int8": int8_path(onnx_path), "int8_check": int8_check,
        "plan": plan, "seconds": timings,
    }  # fmt: skip


def plan_for_budget(data: Path, size: DemoSize, device: str, precision: str, *, minutes: float, elapsed_s: float,
                    runs: Path) -> DemoPlan:  # fmt: skip
    """Time the training step here and pick the largest plan projected to fit the budget; print why.

    ``runs``: the folder the run will write to, where one epoch's checkpoint writes are timed.
    """
    fold = PreparedData(data).fold(1)
    sizes = SplitSizes(tuple(len(p) for p in fold.phases), len(fold.val), len(fold.test))
    runtime = choose_runtime(device, precision)
    lr = make_config("cpu").lr
    costs: list[StepCost] = []

    def measure(image_size: int) -> StepCost:
        # the checkpoint writes are timed once, into the folder the run will write to (their cost is the weights')
        cost = measure_step_cost("concat", image_size, size.batch_size, runtime, lr=lr, save_to=None if costs else runs)
        if costs:
            cost = replace(cost, epoch_save_s=costs[0].epoch_save_s)
        costs.append(cost)
        return cost

    budget_s = minutes * 60 * BUDGET_SHARE - elapsed_s
    print(f"sizing the demo to {minutes:g} min: {budget_s / 60:.1f} min left for training, evaluation and export "
          f"({100 * (1 - BUDGET_SHARE):.0f}% kept as margin), timing the network on {runtime.describe()}", flush=True)
    plan, projections = choose_plan(measure, sizes, size.batch_size, budget_s)
    for cost in costs:
        print(f"  measured at {cost.image_size} px: {cost.train_step_s:.2f} s a training step of {size.batch_size}, "
              f"{1000 * cost.eval_image_s:.0f} ms an evaluated image (measuring took {cost.probe_s:.0f} s)")  # fmt: skip
    print(f"  measured: {costs[0].epoch_save_s:.1f} s to write an epoch's checkpoints (last.pt with the optimizer's "
          "state, and best.pt)")
    for candidate, seconds in projections:
        timed = any(cost.image_size == candidate.image_size for cost in costs)
        mark = "<- runs" if candidate == plan else "too long" if timed else "too long (by area from a timed size)"
        print(f"  {candidate.describe():<28} projected {seconds / 60:5.1f} min  {mark}")
    probed_s = sum(cost.probe_s for cost in costs)
    if projections[-1][1] > budget_s - probed_s:
        # ``plan`` is the smallest and runs: half its epochs trained a much weaker model when measured (RESULTS.md).
        shorter = f"{plan.image_size}x{plan.epochs_per_phase // 2}"
        hint = f" (--plan {shorter} trains half as long, for a weaker model)" if plan.epochs_per_phase > 1 else ""
        print(f"  even the smallest plan is projected over the budget on this machine: it runs anyway, about "
              f"{(elapsed_s + probed_s + projections[-1][1]) / 60:.1f} min in all{hint}")
    return plan


def _export(checkpoint: Path, onnx_path: Path) -> tuple[Path, dict[str, Any]]:
    """``covid-cxr export CHECKPOINT --int8``: the fp32 file and the int8 check stored in the int8 file."""
    result = export_checkpoint(checkpoint, onnx_path, int8=Int8Settings(), say=_stderr)
    if result.check is None:  # int8 settings were given, so export either checked int8 or raised
        raise RuntimeError(f"{checkpoint}: export wrote no int8 check")
    return result.onnx, result.check.as_dict()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
