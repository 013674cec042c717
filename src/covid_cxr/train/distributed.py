"""Data-parallel training under ``torchrun``: gloo on the CPU, NCCL on GPUs; rank 0 alone writes.

``torchrun --nproc_per_node N -m covid_cxr train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:func:`init_distributed` reads them (a plain launch is a world of one and needs no process group).

BatchNorm: on GPUs the model's BatchNorm layers become ``SyncBatchNorm``, so batch statistics
are over the global batch as in one process. ``SyncBatchNorm`` has no CPU kernel, so on the CPU
each rank normalises with its own slice's statistics. DDP broadcasts rank 0's buffers (running
statistics) at the start of every training forward, but that forward then updates each rank's
copy from its own slice, so after an epoch's last step the ranks hold different running
statistics; :func:`broadcast_buffers` gives every rank rank 0's (the ones saved) before validation.
CPU multi-process results therefore match one process closely but not bit for bit (see
``tests/test_train_distributed.py`` for the measured gap).

Ending a rank: DDP keeps its process group alive in C++ after ``destroy_process_group`` (torch 2.13:
the group's ``pt_gloo_runloop`` threads are still running at interpreter exit, measured), and a rank
that then goes through the interpreter's finalization can abort with "terminate called without an
active exception" (SIGABRT; seen once in CI, and 7 times in 130 launches of a two-rank DDP script
that ends right after a collective, with three busy processes on the two cores; none in 200 launches
ending with ``os._exit`` or :func:`end_rank`: ``benchmarks/torchrun_exit.py``). So ``covid-cxr`` ends
a process that joined a group with :func:`end_rank`: it flushes what the process wrote and leaves with
``os._exit``, skipping the finalization. A script of your own that trains under torchrun can end the
same way.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from covid_cxr.errors import ConfigError

T = TypeVar("T")

_joined = False  # this process has joined a process group (see end_rank)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_as_main() -> bool:
    """True in a plain launch and in torchrun's rank 0, before (or without) joining the process group."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (or return a world of one)."""
    global _joined
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    _joined = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def device_for(info: DistInfo, device: str) -> str:
    """The device string this rank runs on (each GPU rank on its own card)."""
    if info.backend == "nccl":
        return f"cuda:{info.local_rank}"
    return device


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP-wrap ``model`` (SyncBatchNorm on GPUs); unchanged in a world of one."""
    if not info.enabled:
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def broadcast_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) into every rank's ``model`` (nothing in a world of one).

    Validation runs the bare module, outside DDP's forward, so without this each rank would score
    its share of the images with the running statistics its own last training slice left.
    """
    if not info.enabled:
        return
    with torch.no_grad():
        for buffer in model.buffers():
            torch_dist.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (a copy; identity in a world of one)."""
    if not info.enabled:
        return tensor.clone()
    out = tensor.clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: T, info: DistInfo) -> T:
    """Rank 0's ``obj`` on every rank (picklable; ``obj`` itself in a world of one)."""
    if not info.enabled:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: T, info: DistInfo) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (picklable; ``[obj]`` in a world of one)."""
    if not info.enabled:
        return [obj]
    box: list[Any] = [None] * info.world_size
    torch_dist.all_gather_object(box, obj)
    return box


def barrier(info: DistInfo) -> None:
    if info.enabled:
        torch_dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def joined_a_group() -> bool:
    """Whether this process has joined a process group (its threads may outlive the group: see the module's notes)."""
    return _joined


def end_rank(code: int) -> NoReturn:
    """End this process with ``code`` now: flush logging and the standard streams, then ``os._exit`` (no finalization).

    Only for the end of a process whose work is done: ``atexit`` handlers do not run, and nothing is closed but
    what the operating system closes (the project's files are written atomically, the run folder's lock is an
    ``flock``, and the trainer closes its TensorBoard writer, so none of them needs more).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken pipe: nothing more can be said on it
    os._exit(code)
