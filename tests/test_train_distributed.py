"""Two processes under torchrun (gloo, CPU) against one process on the same global batch.

Each rank gets its slice ``[rank::2]`` of the same global batch and the same augmentation draws,
and the loss scaling makes DDP's gradient average the global-batch mean, so the only difference
left is BatchNorm: on the CPU there is no SyncBatchNorm, so each rank normalises with its own
slice's statistics (on GPUs we convert to SyncBatchNorm). Dropout is off here (``drop_rate 0``)
because its masks are drawn per rank. Measured here (xception, 71 px, one global batch of 5 split
3 + 2 a phase, two phases): the distance between the two runs' weights is 0.105 of how far training
moved them from the shared start; the test allows 0.25 (the slices' BatchNorm statistics differ by
sampling noise, which is larger for smaller slices).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from covid_cxr.models import build_model
from covid_cxr.runs.checkpoint import load_checkpoint
from covid_cxr.train.runner import epoch_seed
from tests.test_train_runner import tiny_prepared

pytestmark = pytest.mark.slow


def _args(data: Path, out: Path, name: str, batch: int) -> list[str]:
    # gloo on the CPU: "auto" on a one-GPU machine would give rank 1 no card
    return ["train", str(data), "--network", "xception", "--preset", "cpu", "--image-size", "71", "--epochs-per-phase",
            "1", "--batch-size", str(batch), "--precision", "fp32", "--seed", "11", "--drop-rate", "0",
            "--out", str(out), "--name", name, "--no-channels-last",
            "--device", "cpu"]  # fmt: skip


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten().double() for k, v in state.items() if v.is_floating_point()])


def test_torchrun_two_processes_match_one(tmp_path: Path) -> None:
    data = tiny_prepared(tmp_path)
    from covid_cxr.data.prepared import PreparedData

    batch = len(PreparedData(data).fold(1).phases[0])  # one uneven global batch a phase: 3 + 2 images
    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "covid_cxr"]
    for cmd in (
        launch + _args(data, out, "ddp", batch),
        [sys.executable, "-m", "covid_cxr", *_args(data, out, "single", batch)],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    assert sorted(p.name for p in out.iterdir()) == ["ddp", "single"]  # rank 1 wrote nothing
    info = json.loads((out / "ddp" / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "finished"

    torch.manual_seed(epoch_seed(11, 0, 0))
    start = _flat(build_model("xception", 3, 71, drop_rate=0.0).state_dict())
    single = _flat(load_checkpoint(out / "single" / "last.pt").model_state)
    ddp = _flat(load_checkpoint(out / "ddp" / "last.pt").model_state)
    moved = (single - start).norm()
    gap = (ddp - single).norm()
    print(f"torchrun 2 ranks vs 1 process: |w_ddp - w_1| / |w_1 - w_0| = {float(gap / moved):.4f}")
    assert moved > 0
    assert gap < 0.25 * moved, f"ddp vs single {gap / moved:.3f} of the training step"
