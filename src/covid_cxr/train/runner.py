"""One fold of the paper's phased training, from a prepared folder to a run folder.

The same model goes through the fold's phases in order, ``epochs_per_phase`` epochs each; after
every epoch it is scored on the validation split and ``best.pt`` keeps the best validation
accuracy so far (strictly better, as Keras' ``ModelCheckpoint(save_best_only=True)``).

A run folder ``RUNS/<name>/`` holds ``config.yaml`` (resolved settings and the runtime),
``run.json`` (status and best epoch), ``log.csv`` (one row per epoch), ``tb/`` (TensorBoard),
``splits/`` (the fold's split files), ``best.pt`` and ``last.pt``. Every file is replaced
atomically or appended and fsynced, in the order best.pt -> log row -> last.pt, so a ``kill -9``
at any moment leaves a folder that ``--resume`` continues from: ``last.pt`` says how many log rows
are real and the rest are dropped.

Each epoch's shuffle, augmentation draws and dropout masks come from seeds derived from
``(seed, epoch)``; with ``deterministic=True`` a resumed run therefore ends with the same weights
as an uninterrupted one. ``last.pt`` also carries the RNG states, for inspection and other tools.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from covid_cxr.runs.checkpoint import Checkpoint, atomic_torch_save, load_checkpoint, save_checkpoint
from covid_cxr.config import TrainConfig, dump_config, load_config
from covid_cxr.errors import CheckpointError, ConfigError, DataError
from covid_cxr.labels import CLASSES
from covid_cxr.preprocess import Preprocessing
from covid_cxr.runtime import Runtime, choose_runtime
from covid_cxr.train import distributed
from covid_cxr.train.augment import Augmenter
from covid_cxr.train.engine import EpochStats, evaluate, train_one_epoch
from covid_cxr.train.loader import eval_loader, label_indices, train_loader
from covid_cxr.train.progress import Progress

LOG_COLUMNS = (
    "phase", "epoch", "global_epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "lr", "images_per_s", "seconds", "phase_images", "phase_ids_sha1",
)  # fmt: skip


@dataclass(frozen=True)
class PhaseData:
    rows: np.ndarray  # cache rows
    labels: np.ndarray  # class indices
    ids_sha1: str  # hash of the sorted image ids: proves which images a phase trained on


def ids_sha1(image_ids: Any) -> str:
    return hashlib.sha1("\n".join(sorted(map(str, image_ids))).encode()).hexdigest()


def epoch_seed(seed: int, global_epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for one epoch and one random stream, independent of everything before it."""
    return int(np.random.SeedSequence([seed, global_epoch, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_epoch(seed: int, global_epoch: int, augmenter: Augmenter) -> None:
    torch.manual_seed(epoch_seed(seed, global_epoch, 1))
    np.random.seed(epoch_seed(seed, global_epoch, 2) % 2**32)
    random.seed(epoch_seed(seed, global_epoch, 3))
    augmenter.reseed(epoch_seed(seed, global_epoch, 4))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Keras Nadam as torch allows: same betas, epsilon 1e-7 and 0.004 momentum schedule."""
    return torch.optim.NAdam(
        model.parameters(),
        lr=config.lr,
        betas=(0.9, 0.999),
        eps=config.nadam_eps,
        momentum_decay=config.nadam_momentum_decay,
    )


# -- run folder files ---------------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable run file ({exc}); is this a covid-cxr run folder?") from exc


def _truncate_log(path: Path, rows: int) -> None:
    """Keep the header and the first ``rows`` epoch rows (later ones are from after the last save)."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    keep = lines[: 1 + rows] if lines else []
    text = "".join(keep) or (",".join(LOG_COLUMNS) + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append_log(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=LOG_COLUMNS).writerow(row)
        fh.flush()
        os.fsync(fh.fileno())


def _new_run_dir(config: TrainConfig) -> Path:
    out = Path(config.out)
    if config.name:
        run_dir = out / config.name
        if (run_dir / "run.json").exists():
            raise FileExistsError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --name"
            )
        return run_dir
    base = f"{config.network}-fold{config.fold}"
    run_dir, n = out / base, 1
    while run_dir.exists():
        n += 1
        run_dir = out / f"{base}-{n}"
    return run_dir


def _copy_split_files(paths: Any, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    items = paths.values() if isinstance(paths, dict) else (paths or [])
    for item in items:
        src = Path(item)
        if src.is_file():
            shutil.copy2(src, dest / src.name)


# -- the run -------------------------------------------------------------------------------------


def _rng_states(augmenter: Augmenter) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": list(random.getstate()[1]),
        "augment": augmenter.generator.get_state(),
    }


def _phase_data(frame: Any, cache: Any, where: str) -> PhaseData:
    ids = frame["image_id"].tolist()
    return PhaseData(cache.rows(ids), label_indices(frame["label"].tolist(), where=where), ids_sha1(ids))


def _load_phases(root: Path, fold: Any, cache: Any) -> tuple[list[PhaseData], PhaseData]:
    """The fold's phases (in order) and validation split as cache rows and class indices."""
    phases = [_phase_data(f, cache, f"{root} fold {fold.fold} phase {i}") for i, f in enumerate(fold.phases, start=1)]
    val = _phase_data(fold.val, cache, f"{root} fold {fold.fold} validation split")
    if not phases or any(len(p.rows) == 0 for p in phases) or len(val.rows) == 0:
        raise DataError(f"{root}: fold {fold.fold} has an empty phase or validation split; run covid-cxr prepare again")
    return phases, val


def _build_model(config: TrainConfig, image_size: int) -> torch.nn.Module:
    from covid_cxr.models import build_model

    model = build_model(config.network, num_classes=len(CLASSES), image_size=image_size, drop_rate=config.drop_rate)
    if config.bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = config.bn_momentum
    if config.pretrained == "imagenet":
        from covid_cxr.models.pretrained import load_imagenet_weights

        files = [Path(p) for p in config.weights_files] or None
        load_imagenet_weights(model, weights_file=files)
    return model


def _model_and_optimizer(
    config: TrainConfig, runtime: Runtime, last: Checkpoint | None
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.amp.GradScaler | None, dict[str, Any]]:
    """A fresh model (initial weights from ``seed``) or the one in ``last.pt``, on the device, with its optimizer."""
    torch.manual_seed(epoch_seed(config.seed, 0, 0))
    if last is None:
        model = _build_model(config, config.image_size)
    else:  # the weights come from last.pt: no ImageNet download
        model = _build_model(replace(config, pretrained="none"), config.image_size)
        model.load_state_dict(last.model_state)
    model = model.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.precision == "fp16" else None
    state = dict(last.train_state or {}) if last is not None else {}
    if state:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    return model, optimizer, scaler, state


def train_fold(
    config: TrainConfig,
    *,
    resume: str | os.PathLike[str] | None = None,
    stream: TextIO | None = None,
    live: bool | None = None,
) -> Path:
    """Train one fold as ``config`` says (or continue the run folder ``resume``); returns the run folder."""
    run_dir: Path | None = None
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise DataError(f"{run_dir}: not a run folder (no config.yaml); give the folder 'covid-cxr train' made")
        saved = load_config(run_dir / "config.yaml")
        if config.network != saved.network:
            raise ConfigError(
                f"{run_dir} is a {saved.network} run; it cannot be resumed as {config.network} "
                f"(drop --network or pass --network {saved.network})"
            )
        config = saved
        if read_json(run_dir / "run.json").get("status") == "finished":
            print(f"{run_dir}: already finished; nothing to resume", file=stream)
            return run_dir

    dist = distributed.init_distributed(config.device)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return _run(config, run_dir, dist, stream, live)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)  # a library call leaves global state as it was
        distributed.shutdown(dist)


def _run(
    config: TrainConfig, run_dir: Path | None, dist: distributed.DistInfo, stream: TextIO | None, live: bool | None
) -> Path:
    from covid_cxr.data.prepared import PreparedData

    data_root = Path(config.data).resolve()
    prepared = PreparedData(data_root)
    if not 1 <= config.fold <= prepared.num_folds:
        raise ConfigError(
            f"fold {config.fold} is out of range: {data_root} was prepared with folds 1-{prepared.num_folds}"
        )
    fold = prepared.fold(config.fold)
    cache = prepared.cache(config.image_size)
    config = replace(config.resolved(image_size=int(cache.image_size)), data=str(data_root))
    if config.image_size != int(cache.image_size):
        raise DataError(
            f"{data_root} has no {config.image_size} px cache; prepare it with --image-size {config.image_size}"
        )
    if config.batch_size < dist.world_size:
        raise ConfigError(f"batch size {config.batch_size} is smaller than the {dist.world_size} processes")

    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    device = distributed.device_for(dist, config.device)
    runtime: Runtime = choose_runtime(device, config.precision, config.channels_last)
    phases, val = _load_phases(data_root, fold, cache)
    pre = Preprocessing(image_size=config.image_size, scaling=config.scaling, channels=3)

    resuming = run_dir is not None
    last_ckpt = load_checkpoint(run_dir / "last.pt") if resuming and (run_dir / "last.pt").exists() else None
    if last_ckpt is not None and last_ckpt.network != config.network:
        raise CheckpointError(f"{run_dir}/last.pt holds a {last_ckpt.network} network, the run says {config.network}")
    if run_dir is None:
        run_dir = _new_run_dir(config)
        config = replace(config, name=run_dir.name)

    model, optimizer, scaler, state = _model_and_optimizer(config, runtime, last_ckpt)
    net = distributed.wrap_model(model, dist, runtime.device)
    if config.compile:
        net = torch.compile(net)
    augmenter = Augmenter(config.augment, seed=config.seed)

    epochs = config.epochs_per_phase
    total_epochs = len(phases) * epochs
    done = int(state.get("epochs_done", 0))
    best_acc = float(state.get("best_val_accuracy", -1.0))
    best_epoch = state.get("best_epoch")
    log_path = run_dir / "log.csv"
    info: dict[str, Any] = {
        "network": config.network, "fold": config.fold, "data": str(data_root), "protocol": prepared.protocol,
        "split_hash": fold.split_hash, "image_size": config.image_size, "preset": config.preset,
        "batch_size": config.batch_size, "world_size": dist.world_size, "runtime": runtime.describe(),
        "num_phases": len(phases), "epochs_per_phase": epochs, "total_epochs": total_epochs,
        "status": "running", "epochs_done": done, "best_epoch": best_epoch,
        "best_val_accuracy": best_acc if best_epoch is not None else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    writer = None
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        recorded = {"runtime": runtime.describe(), "world_size": dist.world_size}
        dump_config(config, run_dir / "config.yaml", extra=recorded)
        if resuming:
            info["started"] = read_json(run_dir / "run.json").get("started", info["started"])
        write_json(run_dir / "run.json", info)
        if not resuming:
            _copy_split_files(getattr(fold, "paths", None), run_dir / "splits")
        _truncate_log(log_path, int(state.get("log_rows", 0)))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=done if resuming else None)
    progress = Progress(total_epochs, num_phases=len(phases), stream=stream, live=live, enabled=dist.is_main)
    progress.message(f"{'resuming' if resuming else 'training'} {config.network} fold {config.fold} -> {run_dir}")
    progress.message(f"runtime: {runtime.describe()}; world size {dist.world_size}; {total_epochs} epochs")

    loader_opts = {"rank": dist.rank, "world": dist.world_size, "workers": config.workers, "prefetch": config.prefetch,
                   "pin_memory": runtime.device.type == "cuda"}  # fmt: skip
    for global_epoch in range(done, total_epochs):
        phase_idx, epoch_idx = divmod(global_epoch, epochs)
        phase = phases[phase_idx]
        seed_epoch(config.seed, global_epoch, augmenter)
        progress.start_epoch(phase_idx + 1, epoch_idx + 1, epochs, global_epoch)
        batches = train_loader(cache.images, phase.rows, phase.labels, batch_size=config.batch_size,
                               seed=config.seed, epoch=global_epoch, **loader_opts)  # fmt: skip
        train_stats = train_one_epoch(net, batches, optimizer, preprocessing=pre, runtime=runtime,
                                      augmenter=augmenter if config.augment.enabled else None, dist=dist,
                                      scaler=scaler, on_batch=progress.on_batch)  # fmt: skip
        val_stats = evaluate(model, eval_loader(cache.images, val.rows, val.labels, batch_size=config.val_batch_size,
                                                **loader_opts), preprocessing=pre, runtime=runtime, dist=dist)  # fmt: skip
        improved = val_stats.accuracy > best_acc
        if improved:
            best_acc, best_epoch = val_stats.accuracy, global_epoch + 1
        done = global_epoch + 1
        if dist.is_main:
            meta = {"run": run_dir.name, "fold": config.fold, "phase": phase_idx + 1, "epoch": epoch_idx + 1,
                    "global_epoch": done, "val_accuracy": val_stats.accuracy, "val_loss": val_stats.loss,
                    "split_hash": fold.split_hash, "data": str(data_root), "protocol": prepared.protocol}  # fmt: skip
            weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            ckpt = Checkpoint(config.network, CLASSES, pre, weights, meta=meta)
            if improved:
                save_checkpoint(ckpt, run_dir / "best.pt")
            row = _log_row(phase_idx, epoch_idx, done, train_stats, val_stats, optimizer, phase)
            _append_log(log_path, row)
            train_state = {
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "epochs_done": done, "best_val_accuracy": best_acc, "best_epoch": best_epoch,
                "log_rows": done, "rng": _rng_states(augmenter),
            }  # fmt: skip
            atomic_torch_save(replace(ckpt, train_state=train_state).to_dict(), run_dir / "last.pt")
            _write_scalars(writer, row, done)
            info.update(epochs_done=done, best_epoch=best_epoch, best_val_accuracy=best_acc)
            write_json(run_dir / "run.json", info)
        progress.end_epoch(train_stats, val_stats, best=improved)
    if dist.is_main:
        info.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json(run_dir / "run.json", info)
        from covid_cxr.runs.model_card import write_run_card

        write_run_card(run_dir)  # MODEL_CARD.md; 'covid-cxr model-card RUN' refreshes it after evaluate/audit
        if writer is not None:
            writer.close()
        progress.message(f"finished: best validation accuracy {best_acc:.4f} at epoch {best_epoch}; "
                         f"best.pt in {run_dir}")
    distributed.barrier(dist)
    return run_dir


def _log_row(phase_idx: int, epoch_idx: int, done: int, train: EpochStats, val: EpochStats,
             optimizer: torch.optim.Optimizer, phase: PhaseData) -> dict[str, Any]:  # fmt: skip
    return {
        "phase": phase_idx + 1, "epoch": epoch_idx + 1, "global_epoch": done,
        "train_loss": f"{train.loss:.6f}", "train_accuracy": f"{train.accuracy:.6f}",
        "val_loss": f"{val.loss:.6f}", "val_accuracy": f"{val.accuracy:.6f}",
        "lr": optimizer.param_groups[0]["lr"], "images_per_s": f"{train.images_per_s:.2f}",
        "seconds": f"{train.seconds + val.seconds:.2f}", "phase_images": len(phase.rows),
        "phase_ids_sha1": phase.ids_sha1,
    }  # fmt: skip


def _write_scalars(writer: Any, row: dict[str, Any], step: int) -> None:
    if writer is None:
        return
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "images_per_s"):
        writer.add_scalar(key.replace("_", "/", 1), float(row[key]), step)
    writer.flush()
