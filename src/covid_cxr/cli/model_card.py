"""``covid-cxr model-card RUN_OR_CHECKPOINT``: (re)write MODEL_CARD.md from what a model and its run folder hold.

Training runs and ``export`` write the card themselves; run this after ``evaluate`` or ``audit`` to
bring the figures and verdicts into it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from covid_cxr.errors import CheckpointError
from covid_cxr.runs.folder import BEST, CARD_NAME


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``model-card`` verb."""
    p = sub.add_parser("model-card", help="write MODEL_CARD.md for a run or checkpoint (Hugging Face layout)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="a run folder (its best.pt) or a .pt checkpoint")
    p.add_argument("--out", type=Path,
                   help=f"file to write (default: {CARD_NAME} in the run folder or beside the checkpoint)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the card and say where."""
    from covid_cxr.runs.model_card import (  # loads torch
        facts_from_checkpoint,
        run_folder_of,
        write_model_card,
    )

    target = Path(args.target)
    checkpoint = target / BEST if target.is_dir() else target
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint; give a run folder holding best.pt or a .pt file")
    run_dir = run_folder_of(target)
    out = args.out or (run_dir or checkpoint.parent) / CARD_NAME
    path = write_model_card(facts_from_checkpoint(checkpoint), out, run_dir)
    print(f"wrote {path}")
    return 0
