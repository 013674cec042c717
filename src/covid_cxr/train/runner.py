"""One fold of the paper's phased training, from a prepared folder to a run folder.

The same model goes through the fold's phases in order, ``epochs_per_phase`` epochs each; after
every epoch it is scored on the validation split and ``best.pt`` keeps the best validation
accuracy so far (strictly better, as Keras' ``ModelCheckpoint(save_best_only=True)``).

The run folder (:class:`~covid_cxr.runs.folder.RunFolder`) gets ``config.yaml``, ``run.json``,
``log.csv``, ``tb/``, ``splits/``, ``best.pt`` and ``last.pt``. Every file is replaced atomically
or appended and fsynced, in the order best.pt -> log row -> last.pt, so a ``kill -9`` at any
moment leaves a folder that ``--resume`` continues from: ``last.pt`` says how many log rows are
real and the rest are dropped, and a ``best.pt`` of an epoch ``last.pt`` does not record (a stop
between the two) stays the best so far, so the run's record always names the epoch ``best.pt`` holds.

Each epoch's shuffle, augmentation draws and dropout masks come from seeds derived from
``(seed, epoch)``; with ``deterministic=True`` a resumed run therefore ends with the same weights
as an uninterrupted one. ``last.pt`` also carries the RNG states, for inspection and other tools.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import torch
from torch.utils.tensorboard import SummaryWriter

from covid_cxr import fmt
from covid_cxr.config import PRESETS, TrainConfig, dump_config, load_config
from covid_cxr.data.prepared import FoldSplits, ImageCache, PreparedData
from covid_cxr.errors import CheckpointError, ConfigError, DataError
from covid_cxr.labels import CLASSES
from covid_cxr.models import build_model
from covid_cxr.models.pretrained import load_imagenet_weights
from covid_cxr.networks import network_entry
from covid_cxr.operating_point import OperatingPoint
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runs.checkpoint import (
    Checkpoint,
    atomic_torch_save,
    checkpoint_meta,
    checkpoint_rule_and_meta,
    load_checkpoint,
    save_checkpoint,
)
from covid_cxr.runs.folder import RunFolder, RunInfo, now
from covid_cxr.runs.lock import hold_run, lock_path
from covid_cxr.runs.model_card import write_run_card
from covid_cxr.runtime import Runtime, choose_runtime
from covid_cxr.stats import Proportion
from covid_cxr.train import distributed
from covid_cxr.train.augment import Augmenter
from covid_cxr.train.engine import EpochStats, evaluate, train_one_epoch
from covid_cxr.train.loader import LoaderOptions, eval_loader, label_indices, train_loader
from covid_cxr.train.progress import Progress
from covid_cxr.train.run_log import append_log, log_row, truncate_log, write_scalars


@dataclass(frozen=True)
class PhaseData:
    rows: np.ndarray  # cache rows
    labels: np.ndarray  # class indices
    ids_sha1: str  # hash of the sorted image ids: proves which images a phase trained on


def ids_sha1(image_ids: Any) -> str:
    """Hash of the sorted image ids: the same set of images gives the same hash in any order."""
    return hashlib.sha1("\n".join(sorted(map(str, image_ids))).encode()).hexdigest()


def epoch_seed(seed: int, global_epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for one epoch and one random stream, independent of everything before it."""
    return int(np.random.SeedSequence([seed, global_epoch, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_epoch(seed: int, global_epoch: int, augmenter: Augmenter) -> None:
    """Seed every random stream an epoch draws from (torch, numpy, python, augmentation)."""
    torch.manual_seed(epoch_seed(seed, global_epoch, 1))
    np.random.seed(epoch_seed(seed, global_epoch, 2) % 2**32)
    random.seed(epoch_seed(seed, global_epoch, 3))
    augmenter.reseed(epoch_seed(seed, global_epoch, 4))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Keras Nadam as torch allows, from the network's recipe (betas) and the settings (lr, epsilon, schedule)."""
    return torch.optim.NAdam(
        model.parameters(),
        lr=config.lr,
        betas=network_entry(config.network).optimizer.betas,
        eps=config.nadam_eps,
        momentum_decay=config.nadam_momentum_decay,
    )


def resume_config(run_dir: Path, network: str | None = None) -> TrainConfig:
    """The saved settings of the run folder ``run_dir``; refuses to resume it as another ``network``."""
    folder = RunFolder(run_dir)
    if not folder.config.is_file():
        raise DataError(f"{run_dir}: not a run folder (no config.yaml); give the folder 'covid-cxr train' made")
    saved = load_config(folder.config)
    if network and network != saved.network:
        raise ConfigError(
            f"{run_dir} is a {saved.network} run; it cannot be resumed as {network} "
            f"(drop --network or pass --network {saved.network})"
        )
    return saved


def train_fold(
    config: TrainConfig,
    *,
    resume: str | os.PathLike[str] | None = None,
    stream: TextIO | None = None,
    live: bool | None = None,
) -> Path:
    """Train one fold as ``config`` says (or continue the run folder ``resume``); returns the run folder."""
    folder: RunFolder | None = None
    if resume is not None:
        folder = RunFolder(resume)
        config = resume_config(folder.root, config.network)
        if folder.info().status == "finished":
            print(f"{folder.root}: already finished; nothing to resume", file=stream)
            return folder.root

    dist = distributed.init_distributed(config.device)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        trainer = Trainer(config, folder, dist, stream=stream, live=live)
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        torch.use_deterministic_algorithms(deterministic_before)  # a library call leaves global state as it was
        distributed.shutdown(dist)


def _new_run_dir(config: TrainConfig) -> Path:
    """RUNS/NAME (refused when it holds a run), or the first free RUNS/NETWORK-foldK[-n]."""
    out = Path(config.out)
    if config.name:
        run_dir = out / config.name
        if RunFolder(run_dir).exists():
            raise FileExistsError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --name"
            )
        if run_dir.exists() and (not run_dir.is_dir() or any(p != lock_path(run_dir) for p in run_dir.iterdir())):
            # a folder of other files (a copied best.pt, someone's log.csv): training would overwrite them
            raise FileExistsError(f"{run_dir} holds files that are not a covid-cxr run (no run.json); choose another "
                                  "--name, or move those files away")
        return run_dir
    base = f"{config.network}-fold{config.fold}"
    run_dir, n = out / base, 1
    while run_dir.exists():
        n += 1
        run_dir = out / f"{base}-{n}"
    return run_dir


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (``path`` itself or an ancestor); None if it does."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_unstarted(root: Path, made: Path | None) -> None:
    """Take back a new run folder that failed before writing anything: its lock file, then the folder if empty,
    and the empty folders above it that this run made (``made``: the outermost, from :func:`_first_missing`), so
    that a refused ``train --out RUNS`` leaves no empty RUNS behind."""
    if RunFolder(root).exists():
        return
    lock_path(root).unlink(missing_ok=True)
    if made is None:
        return
    for folder in (root, *root.parents):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            return
        if folder == made:
            return


def _phase_data(frame: pd.DataFrame, cache: ImageCache, where: str) -> PhaseData:
    ids = frame["image_id"].tolist()
    return PhaseData(cache.rows(ids), label_indices(frame["label"].tolist(), where=where), ids_sha1(ids))


def _load_phases(root: Path, fold: FoldSplits, cache: ImageCache) -> tuple[list[PhaseData], PhaseData]:
    """The fold's phases (in order) and validation split as cache rows and class indices."""
    phases = [_phase_data(f, cache, f"{root} fold {fold.fold} phase {i}") for i, f in enumerate(fold.phases, start=1)]
    val = _phase_data(fold.val, cache, f"{root} fold {fold.fold} validation split")
    if not phases or any(len(p.rows) == 0 for p in phases) or len(val.rows) == 0:
        raise DataError(f"{root}: fold {fold.fold} has an empty phase or validation split; run covid-cxr prepare again")
    return phases, val


def _rng_states(augmenter: Augmenter) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": list(random.getstate()[1]),
        "augment": augmenter.generator.get_state(),
    }


@contextlib.contextmanager
def _sigterm_ends_the_run() -> Iterator[None]:
    """SIGTERM (``timeout``, ``docker stop``, a batch scheduler's limit) ends the run as an exception would, so the
    run says "stopped" as after a Ctrl-C, and exits 143 as the signal would; the handler before is put back.
    Only the main thread can set one: elsewhere (a library call from a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Trainer:
    """One fold's run: data, model and folder are set up on construction; :meth:`run` trains every epoch left.

    ``folder`` is the run folder to resume (None: a new one under ``config.out``). Only the main
    process of a data-parallel run writes files.
    """

    def __init__(self, config: TrainConfig, folder: RunFolder | None, dist: distributed.DistInfo, *,
                 stream: TextIO | None = None, live: bool | None = None) -> None:  # fmt: skip
        self.dist = dist
        self.resuming = folder is not None
        self._resolve_data(config)
        self._check_ranks_agree(folder)
        self._set_global_flags()
        self.runtime: Runtime = choose_runtime(distributed.device_for(dist, self.config.device), self.config.precision,
                                               self.config.channels_last)  # fmt: skip
        self.phases, self.val = _load_phases(self.data_root, self.fold, self.cache)
        self.pre = Preprocessing(image_size=self.config.image_size, scaling=self.config.scaling, channels=3)
        if folder is None:
            folder = RunFolder(self._agreed_new_run_dir())
            self.config = replace(self.config, name=folder.name)
        self._lock = contextlib.ExitStack()  # the run folder's lock (main process): released by close()
        self._holds_lock = False
        self._made: Path | None = None  # the outermost folder a new run made for itself (set under the lock)
        try:
            self._set_up(folder, stream, live)
        except BaseException:
            if not self.resuming and self._holds_lock:
                _remove_unstarted(folder.root, self._made)  # holding the lock still: no one else uses that file
            self.close()
            raise

    def _agreed_new_run_dir(self) -> Path:
        """The new run's folder, named by rank 0 for every rank (or its refusal, raised on every rank).

        Ranks that named it themselves disagreed: a rank that looked after rank 0 had made the folder
        took the next free name, so ``train`` returned, and ``cv`` evaluated, a folder nothing wrote.
        """
        choice: Path | FileExistsError | None = None
        if self.dist.is_main:
            try:
                choice = _new_run_dir(self.config)
            except FileExistsError as exc:
                choice = exc
        choice = distributed.broadcast_object(choice, self.dist)
        if isinstance(choice, FileExistsError):
            raise choice
        assert choice is not None
        return choice

    def _set_up(self, folder: RunFolder, stream: TextIO | None, live: bool | None) -> None:
        """Everything after the folder is chosen, under its lock: no other process trains or calibrates it."""
        dist = self.dist
        if dist.is_main:
            fix = (f"wait for it to end, or stop it, then continue with --resume {folder.root}" if self.resuming else
                   "choose another --name, or start again without --name (the next free name is taken)")
            self._made = None if self.resuming else _first_missing(folder.root)  # what _remove_unstarted may take
            self._lock.enter_context(hold_run(folder.root, "training it", fix))
            self._holds_lock = True
        last = self._last_checkpoint(folder) if self.resuming else None
        if self.resuming:
            self._check_resumed_splits(folder, last)
        self.folder = folder
        earlier = folder.info() if self.resuming and folder.exists() else None  # run.json of the epochs before
        self.warnings = [w for w in (self.config.scaling_warning(), self._precision_change(earlier),
                                     self._world_size_change(earlier)) if w]
        for warning in self.warnings if dist.is_main else ():
            print(f"warning: {warning}", file=sys.stderr)
        self._build(last)
        self.best_note = self._best_on_disk() if self.resuming else None
        self.dropped_rule = self._calibrated_best() if self.resuming and dist.is_main else None
        self.epochs = self.config.epochs_per_phase
        self.total_epochs = len(self.phases) * self.epochs
        self.writer: SummaryWriter | None = None
        self.progress = Progress(self.total_epochs, num_phases=len(self.phases), stream=stream, live=live,
                                 enabled=dist.is_main)  # fmt: skip

    def close(self) -> None:
        """Close TensorBoard's event file (a failed or interrupted run keeps its last events) and release the run
        folder's lock (idempotent)."""
        writer = getattr(self, "writer", None)  # None where the constructor failed before making it
        if writer is not None:
            writer.close()
        self._lock.close()

    # -- set-up ---------------------------------------------------------------------------------

    def _resolve_data(self, config: TrainConfig) -> None:
        """The prepared folder, the fold (range checked by PreparedData.fold) and the cache at the input size."""
        self.data_root = Path(config.data).resolve()
        self.prepared = PreparedData(self.data_root)
        self.fold = self.prepared.fold(config.fold)
        try:
            self.cache = self.prepared.cache(config.image_size)
        except DataError as exc:
            preset_size = PRESETS[config.preset].get("image_size")
            if config.image_size is None or config.image_size != preset_size:
                raise
            raise DataError(f"{exc} (the {config.preset} preset trains at {preset_size} px; or give --image-size "
                            "with a size the folder has)") from None
        self.config = replace(config.resolved(image_size=int(self.cache.image_size)), data=str(self.data_root))
        if self.config.image_size != int(self.cache.image_size):
            raise DataError(f"{self.data_root} has no {self.config.image_size} px cache; prepare it with "
                            f"--image-size {self.config.image_size}")
        if self.config.batch_size < self.dist.world_size:
            raise ConfigError(
                f"batch size {self.config.batch_size} is smaller than the {self.dist.world_size} processes"
            )

    def _check_ranks_agree(self, folder: RunFolder | None) -> None:
        """Every torchrun rank trains rank 0's settings on rank 0's splits, or none trains.

        Ranks started with other options trained together without a word: rank 1 on fold 2 (whose training
        images hold fold 1's test images) at 100 times the learning rate, recorded as rank 0's run; other epoch
        counts left rank 0 waiting for ever at the end. Raised on every rank alike, so none is left waiting.
        (A rank whose data cannot be read at all stops before this; torchrun then ends the others.)
        """
        # Paths may differ between machines (another mount point): the splits' hash says whether the data agree.
        mine = {**{k: v for k, v in self.config.to_dict().items() if k not in ("data", "out")},
                "splits (hash)": self.fold.split_hash[:12], "resuming": folder is not None}
        everyone = distributed.all_gather_object(mine, self.dist)
        differ = [f"{key} (rank 0: {everyone[0].get(key)}, rank {rank}: {theirs.get(key)})"
                  for rank, theirs in enumerate(everyone[1:], start=1)
                  for key in sorted(set(everyone[0]) | set(theirs)) if theirs.get(key) != everyone[0].get(key)]
        if differ:
            shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
            raise ConfigError(f"the torchrun processes were started with different settings: {shown}; start every "
                              "process with the same command and data")

    def _set_global_flags(self) -> None:
        """Deterministic kernels (or cuDNN autotuning); :func:`train_fold` restores the deterministic flag."""
        if self.config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = True

    def _last_checkpoint(self, folder: RunFolder | None) -> Checkpoint | None:
        """The resumed run's last.pt (None for a new run, or a run killed before its first epoch ended)."""
        if folder is None or not folder.last.exists():
            return None
        last = load_checkpoint(folder.last)
        if last.network != self.config.network:
            raise CheckpointError(f"{folder.last} holds a {last.network} network, the run says {self.config.network}")
        return last

    def _precision_change(self, earlier: RunInfo | None) -> str | None:
        """A warning when a resumed run continues in another precision than its earlier epochs ran in.

        ``precision: auto`` resolves per machine (bf16 where the CPU has it natively, fp32 elsewhere), so a run
        started on one CPU and resumed on another mixes the two without a word otherwise.
        """
        if earlier is None:
            return None
        before = re.search(r"precision=(\w+)", earlier.runtime or "")
        if before is None or before.group(1) == self.runtime.precision:
            return None
        return (f"resumed in {self.runtime.precision} ({self.runtime.describe()}), but the epochs before ran in "
                f"{before.group(1)}: this run mixes precisions, and --deterministic cannot reproduce an "
                "uninterrupted run; resume it on a machine like the one that started it to keep one precision")

    def _world_size_change(self, earlier: RunInfo | None) -> str | None:
        """A warning when a resumed run goes on in another number of processes than its earlier epochs ran in.

        run.json records the new number alone, so a run started under torchrun and resumed in one process looked
        like a one-process run; the warning, kept in run.json's warnings, says it was not.
        """
        if earlier is None:
            return None
        before = earlier.world_size
        if before is None or before == self.dist.world_size:
            return None
        how = f"torchrun --nproc_per_node {before} ... covid-cxr train --resume" if before > 1 else "one process"
        return (f"resumed in {self.dist.world_size} process(es), but the epochs before ran in {before}: each step's "
                "batch is split otherwise (and on the CPU BatchNorm normalises other slices), so --deterministic "
                f"cannot reproduce an uninterrupted run; resume it in {how} to keep one")

    def _check_resumed_splits(self, folder: RunFolder, last: Checkpoint | None) -> None:
        """Refuse to resume on splits other than those the run trained on (``DATA`` prepared again since).

        Its earlier epochs saw the old phases: on new splits some of them may be test images now,
        and evaluation could no longer tell, so the run must go on with the data it started with.
        """
        recorded = [(str(folder.run_file), folder.info().split_hash if folder.exists() else None)]
        recorded.append((str(folder.last), last.meta.get("split_hash") if last is not None else None))
        now_hash = self.fold.split_hash
        for where, trained_on in recorded:
            if trained_on and trained_on != now_hash:
                raise DataError(
                    f"{folder.root}: cannot resume: the run trained on fold {self.config.fold} splits "
                    f"{trained_on[:12]} ({where}) but {self.data_root} now has splits {now_hash[:12]} for that fold "
                    "(prepared again since); images it trained on may be test images now. Restore the prepared data "
                    "the run used (same datasets and seed), or start a new run on this data without --resume"
                )

    def _new_model(self, pretrained: bool) -> torch.nn.Module:
        """The network with the run's dropout and BatchNorm momentum; ImageNet weights when asked and ``pretrained``."""
        config = self.config
        model = build_model(config.network, num_classes=len(CLASSES), image_size=config.image_size,
                            drop_rate=config.drop_rate)  # fmt: skip
        if config.bn_momentum is not None:
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.momentum = config.bn_momentum
        if pretrained and config.pretrained == "imagenet":
            load_imagenet_weights(model, weights_file=[Path(p) for p in config.weights_files] or None)
        return model

    def _build(self, last: Checkpoint | None) -> None:
        """Model (initial weights from ``seed``, or last.pt's), its wrappers, optimizer, scaler and progress so far."""
        torch.manual_seed(epoch_seed(self.config.seed, 0, 0))
        model = self._new_model(pretrained=last is None)  # the weights come from last.pt: no ImageNet download
        if last is not None:
            model.load_state_dict(last.model_state)
        model = model.to(self.runtime.device)
        if self.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = make_optimizer(model, self.config)
        self.scaler = torch.amp.GradScaler(self.runtime.device.type) if self.runtime.precision == "fp16" else None
        state = dict(last.train_state or {}) if last is not None else {}
        if state:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        net = distributed.wrap_model(model, self.dist, self.runtime.device)
        self.net = torch.compile(net) if self.config.compile else net
        self.augmenter = Augmenter(self.config.augment, seed=self.config.seed)
        self.done = int(state.get("epochs_done", 0))
        self.log_rows = int(state.get("log_rows", 0))
        self.best_acc = float(state.get("best_val_accuracy", -1.0))
        self.best_epoch: int | None = state.get("best_epoch")

    def _best_on_disk(self) -> str | None:
        """Take best.pt as the best so far when it holds an epoch last.pt never recorded; a note saying so.

        best.pt is written before last.pt, so a run stopped between the two leaves best.pt holding epoch N
        while last.pt's bookkeeping still names an earlier epoch. That epoch N is trained again, and a rerun
        that is not bit-identical (another CPU, another precision) may score lower; the best so far must be
        the file on disk, or run.json and the model card would name an epoch best.pt does not hold.
        """
        best = self.folder.best
        if not best.is_file():
            return None
        meta = checkpoint_meta(best)
        epoch, accuracy = meta.get("global_epoch"), meta.get("val_accuracy")
        if epoch is None or accuracy is None or int(epoch) <= self.done:
            return None
        self.best_acc, self.best_epoch = float(accuracy), int(epoch)
        last = f"last.pt ends at epoch {self.done}" if self.done else "no last.pt was saved"
        return (f"{best} holds epoch {epoch} (validation accuracy {fmt.percent(accuracy, 2, fraction=True)}) but "
                f"{last} (the run stopped between saving the two): best.pt stays the best so far; training goes on "
                f"from epoch {self.done + 1}, and an epoch replaces best.pt only by scoring higher")

    def _calibrated_best(self) -> str | None:
        """The warning to give when a better epoch replaces a best.pt that ``calibrate`` gave a decision rule.

        The rule's threshold was chosen on that epoch's probabilities; carried over to other weights it
        would no longer hold the sensitivity it promises, so the new best.pt is saved without it (argmax).
        """
        if not self.folder.best.is_file():
            return None
        stored, meta = checkpoint_rule_and_meta(self.folder.best)
        if not stored or stored.get("rule", "argmax") == "argmax":
            return None
        rule = OperatingPoint.from_dict(stored).name
        return (f"best.pt had the decision rule {rule}, calibrated for the weights of epoch "
                f"{meta.get('global_epoch', '?')}; the better epoch that replaces it is "
                f"saved without it (argmax): choose it again for the new weights with 'covid-cxr calibrate "
                f"{self.folder.root} --operating-point {rule}' once training ends")

    # -- the run folder -------------------------------------------------------------------------

    def _info(self) -> RunInfo:
        """run.json for this run now (a resumed run keeps its start time and any keys a newer version wrote)."""
        old = self.folder.info() if self.resuming and self.folder.exists() else RunInfo()
        c = self.config
        return old.replace(
            network=c.network, fold=c.fold, data=str(self.data_root), protocol=self.prepared.protocol,
            split_hash=old.split_hash or self.fold.split_hash,  # resumed: the hash it trained on (checked equal)
            image_size=c.image_size, preset=c.preset, batch_size=c.batch_size,
            world_size=self.dist.world_size, runtime=self.runtime.describe(), num_phases=len(self.phases),
            epochs_per_phase=self.epochs, total_epochs=self.total_epochs, status="running", epochs_done=self.done,
            best_epoch=self.best_epoch, best_val_accuracy=self.best_acc if self.best_epoch is not None else None,
            started=old.started or now(), finished=None,
            warnings=list(dict.fromkeys([*(old.warnings or []), *self.warnings])) or None,  # a resume adds, never drops
        )  # fmt: skip

    def _open_folder(self) -> None:
        """Write config.yaml, run.json and the split files; cut log.csv back to last.pt's rows; open TensorBoard."""
        folder = self.folder
        folder.root.mkdir(parents=True, exist_ok=True)
        dump_config(self.config, folder.config,
                    extra={"runtime": self.runtime.describe(), "world_size": self.dist.world_size})  # fmt: skip
        self.info = self._info()
        folder.write_info(self.info)
        if not self.resuming or not folder.splits.is_dir():  # resumed: the splits checked equal to the copies
            self._copy_split_files()
        truncate_log(folder.log, self.log_rows)
        self.writer = SummaryWriter(str(folder.tensorboard), purge_step=self.done if self.resuming else None)

    def _copy_split_files(self) -> None:
        """The fold's split files into RUN/splits, so the run says exactly which images it used."""
        dest = self.folder.splits
        dest.mkdir(parents=True, exist_ok=True)
        for item in (self.fold.paths or {}).values():
            src = Path(item)
            if src.is_file():
                shutil.copy2(src, dest / src.name)

    # -- training -------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train every epoch not yet done; returns the run folder."""
        with _sigterm_ends_the_run():
            try:
                if self.dist.is_main:
                    self._open_folder()
                self.progress.message(f"{'resuming' if self.resuming else 'training'} {self.config.network} "
                                      f"fold {self.config.fold} -> {self.folder.root}")  # fmt: skip
                self.progress.message(f"runtime: {self.runtime.describe()}; world size {self.dist.world_size}; "
                                      f"{self.total_epochs} epochs")  # fmt: skip
                if self.best_note:
                    self.progress.message(self.best_note)
                for global_epoch in range(self.done, self.total_epochs):
                    self._epoch(global_epoch)
            except BaseException:
                self._mark_stopped()
                raise
        if self.dist.is_main:
            self._finish()
        distributed.barrier(self.dist)
        return self.folder.root

    def _loader_options(self) -> LoaderOptions:
        return LoaderOptions(rank=self.dist.rank, world=self.dist.world_size, workers=self.config.workers,
                             prefetch=self.config.prefetch, pin_memory=self.runtime.device.type == "cuda")  # fmt: skip

    def _epoch(self, global_epoch: int) -> None:
        """Train on the epoch's phase, score on validation, and (main process) save and log."""
        config, phase_idx, epoch_idx = self.config, *divmod(global_epoch, self.epochs)
        phase = self.phases[phase_idx]
        seed_epoch(config.seed, global_epoch, self.augmenter)
        self.progress.start_epoch(phase_idx + 1, epoch_idx + 1, self.epochs, global_epoch)
        batches = train_loader(self.cache.images, phase.rows, phase.labels, batch_size=config.batch_size,
                               seed=config.seed, epoch=global_epoch, options=self._loader_options())  # fmt: skip
        train = train_one_epoch(self.net, batches, self.optimizer, preprocessing=self.pre, runtime=self.runtime,
                                augmenter=self.augmenter if config.augment.enabled else None, dist=self.dist,
                                scaler=self.scaler, on_batch=self.progress.on_batch)  # fmt: skip
        distributed.broadcast_buffers(self.model, self.dist)  # every rank validates the model rank 0 saves
        val_batches = eval_loader(self.cache.images, self.val.rows, self.val.labels,
                                  batch_size=config.val_batch_size, options=self._loader_options())  # fmt: skip
        val = evaluate(self.model, val_batches, preprocessing=self.pre, runtime=self.runtime, dist=self.dist)
        improved = val.accuracy > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = val.accuracy, global_epoch + 1
        self.done = global_epoch + 1
        if self.dist.is_main:
            self._save(phase_idx, epoch_idx, train, val, improved)
        self.progress.end_epoch(train, val, best=improved)

    def _save(self, phase_idx: int, epoch_idx: int, train: EpochStats, val: EpochStats, improved: bool) -> None:
        """best.pt (when improved) -> log row -> last.pt -> run.json: each step leaves a resumable folder."""
        meta = {"run": self.folder.name, "fold": self.config.fold, "phase": phase_idx + 1, "epoch": epoch_idx + 1,
                "global_epoch": self.done, "val_accuracy": val.accuracy, "val_loss": val.loss,
                "split_hash": self.fold.split_hash, "data": str(self.data_root),
                "protocol": self.prepared.protocol}  # fmt: skip
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        ckpt = Checkpoint(self.config.network, CLASSES, self.pre, weights, meta=meta)
        if improved:
            save_checkpoint(ckpt, self.folder.best)
            if self.dropped_rule:
                self.progress.message(f"warning: {self.dropped_rule}")
                self.warnings.append(self.dropped_rule)  # run.json keeps it: the card and report show it
                self.info = self.info.replace(warnings=list(dict.fromkeys([*(self.info.warnings or []),
                                                                           self.dropped_rule])))
                self.dropped_rule = None
        phase = self.phases[phase_idx]
        row = log_row(phase_idx, epoch_idx, self.done, train, val, self.optimizer, len(phase.rows), phase.ids_sha1)
        append_log(self.folder.log, row)
        train_state = {
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "epochs_done": self.done, "best_val_accuracy": self.best_acc, "best_epoch": self.best_epoch,
            "log_rows": self.done, "rng": _rng_states(self.augmenter),
        }  # fmt: skip
        atomic_torch_save(replace(ckpt, train_state=train_state).to_dict(), self.folder.last)
        write_scalars(self.writer, row, self.done)
        self.info = self.info.replace(epochs_done=self.done, best_epoch=self.best_epoch,
                                      best_val_accuracy=self.best_acc)  # fmt: skip
        self.folder.write_info(self.info)

    def _mark_stopped(self) -> None:
        """run.json says "stopped" for a run ended by an interrupt or an error (a kill -9 leaves "running")."""
        if not self.dist.is_main or getattr(self, "info", None) is None:
            return
        with contextlib.suppress(OSError):  # the error that stopped the run is the one to report
            self.info = self.info.replace(status="stopped")
            self.folder.write_info(self.info)
        # a SIGTERM ends with status 143 and no word of its own: say where the run stands and how to go on
        done = f"{self.done} of {self.total_epochs} epochs done" if hasattr(self, "total_epochs") else "stopped"
        print(f"training stopped ({done}; run.json says 'stopped'); continue it with 'covid-cxr train --resume "
              f"{self.folder.root}'" + (" under the same torchrun launch" if self.dist.enabled else ""),
              file=sys.stderr, flush=True)

    def _finish(self) -> None:
        """Mark the run finished, write its model card, close TensorBoard."""
        self.info = self.info.replace(status="finished", finished=now())
        self.folder.write_info(self.info)
        write_run_card(self.folder.root)  # MODEL_CARD.md; 'covid-cxr model-card RUN' refreshes it after evaluate/audit
        if self.writer is not None:
            self.writer.close()
        best = Proportion.of_fraction(self.best_acc, len(self.val.rows))  # accuracy over every validation image
        self.progress.message(f"finished: best validation accuracy {fmt.counted(best)} at epoch {self.best_epoch}; "
                              f"best.pt in {self.folder.root}")
