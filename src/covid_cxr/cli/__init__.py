"""The ``covid-cxr`` command: a few verbs, each in its own module under ``covid_cxr.cli``.

Each verb module defines ``register(subparsers)``, which adds its parser and sets
``func=run`` where ``run(args) -> int`` does the work. Verbs stay thin: parse, call the
library, print. Errors a user can fix (``CovidCxrError``, ``ValueError``,
``FileNotFoundError``, an ``OSError`` writing an output) are printed as one line and exit with status 2;
a closed output pipe (``| head``) ends quietly with 141, as SIGPIPE would; anything else is a bug and
keeps its traceback.

Answering fast is the design here: ``covid-cxr --help`` lists the verbs from :data:`VERBS` without
importing a verb module, and ``covid-cxr VERB ...`` imports that verb's module alone. A verb module
imports only light modules at the top (argparse, the settings' tables) and the library inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from covid_cxr import __version__
from covid_cxr.errors import did_you_mean

# Order here is the order in --help; the text is the verb's line there. Add a verb by adding its module.
VERBS: dict[str, str] = {
    "synth": "write synthetic chest X-ray datasets in the covid-chestxray and RSNA layouts",
    "prepare": "build the manifest, patient folds, training phases and image cache",
    "train": "train one fold (phases in order, best checkpoint by validation accuracy)",
    "cv": "train and evaluate several folds one after another, then report over them",
    "demo": "synthetic data -> prepare -> train concat (cpu preset) -> evaluate -> report, no data needed",
    "evaluate": "evaluate a run (its best.pt) or a checkpoint on a fold's test or validation split",
    "calibrate": "choose a decision rule (operating point) on the validation split and store it in the checkpoint",
    "metrics": "Table 3/4 figures with 95% CIs, AUC, calibration from a predictions CSV",
    "report": "cross-fold report (Markdown + one self-contained HTML page) beside the paper's Table 4",
    "predict": "classify X-ray files, folders or globs with a checkpoint or ONNX model",
    "export": "export a checkpoint to ONNX (with its preprocessing in the metadata), optionally also as int8",
    "serve": "serve a model over HTTP: REST API, OpenAPI docs and a web page",
    "model-card": "write MODEL_CARD.md for a run or checkpoint (Hugging Face layout)",
    "import-keras": "convert a Keras model or weights file to a covid-cxr checkpoint",
    "audit": "validity audits: source probe, lung ablation, cross-source recall, Grad-CAM in the lungs",
}


def seed(text: str) -> int:
    """``--seed``'s type, for every verb: an integer >= 0 (NumPy's generators take no other), refused by argparse
    naming the option."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0; got {text!r}")
    return value


def verb_module(verb: str) -> str:
    """The module that registers ``verb``."""
    return f"covid_cxr.cli.{verb.replace('-', '_')}"


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``verb``, that verb's full parser (its module imported), the others as names only."""
    parser = argparse.ArgumentParser(
        prog="covid-cxr",
        description=(
            "Chest X-ray classifiers for COVID-19, pneumonia and normal: reproduce Rahimzadeh & Attar (2020), "
            "train on your own X-rays, evaluate with confidence intervals, audit, and deploy."
        ),
    )
    parser.add_argument("--version", action="version", version=f"covid-cxr {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for name, line in VERBS.items():
        if name == verb:
            importlib.import_module(verb_module(name)).register(sub)
        else:
            sub.add_parser(name, help=line.replace("%", "%%"), add_help=False)
    return parser


def _verb_in(argv: Sequence[str]) -> str | None:
    """The verb ``argv`` names (its first word, as argparse reads it), when it is one of :data:`VERBS`."""
    return argv[0] if argv and argv[0] in VERBS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in VERBS:
        print(f"covid-cxr: error: unknown command {argv[0]!r}{did_you_mean(argv[0], VERBS)}; commands are "
              f"{', '.join(VERBS)} (covid-cxr --help says what each does)", file=sys.stderr)
        return 2
    verb = _verb_in(argv)
    name = f"covid-cxr {verb}" if verb else "covid-cxr"
    try:
        parser = build_parser(verb)  # imports the verb's module: a Ctrl-C may land here
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe raises here, where it is handled, not at the interpreter's exit
        return code
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output went away (``| head``): stop quietly, as on SIGPIPE
        _silence_stdout()
        return 141
    except OSError as exc:  # writing an output the system refused: a read-only folder, a full disk, a folder's name
        print(f"{name}: error: {exc}; check that the folder exists, is writable and has room, and that the "
              "output's name is not taken by a folder", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of a closed pipe raises nothing more."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no real file (a test's capture): nothing to flush into a pipe
        pass


def _joined_a_group() -> bool:
    """Whether this process joined a torchrun process group (read without importing torch where it never was)."""
    distributed = sys.modules.get("covid_cxr.train.distributed")
    return bool(distributed and distributed.joined_a_group())


# What gloo says when the other end of a rank's connection is gone (a rank killed, or failed and exited).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def _peer_gone(exc: BaseException) -> str:
    """gloo's words, when ``exc`` says another rank of the group went away; else empty."""
    text = str(exc)
    return next((words for words in PEER_GONE if words in text), "") if isinstance(exc, RuntimeError) else ""


def entry(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``covid-cxr`` program: :func:`main`, then exit with its status.

    A process that joined a torchrun process group (``train``, ``cv``) ends through
    :func:`covid_cxr.train.distributed.end_rank`, which skips the interpreter's finalization, where a group's leftover
    threads can abort the process after its work is done (the module's notes say why).
    """
    try:
        code: object = main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:  # outside a group, Python's own ending: the traceback, or an interrupt's 130
        if not _joined_a_group():
            raise
        if isinstance(exc, KeyboardInterrupt):  # raised outside main's own handler (which says so and returns 130)
            code = 130
        elif gone := _peer_gone(exc):  # the cause is in the other rank's output: gloo's traceback only buries it
            print(f"covid-cxr: another process of this torchrun launch ended, so this one stops too ({gone}); its "
                  "own output says why", file=sys.stderr)
            code = 1
        else:
            traceback.print_exc()
            code = 1
    if not _joined_a_group():
        sys.exit(code)
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    from covid_cxr.train.distributed import end_rank

    end_rank(code)


if __name__ == "__main__":
    entry()
