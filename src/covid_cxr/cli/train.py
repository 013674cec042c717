"""``covid-cxr train DATA --network NAME --fold K``: one fold of the paper's phased training.

Multi-process: ``torchrun --nproc_per_node N -m covid_cxr train DATA ...`` (gloo on the CPU, NCCL
on GPUs); ``--batch-size`` is then the global batch, split over the processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covid_cxr.choices import PRECISIONS
from covid_cxr.cli import seed
from covid_cxr.config import PRESETS, PRETRAINED, SCALINGS, TrainConfig, make_config
from covid_cxr.errors import ConfigError
from covid_cxr.networks import NETWORK_NAMES

if TYPE_CHECKING:
    from covid_cxr.config import TrainConfig


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``cv`` (unset ones take the preset's value)."""
    p.add_argument("--network", choices=NETWORK_NAMES, help="network to train (default concat)")
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper",
                   help="paper: Table 2 of the paper; cpu: small and quick, all phases (default paper)")  # fmt: skip
    p.add_argument("--epochs-per-phase", type=int, metavar="N", help="epochs on each phase (paper: 100)")
    p.add_argument("--image-size", type=int, metavar="S", help="input size; DATA needs a cache at it (default: DATA's; 96 with --preset cpu)")
    p.add_argument("--batch-size", type=int, metavar="B", help="global batch (paper: 20 concat, 30 single backbones)")
    p.add_argument("--lr", type=float, help="Nadam learning rate (paper: 1e-4)")
    p.add_argument("--drop-rate", type=float, metavar="P", help="dropout before the classifier (paper: 0.5)")
    p.add_argument("--scaling", choices=tuple(SCALINGS), help="pixel scaling (paper: unit = 1/255)")
    p.add_argument("--pretrained", choices=PRETRAINED, help="start from ImageNet weights or from scratch")
    p.add_argument("--weights-file", action="append", type=Path, dest="weights_files", metavar="PATH",
                   help="local Keras ImageNet .h5 file; repeat once per backbone for concat")  # fmt: skip
    p.add_argument("--no-augment", action="store_true", help="train without augmentation")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, help="autocast precision (default auto: bf16 where native)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default on)")  # fmt: skip
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--workers", type=int, metavar="W", help="batch-loading worker processes")
    p.add_argument("--seed", type=seed, metavar="S", help="seed of shuffles, augmentation and dropout (default 0)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic kernels: a resumed run then ends with the same weights")  # fmt: skip
    p.add_argument("--out", type=Path, metavar="RUNS", help="folder of run folders (default runs)")


def config_from_args(args: argparse.Namespace, **fixed: Any) -> TrainConfig:
    """The preset with every option the user gave on top."""
    values = given_options(args)
    values.update(fixed)
    return make_config(args.preset, **values)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings as the options give them (None: not given, the preset decides)."""
    values: dict[str, Any] = {
        "network": args.network, "epochs_per_phase": args.epochs_per_phase, "image_size": args.image_size,
        "batch_size": args.batch_size, "lr": args.lr, "drop_rate": args.drop_rate, "scaling": args.scaling,
        "pretrained": args.pretrained,
        "device": args.device, "precision": args.precision, "channels_last": args.channels_last,
        "compile": args.compile, "workers": args.workers, "seed": args.seed, "deterministic": args.deterministic,
        "out": str(args.out) if args.out else None,
    }  # fmt: skip
    if args.weights_files:
        values["weights_files"] = tuple(str(p) for p in args.weights_files)
    if args.no_augment:
        values["augment"] = {"enabled": False}
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` verb."""
    p = subparsers.add_parser(
        "train",
        help="train one fold (phases in order, best checkpoint by validation accuracy)",
        description="Trains one fold of a prepared folder into RUNS/NAME/ (config.yaml, run.json, log.csv, tb/, "
        "best.pt, last.pt, splits/). --resume RUN continues a run from its last finished epoch.",
    )
    p.add_argument("data", nargs="?", type=Path, help="prepared folder (covid-cxr prepare --out DATA)")
    p.add_argument("--fold", type=int, metavar="K", help="fold to train, 1-based (default 1)")
    p.add_argument("--name", help="run folder name (default NETWORK-foldK, numbered if taken)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue this run folder (its settings are kept)")
    add_train_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train (or resume) one fold and print where the run folder is."""
    from covid_cxr.train.runner import (  # the library is loaded by the verb, not by --help
        resume_config,
        train_fold,
    )

    if args.resume is not None:
        saved = resume_config(args.resume, args.network)
        _refuse_other_settings(args, saved)
        run_dir = train_fold(saved, resume=args.resume)
    else:
        if args.data is None:
            raise ValueError("give the prepared folder DATA (or --resume RUN to continue a run)")
        config = config_from_args(args, data=str(args.data), fold=args.fold, name=args.name)
        run_dir = train_fold(config)
    print(f"run folder: {run_dir} (best checkpoint: {run_dir / 'best.pt'})")
    return 0


def _refuse_other_settings(args: argparse.Namespace, saved: TrainConfig) -> None:
    """A resumed run keeps its settings: options that ask for others (more epochs, another lr) were dropped without a
    word, and a user extending a run believed it extended. Options equal to the run's own are fine."""
    given = {k: v for k, v in {**given_options(args), "fold": args.fold}.items() if v is not None and k != "augment"}
    have = saved.to_dict()
    other = [(k, v, have.get(k)) for k, v in given.items() if k in have and str(v) != str(have[k])]
    if other:
        asked = ", ".join(f"--{k.replace('_', '-')} {v} (the run has {was})" for k, v, was in other)
        raise ConfigError(f"{args.resume} keeps the settings it was started with; asked for {asked}. Resume without "
                          "them, or train a new run with the settings you want")
