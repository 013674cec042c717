"""Sizing ``covid-cxr demo`` to a time budget by what training costs on the machine it runs on.

Almost all of the demo's time is training steps and forward passes of the concatenated network, and
their speed differs 3-4x between the CPUs we meet: bf16 on AVX512-BF16/AMX CPUs against fp32 on an
AVX2-only Zen 2 (the README's demo took 8.7 min on the first and was projected at 30 min on the
second). So the demo times a few training steps and one evaluation batch here, at the start, projects
each plan's wall time from them and the prepared split sizes, and runs the largest plan that fits.
The data, the phases and the seed stay the same whatever the plan; only the image side and the
epochs per phase shrink.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from covid_cxr.config import CALIBRATION_COUNT
from covid_cxr.labels import CLASSES
from covid_cxr.models import build_model
from covid_cxr.runs.checkpoint import atomic_torch_save
from covid_cxr.runtime import Runtime


@dataclass(frozen=True)
class DemoPlan:
    """How much the demo trains: the image side and the epochs of each phase."""

    image_size: int
    epochs_per_phase: int

    def describe(self) -> str:
        return f"{self.image_size} px x {self.epochs_per_phase} epochs a phase"


# Largest first; the demo runs the first whose projected total fits the budget. The first is the demo the
# README measured (89.4% test accuracy, 8.7 min on 2 Zen 4 cores with bf16); each next one costs about
# 20-35% less (a step costs about the image area; validation runs every epoch).
PLANS: tuple[DemoPlan, ...] = (
    DemoPlan(96, 5), DemoPlan(96, 4), DemoPlan(84, 4), DemoPlan(72, 4), DemoPlan(72, 3), DemoPlan(72, 2),
)  # fmt: skip

EVAL_BATCH = 64  # the cpu preset's val_batch_size; evaluation runs at this batch
EXPORT_FIXED_S = 30.0  # ONNX export and int8 quantization besides their forward passes (about 35 s in all on Zen 4)
SKIP_MEASURING_OVER = 1.5  # an image size whose area-scaled projection is this far over the budget is not timed


@dataclass(frozen=True)
class SplitSizes:
    """Images in each training phase, the validation split (evaluated every epoch) and the test split."""

    phase_images: tuple[int, ...]
    val_images: int
    test_images: int


@dataclass(frozen=True)
class StepCost:
    """Seconds measured on this machine at one image size."""

    image_size: int
    train_step_s: float  # one training step (forward, backward, optimizer) at the demo's batch
    eval_image_s: float  # one image of an evaluation batch of EVAL_BATCH
    probe_s: float = 0.0  # what measuring took: spent from the budget
    # Writing one epoch's checkpoints as training does (last.pt with the optimizer's state, best.pt: 0.78 GB for
    # concat), fsynced: the same at every image size (the weights do not depend on it). An upper bound: best.pt is
    # written only in epochs that improve. Measured on the Sapphire Rapids VM: 1.6-2.3 s an epoch idle, 3.4-5.7 s
    # with three busy processes on its two cores, about 30 s of the 72 px x 2 demo's 16 epochs; left out, a slow
    # disk would push a plan past the budget unseen.
    epoch_save_s: float = 0.0


def projected_seconds(plan: DemoPlan, cost: StepCost, sizes: SplitSizes, batch_size: int) -> float:
    """Training (steps, validation and checkpoints each epoch), test evaluation and export of ``plan`` at ``cost``."""
    epochs = plan.epochs_per_phase * len(sizes.phase_images)
    steps = plan.epochs_per_phase * sum(math.ceil(n / batch_size) for n in sizes.phase_images)
    validation = epochs * sizes.val_images
    # export: calibration, then fp32 and int8 on the validation images (ONNX Runtime at about torch's speed)
    forwards = validation + sizes.test_images + CALIBRATION_COUNT + 2 * sizes.val_images
    return steps * cost.train_step_s + forwards * cost.eval_image_s + epochs * cost.epoch_save_s + EXPORT_FIXED_S


def choose_plan(
    measure: Callable[[int], StepCost], sizes: SplitSizes, batch_size: int, budget_s: float,
    plans: tuple[DemoPlan, ...] = PLANS,
) -> tuple[DemoPlan, list[tuple[DemoPlan, float]]]:  # fmt: skip
    """The first plan whose projection fits ``budget_s`` (else the last), and the projections made.

    ``measure`` is called once per image size, from the largest down, only as far as needed (a size that
    the area rule puts far over the budget is not timed, but the smallest plan's always is); the time
    measuring takes comes off the budget.
    """
    costs: dict[int, StepCost] = {}
    projections: list[tuple[DemoPlan, float]] = []
    for plan in plans:
        if plan.image_size not in costs and costs and plan.image_size != plans[-1].image_size:
            # Measuring a size takes a few steps: skip one that the area rule already puts far over the budget.
            estimate = _scaled(costs[min(costs)], plan.image_size)
            seconds = projected_seconds(plan, estimate, sizes, batch_size)
            if seconds > SKIP_MEASURING_OVER * budget_s:
                projections.append((plan, seconds))
                continue
        if plan.image_size not in costs:
            costs[plan.image_size] = measure(plan.image_size)
            budget_s -= costs[plan.image_size].probe_s
        seconds = projected_seconds(plan, costs[plan.image_size], sizes, batch_size)
        projections.append((plan, seconds))
        if seconds <= budget_s:
            return plan, projections
    return plans[-1], projections


def _scaled(cost: StepCost, image_size: int) -> StepCost:
    """``cost`` carried to another image side by the area (convolutions cost about the pixels they see)."""
    area = (image_size / cost.image_size) ** 2
    return StepCost(image_size, cost.train_step_s * area, cost.eval_image_s * area, epoch_save_s=cost.epoch_save_s)


def measure_step_cost(network: str, image_size: int, batch_size: int, runtime: Runtime, *, lr: float, steps: int = 3,
                      eval_batch: int = EVAL_BATCH, save_to: Path | None = None) -> StepCost:  # fmt: skip
    """Time ``steps`` training steps (after one warm-up) and one evaluation batch on random images; with ``save_to``
    (a folder on the disk the run will write to), also one epoch's checkpoint writes there (removed after).

    The median step is taken: a step of a busy machine's outlier should not pick the plan.
    """
    began = time.perf_counter()
    model = build_model(network, num_classes=len(CLASSES), image_size=image_size).to(runtime.device)
    memory = torch.channels_last if runtime.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory)
    optimizer = torch.optim.NAdam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, image_size, image_size, generator=gen).to(runtime.device, memory_format=memory)
    y = torch.randint(0, len(CLASSES), (batch_size,), generator=gen).to(runtime.device)
    times = []
    model.train()
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        _sync(runtime)
        times.append(time.perf_counter() - start)
    model.eval()
    batch = torch.rand(eval_batch, 3, image_size, image_size, generator=gen).to(runtime.device, memory_format=memory)
    with torch.inference_mode(), runtime.autocast():
        start = time.perf_counter()
        model(batch)
        _sync(runtime)
        eval_s = time.perf_counter() - start
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    save_s = _time_epoch_save(model, optimizer, save_to) if save_to is not None else 0.0
    return StepCost(image_size=image_size, train_step_s=step_s, eval_image_s=eval_s / eval_batch,
                    probe_s=time.perf_counter() - began, epoch_save_s=save_s)


def _time_epoch_save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> float:
    """Seconds to write what the trainer writes after an epoch (best.pt's weights, last.pt's weights and optimizer
    state), with the same atomic, fsynced writer, into ``folder``; the files are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / ".probe-best.pt", folder / ".probe-last.pt"]
    start = time.perf_counter()
    try:
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        atomic_torch_save({"weights": weights}, files[0])
        atomic_torch_save({"weights": weights, "train_state": {"optimizer": optimizer.state_dict()}}, files[1])
        return time.perf_counter() - start
    finally:
        for file in files:
            file.unlink(missing_ok=True)


def _sync(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
