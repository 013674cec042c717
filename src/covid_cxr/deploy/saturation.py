"""The int8 record a model carries, and what ``predict`` / ``serve`` print about it on the CPU they run on.

Why int8 weights need care on x86 CPUs without VNNI, and the two remedies (7-bit weights; full 8-bit
weights run in their uint8 form there), are in :mod:`covid_cxr.inference.int8`. ``export --int8``
writes full 8-bit weights (:data:`WEIGHT_SCHEME`); the 7-bit scheme stays for measuring
(``benchmarks/int8_saturation.py``). :func:`print_int8_record` tells the user what they loaded, the CPU it
was checked on, the form its weights run in here, and warns where products can still saturate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

from covid_cxr import fmt
from covid_cxr.inference.int8 import WEIGHTS_ENV, Int8Form, cpu_features, describe_cpu
from covid_cxr.stats import Proportion

WEIGHT_RANGE = (-127, 127)  # full 8-bit int8 weights: what `export --int8` writes
SEVEN_BIT_RANGE = (-64, 64)  # ONNX Runtime's reduced (7-bit) int8 range
WEIGHT_SCHEME = ("int8 per-channel, full 8-bit range; run as uint8 (zero point 128) where the CPU has no VNNI, "
                 "so no int16 sum saturates")
SEVEN_BIT_SCHEME = "int8 per-channel, 7-bit range [-64, 64]: saturation-free on AVX2 and VNNI"


def agreement_words(check: dict[str, Any], key: str = "agreement_pct") -> str:
    """An int8 check's agreement with fp32 as an honest figure: ``99.1% (95% CI 94.9-99.8%), 107/108``.

    Models record the percentage to 3 decimals and the number of images, which give back the count exactly for any
    check of fewer than 100,000 images (older records hold no count); the interval is Wilson's, as everywhere.
    """
    pct, n = check.get(key), check.get("images")
    if not isinstance(pct, (int, float)) or not isinstance(n, int) or n <= 0:
        return f"{pct}%" if isinstance(pct, (int, float)) else "not recorded"
    return fmt.counted(Proportion.of_fraction(pct / 100, n))


def int8_record_lines(record: dict[str, Any], where: str, form: Int8Form | None = None,
                      cpu: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
    """What an int8 model's ``covid_cxr.quantization`` record says, the form its weights run in here
    (``form``, from the predictor), and a warning where int16 sums can still saturate on this CPU."""
    scheme = record.get("weight_scheme") or f"{record.get('weights', 'int8')}, full 8-bit range"
    line = f"int8: {record.get('format', 'qoperator')}, uint8 activations, {scheme}"
    check = record.get("check") or {}
    if check:
        line += f"; checked on {check.get('images', '?')} {check.get('source', 'images')}: agreement with fp32 " \
                f"{agreement_words(check)}"
        rule = check.get("decision_rule")
        line += f" decided by {rule}" if rule else " (decision rule not recorded)"
        if "argmax_agreement_pct" in check:
            line += f" ({agreement_words(check, 'argmax_agreement_pct')} by argmax)"
        if "accuracy_difference_pp" in check:
            line += f", accuracy {check['accuracy_difference_pp']:+.2f} pp"
    checked_on = record.get("checked_on")
    line += f"; checked on CPU {describe_cpu(checked_on)}" if checked_on else "; checking CPU not recorded"
    lines = [line]
    if form is None:
        return lines
    cpu = cpu_features() if cpu is None else cpu
    lacks = "has no VNNI" if cpu.get("vnni") is False else "may lack VNNI (its flags could not be read)"
    why = f"{WEIGHTS_ENV}={form.forced}" if form.forced else f"this CPU ({describe_cpu(cpu)}) {lacks}"
    if form.unsigned:
        lines.append(f"int8 weights run here in their uint8 form (zero point 128; {form.unsigned} weight tensors), "
                     f"as {why}: ONNX Runtime multiplies u8 x u8 without saturating int16 sums, so the results are "
                     "those of a CPU with VNNI")
    if form.saturating:
        lines.append(
            f"warning: {where}: {form.saturating} int8 products can saturate int16 sums here ({why}), so "
            "predictions can differ from fp32 far more than the check above says; "
            + (f"unset {WEIGHTS_ENV}" if form.forced == "int8" else "use the fp32 model")
        )
    return lines


def print_int8_record(predictor: Any, path: str | Path, file: IO[str] | None = None) -> None:
    """Print the int8 record of an ONNX predictor loaded from ``path`` (and the form its weights run in) to stderr.

    Prints nothing for a model without one (fp32 ONNX, PyTorch checkpoints).
    """
    metadata = getattr(predictor, "metadata", None) or {}
    raw = metadata.get("quantization")
    if raw is None:
        return
    try:
        record = json.loads(raw)
    except ValueError:
        record = {}
    form = getattr(predictor, "int8_form", None)
    for line in int8_record_lines(record if isinstance(record, dict) else {}, str(path), form):
        print(line, file=file or sys.stderr)
