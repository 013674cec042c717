"""How often a two-rank DDP process aborts at exit, ending through Python's finalization or through ``end_rank``.

With torch 2.13, ``DistributedDataParallel`` keeps its gloo process group alive in C++ after
``destroy_process_group`` (the group's ``pt_gloo_runloop`` threads are still running at exit), and a rank
that goes through the interpreter's finalization with them can abort with "terminate called without an
active exception" (SIGABRT). CI met it once at the end of the torchrun test. This launches, ``--launches``
times for each ending, two ranks under ``torchrun`` that build a DDP model, run one object and one tensor
all-gather, destroy the group and end, while ``--busy`` processes spin on the CPU (the abort is a race:
rare on an idle machine), and counts the launches that failed.

    python -m benchmarks.torchrun_exit [--launches 50] [--busy 3]

Measured (Sapphire Rapids VM, 2 cores, three busy processes, 2026-12-06): with an earlier form of this script,
through the finalization 7 aborts in 130 launches, ``os._exit`` / ``end_rank`` none in 200; this script at 60
launches each, none either way (the abort is rare and uneven). RESULTS.md has the table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RANK = """
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
dist.init_process_group("gloo")
model = DistributedDataParallel(torch.nn.Linear(4, 2))  # keeps the group's threads alive past destroy
del model
gathered = [None, None]
dist.all_gather_object(gathered, "x" * 100)
tensors = [torch.zeros(100) for _ in range(2)]
dist.all_gather(tensors, torch.ones(100))
dist.destroy_process_group()
if sys.argv[1] == "end_rank":
    from covid_cxr.train.distributed import end_rank

    end_rank(0)
"""

ENDINGS = ("finalization", "end_rank")


def launch(script: Path, ending: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), ending]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=50, help="launches for each ending (default 50)")
    parser.add_argument("--busy", type=int, default=3, help="busy processes on the CPU meanwhile (default 3)")
    args = parser.parse_args(argv)
    from benchmarks.machine import describe_machine

    machine = describe_machine()
    print(f"{machine['cpu_model']}, {machine['physical_cores']} cores ({' '.join(machine['flags'])}), torch "
          f"{machine['torch']}; {args.busy} busy processes", flush=True)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "rank.py"
            script.write_text(RANK)
            for ending in ENDINGS:
                failed = [done for done in (launch(script, ending) for _ in range(args.launches)) if done.returncode]
                aborts = sum("terminate called without an active exception" in done.stderr for done in failed)
                print(f"{ending:>12}: {len(failed)} of {args.launches} launches failed ({aborts} with 'terminate "
                      f"called without an active exception')", flush=True)
    finally:
        for process in busy:
            process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
