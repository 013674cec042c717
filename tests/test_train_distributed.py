"""Two processes under torchrun (gloo, CPU) against one process on the same global batch.

Each rank gets its slice ``[rank::2]`` of the same global batch and the same augmentation draws,
and the loss scaling makes DDP's gradient average the global-batch mean, so the only difference
left is BatchNorm: on the CPU there is no SyncBatchNorm, so each rank normalises with its own
slice's statistics (on GPUs we convert to SyncBatchNorm). Dropout is off here (``drop_rate 0``)
because its masks are drawn per rank. Measured here (xception, 71 px, one global batch of 5 split
3 + 2 a phase, two phases): the distance between the two runs' weights is 0.105 (Zen 4) and 0.042
(Sapphire Rapids) of how far training moved them from the shared start; the test allows 0.25 (the
slices' BatchNorm statistics differ by sampling noise, which is larger for smaller slices).

The ranks' own BatchNorm statistics must not reach validation: each training forward updates every
rank's running statistics from its own slice, so after an epoch's last step the ranks hold different
ones, and a rank that validated with its own would score a model other than the one rank 0 saves.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist

from covid_cxr.cli import entry
from covid_cxr.config import TrainConfig
from covid_cxr.data.prepared import PreparedData
from covid_cxr.inference.int8 import cpu_features, describe_cpu
from covid_cxr.models import build_model
from covid_cxr.runs.checkpoint import load_checkpoint
from covid_cxr.train import runner
from covid_cxr.train.runner import Trainer, epoch_seed
from tests.test_train_runner import tiny_prepared

pytestmark = pytest.mark.slow


def _args(data: Path, out: Path, name: str | None, batch: int) -> list[str]:
    # gloo on the CPU: "auto" on a one-GPU machine would give rank 1 no card
    return ["train", str(data), "--network", "xception", "--preset", "cpu", "--image-size", "71", "--epochs-per-phase",
            "1", "--batch-size", str(batch), "--precision", "fp32", "--seed", "11", "--drop-rate", "0",
            "--out", str(out), *(["--name", name] if name else []), "--no-channels-last",
            "--device", "cpu"]  # fmt: skip


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.flatten().double() for k, v in state.items() if v.is_floating_point()])


LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# faulthandler: a rank that dies of a signal prints where each of its Python threads was
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def _failure(done: subprocess.CompletedProcess[str]) -> str:
    """What the ranks printed last, without torchrun's own traceback (which fills the tail), and the CPU."""
    err = done.stderr
    agent = err.rfind('Traceback (most recent call last):\n  File "<frozen runpy>"')
    summary = err[agent:].splitlines() if agent > 0 else []
    ranks = err[:agent] if agent > 0 else err
    lines = [line for line in summary if any(key in line for key in ("exitcode", "rank ", "traceback :"))]
    return (f"exit {done.returncode} on {describe_cpu(cpu_features())}\n--- stdout ---\n{done.stdout[-1500:]}\n"
            f"--- stderr ---\n{ranks[-5000:]}\n--- torchrun ---\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_prepared(tmp_path_factory.mktemp("prepared"))


def _one_batch(data: Path) -> int:
    return len(PreparedData(data).fold(1).phases[0])  # one uneven global batch a phase: 3 + 2 images


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUNS/ddp/xception-fold1: ``covid-cxr train`` under torchrun (2 ranks, gloo; no --name: the folder is named
    as it goes), each rank's BatchNorm buffers and run folder gathered after its last validation (RUNS/buffers.json);
    RUNS/single: the same run in one process."""
    out = tmp_path_factory.mktemp("runs")
    batch = _one_batch(data)
    for cmd in (
        [*LAUNCH, "-m", "tests.test_train_distributed", str(out / BUFFERS), *_args(data, out / "ddp", None, batch)],
        [sys.executable, "-m", "covid_cxr", *_args(data, out, "single", batch)],
    ):
        done = subprocess.run(cmd, env=ENV, cwd=Path(__file__).parents[1], capture_output=True, text=True,
                              timeout=900)  # fmt: skip
        assert done.returncode == 0, _failure(done)
        if cmd[0:len(LAUNCH)] == LAUNCH:
            (out / LAUNCH_OUT).write_text(done.stdout)
    return out


def test_torchrun_two_processes_match_one(runs: Path) -> None:
    assert sorted(p.name for p in runs.iterdir()) == sorted([BUFFERS, LAUNCH_OUT, "ddp", "single"])
    assert [p.name for p in (runs / "ddp").iterdir()] == ["xception-fold1"]  # rank 1 wrote nothing
    info = json.loads((runs / "ddp" / "xception-fold1" / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "finished"

    torch.manual_seed(epoch_seed(11, 0, 0))
    start = _flat(build_model("xception", 3, 71, drop_rate=0.0).state_dict())
    single = _flat(load_checkpoint(runs / "single" / "last.pt").model_state)
    ddp = _flat(load_checkpoint(runs / "ddp" / "xception-fold1" / "last.pt").model_state)
    moved = (single - start).norm()
    gap = (ddp - single).norm()
    print(f"torchrun 2 ranks vs 1 process: |w_ddp - w_1| / |w_1 - w_0| = {float(gap / moved):.4f}")
    assert moved > 0
    assert gap < 0.25 * moved, f"ddp vs single {gap / moved:.3f} of the training step"


def test_each_rank_ends_through_end_rank_with_its_output_flushed(runs: Path) -> None:
    """Both ranks ended through ``entry`` with status 0 (the fixture) and no finalization (an ``atexit`` line would
    say so), and each one's last line, printed as the command returns, reached torchrun (which starts ranks with
    ``python -u``; the flush for a block-buffered pipe is tested in test_entry.py)."""
    out = (runs / LAUNCH_OUT).read_text()
    assert out.count(f"run folder: {runs / 'ddp' / 'xception-fold1'}") == 2
    assert FINALIZED not in out


def test_every_rank_trains_the_folder_rank_0_named(runs: Path) -> None:
    """A new run's folder is named by rank 0 for all: rank 1, made to look after rank 0 had made its folder, used to
    take the next free name (xception-fold1-2), so each rank returned (and ``cv`` evaluated) its own folder."""
    result = json.loads((runs / BUFFERS).read_text())
    assert result["folders"] == [str(runs / "ddp" / "xception-fold1")] * 2


def test_torchrun_ranks_validate_with_rank_0s_batchnorm_statistics(runs: Path) -> None:
    """After the run (nothing changes buffers after an epoch's validation), every rank's buffers are rank 0's."""
    result = json.loads((runs / BUFFERS).read_text())
    assert result["world_size"] == 2 and result["buffers"] > 0
    assert result["moved"] > 0  # training changed the running statistics, so a rank's own would differ
    assert result["max_difference_from_rank_0"] == 0.0


def test_ranks_started_with_other_settings_are_refused_on_every_rank(data: Path, tmp_path: Path) -> None:
    """Rank 1 with another learning rate and epoch count trained beside rank 0 without a word (the record said rank
    0's settings), and the epochs that differed left rank 0 waiting for ever. Now every rank refuses, naming each
    setting that differs, before any folder is made."""
    argv = _args(data, tmp_path / "runs", "mixed", _one_batch(data))
    cmd = [*LAUNCH, "-m", "tests.test_train_distributed", RANK_1_ADDS, "--lr 0.01 --epochs-per-phase 2", *argv]
    done = subprocess.run(cmd, env=ENV, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, _failure(done)
    # Every rank refuses; whichever says so first ends the launch (torchrun then stops the other, which may not have
    # printed yet), and none is left waiting: the launch ended well inside the timeout.
    refusals = [line for line in done.stderr.splitlines() if "started with different settings" in line]
    assert refusals, _failure(done)
    assert "epochs_per_phase (rank 0: 1, rank 1: 2)" in refusals[0] and "lr (rank 0: " in refusals[0]
    agent = done.stderr.find('Traceback (most recent call last):\n  File "<frozen runpy>"')  # torchrun's own
    assert "Traceback" not in done.stderr[:agent if agent >= 0 else None], _failure(done)  # the ranks': one line
    assert not (tmp_path / "runs" / "mixed").exists()


FINALIZED = "this rank went through the interpreter's finalization"


def _train_gathering_buffers(buffers_json: Path, argv: list[str]) -> None:
    """(One process a rank, under torchrun.) ``covid-cxr train ARGV`` as the command line runs it; when the
    trainer is done, before the process group closes, rank 0 writes how far each rank's buffers are from its own."""
    run, name_run_dir = Trainer.run, runner._new_run_dir

    def name_after_rank_0(config: TrainConfig) -> Path:
        # Rank 1 names its folder only once rank 0's exists (rank 0 makes it as it takes the run's lock), the order
        # that made the ranks disagree; rank 0 goes on at once. No rank but 0 calls this once it names for all.
        out, deadline = Path(config.out), time.monotonic() + 60
        while os.environ.get("RANK", "0") != "0" and not (out.is_dir() and any(out.iterdir())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 made nothing in {out} in 60 s")
            time.sleep(0.05)
        return name_run_dir(config)

    def run_then_gather(trainer: Trainer) -> Path:
        start = torch.cat([b.double().flatten() for b in trainer.model.buffers()])
        folder = run(trainer)
        mine = torch.cat([b.double().flatten() for b in trainer.model.buffers()])
        every = [torch.empty_like(mine) for _ in range(trainer.dist.world_size)]
        torch_dist.all_gather(every, mine)
        folders: list[object] = [None] * trainer.dist.world_size
        torch_dist.all_gather_object(folders, str(folder))
        if trainer.dist.is_main:
            result = {"world_size": trainer.dist.world_size, "buffers": len(list(trainer.model.buffers())),
                      "moved": float((mine - start).abs().max()),
                      "max_difference_from_rank_0": max(float((b - every[0]).abs().max()) for b in every),
                      "folders": folders}  # fmt: skip
            buffers_json.write_text(json.dumps(result))
        return folder

    Trainer.run = run_then_gather  # type: ignore[method-assign]
    runner._new_run_dir = name_after_rank_0
    atexit.register(print, FINALIZED, flush=True)  # printed only if the rank ends through the finalization
    entry(argv)  # as the covid-cxr program ends a rank (distributed.end_rank)


BUFFERS = "buffers.json"
LAUNCH_OUT = "torchrun.stdout"

RANK_1_ADDS = "--rank-1-adds"  # the ranks started with different options: rank 1 adds these to the command

if __name__ == "__main__":  # run by torchrun from the fixture above and from the test of ranks that disagree
    if sys.argv[1] == RANK_1_ADDS:
        entry(sys.argv[3:] + (sys.argv[2].split() if os.environ.get("RANK") == "1" else []))
    _train_gathering_buffers(Path(sys.argv[1]), sys.argv[2:])
