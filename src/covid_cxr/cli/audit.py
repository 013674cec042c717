"""``covid-cxr audit source|ablation|cross-source|cam``: did the model learn the disease or the dataset?"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from covid_cxr.choices import PRECISIONS
from covid_cxr.cli import seed
from covid_cxr.labels import CLASSES, normalize_label


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "audit",
        help="validity audits: source probe, lung ablation, cross-source recall, Grad-CAM in the lungs",
        description="Each audit writes <audit>.json (metrics, 95% intervals, thresholds, plain-language flags) "
        "into RUN/audit/ (for a bare checkpoint: CKPT_STEM-audit/ beside it; for 'source' without a "
        "checkpoint: DATA/audit/foldK/), or --out. 'covid-cxr report' shows them as 'Did it learn the disease?'. "
        "A checkpoint is fed its images resized by its own method (its recorded resize), as 'predict' feeds it.",
    )
    sub = p.add_subparsers(dest="audit", metavar="AUDIT", required=True)

    s = sub.add_parser("source", help="can a classifier predict the image's source instead of its class?")
    s.add_argument("data", type=Path, help="prepared data folder")
    s.add_argument("--fold", type=int, help="fold, 1-based (default 1, or the checkpoint run's fold)")
    s.add_argument("--checkpoint", type=Path,
                   help="run folder or .pt: probe its frozen features linearly instead of training a small CNN")
    s.add_argument("--probes", default="stats,cnn", metavar="LIST",
                   help="probes without --checkpoint, comma-separated: stats (image statistics + logistic "
                   "regression, seconds), cnn (a small CNN, minutes on a CPU); default stats,cnn")
    s.add_argument("--epochs", type=int, default=8, help="epochs of the CNN probe (default 8; see --min-steps)")
    s.add_argument("--min-steps", type=int, default=300, metavar="N",
                   help="at least this many training steps of the CNN probe per cross-fitting part (default 300)")
    s.add_argument("--seed", type=seed, default=0, help="seed of the probe (default 0)")
    _runtime_options(s, out_help="output folder (default: the checkpoint's audit folder, or DATA/audit/foldK without "
                                 "one; give RUN/audit to report it with that run's other audits)")
    s.set_defaults(batch_size=64)  # its features go 64 images at a time; no option for it

    a = sub.add_parser("ablation", help="evaluate as is, with the lung fields hidden, and with only the lungs shown")
    _target_options(a)
    a.add_argument("--masks", type=Path, help="folder of lung masks named by image id ('/' -> '__', any image "
                   "extension); default: the built-in coarse lung-field estimate")
    a.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per forward pass (default 64)")
    _runtime_options(a)

    c = sub.add_parser("cross-source", help="recall of a class on a source never seen for it, vs in-source recall")
    _target_options(c)
    c.add_argument("--source", help="name of the unseen source (e.g. hospital-b); may be left out when "
                   "--source-data holds one source")
    c.add_argument("--source-data", metavar="[NAME=]DIR",
                   help="another collection, never trained on: a folder with one sub-folder per class or a "
                   "labels.csv, named NAME (e.g. hospital-b=DIR), or a folder 'covid-cxr prepare' wrote "
                   "(default: the model's own prepared data)")
    c.add_argument("--class", dest="cls", default="covid", help=f"class to test ({', '.join(CLASSES)}; default covid)")
    c.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per forward pass (default 64)")
    _runtime_options(c)

    g = sub.add_parser("cam", help="share of Grad-CAM mass inside the lung fields over the test set, per class")
    _target_options(g)
    g.add_argument("--masks", type=Path, help="folder of lung masks (as for 'audit ablation')")
    g.add_argument("--batch-size", type=int, default=16, metavar="B", help="images per Grad-CAM pass (default 16)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    g.add_argument("--out", type=Path, help="output folder (default RUN/audit)")
    p.set_defaults(func=run)


def _target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", type=Path, help="run folder (with run.json and best.pt) or a .pt checkpoint")
    p.add_argument("--data", type=Path, help="prepared data folder (default: the run's run.json 'data')")
    p.add_argument("--fold", type=int, help="fold, 1-based (default: the run's fold; needed for a bare checkpoint)")


def _runtime_options(p: argparse.ArgumentParser, out_help: str = "output folder (default RUN/audit)") -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast precision (default auto)")
    p.add_argument("--out", type=Path, help=out_help)


def run(args: argparse.Namespace) -> int:
    from covid_cxr.inference.settings import InferenceSettings

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    # cam has no --precision: Grad-CAM runs in fp32
    settings = InferenceSettings(batch_size=args.batch_size, device=args.device,
                                 precision=getattr(args, "precision", "auto"))
    result: dict[str, Any]
    if args.audit == "source":
        from covid_cxr.audit.source import audit_source

        if args.epochs < 1 or args.min_steps < 0:
            raise ValueError(f"--epochs must be >= 1 and --min-steps >= 0; got {args.epochs} and {args.min_steps}")
        probes = [p.strip() for p in args.probes.split(",") if p.strip()]
        result, path = audit_source(args.data, settings, fold=args.fold, checkpoint=args.checkpoint,
                                    epochs=args.epochs, seed=args.seed, probes=probes, min_steps=args.min_steps,
                                    out_dir=args.out)
    elif args.audit == "ablation":
        from covid_cxr.audit.ablation import audit_ablation

        result, path = audit_ablation(args.target, settings, data=args.data, fold=args.fold, masks=args.masks,
                                      out_dir=args.out)
    elif args.audit == "cross-source":
        from covid_cxr.audit.cross_source import audit_cross_source

        result, path = audit_cross_source(args.target, settings, source=args.source, cls=normalize_label(args.cls),
                                          data=args.data, fold=args.fold, source_data=args.source_data,
                                          out_dir=args.out)
    else:
        from covid_cxr.audit.cam_stats import audit_cam

        result, path = audit_cam(args.target, settings, data=args.data, fold=args.fold, masks=args.masks,
                                 out_dir=args.out)
    print(summary(result))
    print(f"wrote {path}")
    return 0


def summary(result: dict[str, Any]) -> str:
    """The audit's figures in a few lines, its notes (images left out and why), then its flags (or that none fired)."""
    from covid_cxr.audit import (
        results as R,  # the audits' wording, loaded when one has run
    )
    from covid_cxr.fmt import table_of

    section = R.section_blocks({result["audit"]: result})
    lines = [line for block in section[1:] if block[0] == "table" for line in table_of(block[1], block[2]).lines()]
    lines += [f"note: {note}" for note in result.get("notes") or []]
    flags = result.get("flags") or []
    lines += [f"FLAG: {f['message']}" for f in flags] or ["no flag raised"]
    return "\n".join(lines)
