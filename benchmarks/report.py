"""Turns the workers' raw results into the summary: ratios to Keras, % of peak, accuracy differences, targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CONFIG = "default"  # what predict/evaluate/serve and train run with every option at auto
# Which instruction ceiling (benchmarks/peak.py) bounds each configuration's arithmetic.
FORMAT_OF = {"keras-tf-fp32": "fp32", "torch-fp32": "fp32", "torch-fp32-cl": "fp32", "ort-fp32": "fp32"}
# Issue 14's targets against Keras at batch 20, per machine class (the default's format says which class).
TARGETS_BY_CLASS = {
    "bf16": {"train_ratio": 2.1, "infer_default_ratio": 1.7, "infer_int8_ratio": 3.2, "int8_max_pp_lost": 0.5},
    "fp32": {"train_ratio": 1.3, "infer_default_ratio": 1.4, "infer_int8_ratio": 2.0, "int8_max_pp_lost": 0.5},
}
PCT_OF_BF16_PEAK_TARGET = 70.0


def _rows(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """label (config plus allocator variant) -> {"infer": {batch: result}, "train": {batch: result}, ...}."""
    rows: dict[str, dict[str, Any]] = {}
    for entry in runs:
        for result in entry["results"]:
            if "config" not in result:
                continue
            variant = entry["label"].rsplit(" ", 1)[0] if "[" in entry["label"] else result["config"]
            row = rows.setdefault(variant, {"infer": {}, "train": {}, "runtime": result.get("runtime", "")})
            if result.get("probabilities"):
                row["probabilities"] = result["probabilities"]
            elif result.get("batch") is not None:
                row[result["task"]][int(result["batch"])] = result
        if "error" in entry:
            name = entry["label"].rsplit(" ", 1)[0]
            rows.setdefault(name, {"infer": {}, "train": {}, "runtime": ""}).setdefault("errors", []).append(
                f"{entry['label']}: {entry['error']}"
            )
    return rows


def _format_of(config: str, runtime: str = "") -> str:
    if config == DEFAULT_CONFIG:  # whatever auto chose on this CPU, as its runtime line says
        return "bf16" if "precision=bf16" in runtime else "fp32"
    return FORMAT_OF.get(config.split(" [")[0], "int8" if "int8" in config else "bf16")


def _accuracy(row: dict[str, Any], labels: np.ndarray, reference: np.ndarray | None) -> dict[str, Any] | None:
    """Accuracy with its Wilson 95% interval; against fp32, the paired difference with a bootstrap 95% interval."""
    from covid_cxr.stats import wilson_interval

    path = row.get("probabilities")
    if not path or not Path(path).is_file():
        return None
    probs = np.load(path)
    right = probs.argmax(1) == labels
    low, high = wilson_interval(int(right.sum()), len(right))
    out: dict[str, Any] = {"n": len(right), "accuracy_pct": float(right.mean() * 100),
                           "accuracy_ci95_pct": [100 * low, 100 * high]}
    if reference is not None:
        ref_right = reference.argmax(1) == labels
        diff = right.astype(float) - ref_right.astype(float)
        out["accuracy_diff_pp"] = float(diff.mean() * 100)
        draws = np.random.default_rng(0).integers(0, len(diff), (2000, len(diff)))
        out["accuracy_diff_ci95_pp"] = [float(v) for v in np.percentile(diff[draws].mean(1) * 100, [2.5, 97.5])]
        out["class_agreement_pct"] = float((probs.argmax(1) == reference.argmax(1)).mean() * 100)
        out["max_abs_prob_diff"] = float(np.abs(probs - reference).max())
    return out


def analyse(runs: list[dict[str, Any]], ref: Any, out: Path, *, batch_sizes: list[int], train_batch: int,
            ceilings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``ceilings``: :func:`benchmarks.peak.measure_ceilings` of this machine (no ceiling, no "% of peak")."""
    rows = _rows(runs)
    ceilings = ceilings or next((r for e in runs for r in e["results"] if r.get("task") == "ceilings"), None)
    peak = (ceilings or {}).get("gflops", {})
    flops = next((r for e in runs for r in e["results"] if r.get("task") == "flops"), {})
    gflop = flops.get("forward_gflop")
    keras = rows.pop("keras-tf-fp32", None)
    labels = np.load(ref.eval_set)["labels"]
    # The exact fp32 reference: PyTorch fp32, else ONNX Runtime fp32 (equal to 1e-5, benchmarks/exact_paths.py).
    fp32_path = (rows.get("torch-fp32") or rows.get("ort-fp32") or {}).get("probabilities")
    reference = np.load(fp32_path) if fp32_path and Path(fp32_path).is_file() else None
    summary: dict[str, Any] = {"forward_gflop_per_image": gflop, "peak_gflops": peak, "ceilings": ceilings,
                               "keras": None, "ours": {}}
    if keras:
        keras_gflops = {b: r["images_per_s"] * gflop for b, r in keras["infer"].items()} if gflop else {}
        summary["keras"] = {
            "infer_gflops": keras_gflops,
            "infer_pct_of_own_peak": {b: 100 * g / peak["fp32"] for b, g in keras_gflops.items() if peak.get("fp32")},
            "infer_images_per_s": {b: r["images_per_s"] for b, r in keras["infer"].items()},
            "infer_cpu_s_per_image": {b: r["cpu_median_s"] / b for b, r in keras["infer"].items()},
            "train_step_s": {b: r["step_s"] for b, r in keras["train"].items()},
            "train_cpu_s_per_step": {b: r["cpu_median_s"] for b, r in keras["train"].items()},
            "peak_rss_mib": {"infer": max((r["peak_rss_mib"] for r in keras["infer"].values()), default=None),
                             "train": max((r["peak_rss_mib"] for r in keras["train"].values()), default=None)},
        }
    for name, row in rows.items():
        item: dict[str, Any] = {"runtime": row["runtime"], "errors": row.get("errors", [])}
        item["infer_images_per_s"] = {b: r["images_per_s"] for b, r in row["infer"].items()}
        item["train_step_s"] = {b: r["step_s"] for b, r in row["train"].items()}
        item["peak_rss_mib"] = {"infer": max((r["peak_rss_mib"] for r in row["infer"].values()), default=None),
                                "train": max((r["peak_rss_mib"] for r in row["train"].values()), default=None)}
        item["minor_faults_per_call"] = {}
        if keras:
            item["infer_ratio_vs_keras"] = {
                b: ips / keras["infer"][b]["images_per_s"] for b, ips in item["infer_images_per_s"].items() if b in keras["infer"]
            }
            item["infer_cpu_ratio_vs_keras"] = {
                b: (keras["infer"][b]["cpu_median_s"] / b) / (r["cpu_median_s"] / b)
                for b, r in row["infer"].items() if b in keras["infer"] and r["cpu_median_s"] > 0
            }
            item["train_ratio_vs_keras"] = {
                b: keras["train"][b]["step_s"] / s for b, s in item["train_step_s"].items() if b in keras["train"]
            }
            item["train_cpu_ratio_vs_keras"] = {
                b: keras["train"][b]["cpu_median_s"] / r["cpu_median_s"]
                for b, r in row["train"].items() if b in keras["train"] and r["cpu_median_s"] > 0
            }
        if gflop:
            item["infer_gflops"] = {b: ips * gflop for b, ips in item["infer_images_per_s"].items()}
            fmt = _format_of(name, row.get("runtime", ""))
            item["format"] = fmt
            if peak.get("bf16"):
                item["infer_pct_of_bf16_peak"] = {b: 100 * g / peak["bf16"] for b, g in item["infer_gflops"].items()}
            if peak.get(fmt):
                item["infer_pct_of_own_peak"] = {b: 100 * g / peak[fmt] for b, g in item["infer_gflops"].items()}
        item["accuracy"] = _accuracy(row, labels, reference)
        summary["ours"][name] = item
    datapath = next((r for e in runs for r in e["results"] if r.get("task") == "datapath"), None)
    default_train = summary["ours"].get(DEFAULT_CONFIG, {}).get("train_step_s", {}).get(train_batch)
    if datapath:
        summary["datapath"] = dict(datapath)
        if default_train:
            train_ips = train_batch / default_train
            summary["datapath"]["training_images_per_s"] = train_ips
            summary["datapath"]["headroom_x"] = datapath["steady_images_per_s"] / train_ips
    summary["targets"] = _targets(summary, train_batch, max(batch_sizes))
    return summary


def _targets(summary: dict[str, Any], train_batch: int, batch: int) -> dict[str, Any]:
    ours = summary["ours"]
    default = ours.get(DEFAULT_CONFIG, {})
    int8 = {k: v for k, v in ours.items() if k.startswith("ort-int8") and v.get("infer_ratio_vs_keras", {}).get(batch)}
    best_int8 = max(int8, key=lambda k: int8[k]["infer_ratio_vs_keras"][batch], default=None)
    out: dict[str, Any] = {
        "train_ratio": default.get("train_ratio_vs_keras", {}).get(train_batch),
        "infer_default_ratio": default.get("infer_ratio_vs_keras", {}).get(batch),
        "machine_class": default.get("format", "bf16"),
        "pct_of_bf16_peak": default.get("infer_pct_of_bf16_peak", {}).get(batch),
        "pct_of_bf16_peak_compiled": ours.get("torch-bf16-cl-compile", {}).get("infer_pct_of_bf16_peak", {}).get(batch),
        "best_int8": best_int8,
        "infer_int8_ratio": int8[best_int8]["infer_ratio_vs_keras"][batch] if best_int8 else None,
        "int8_pp_lost": -((int8[best_int8].get("accuracy") or {}).get("accuracy_diff_pp", float("nan"))) if best_int8 else None,
    }
    targets = out["targets"] = TARGETS_BY_CLASS["bf16" if out["machine_class"] == "bf16" else "fp32"]
    out["met"] = {
        "train_ratio": out["train_ratio"] is not None and out["train_ratio"] >= targets["train_ratio"],
        "infer_default_ratio": (out["infer_default_ratio"] is not None
                                and out["infer_default_ratio"] >= targets["infer_default_ratio"]),
        "infer_int8": (out["infer_int8_ratio"] is not None and out["infer_int8_ratio"] >= targets["infer_int8_ratio"]
                       and out["int8_pp_lost"] is not None and out["int8_pp_lost"] <= targets["int8_max_pp_lost"]),
        "pct_of_bf16_peak": max(out["pct_of_bf16_peak"] or 0, out["pct_of_bf16_peak_compiled"] or 0)
        >= PCT_OF_BF16_PEAK_TARGET,
    }
    return out


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render_table(report: dict[str, Any]) -> str:
    """The Markdown tables that go into RESULTS.md."""
    s = report["summary"]
    m = report["machine"]
    settings = report["settings"]
    b1, bn = min(settings["batch_sizes"]), max(settings["batch_sizes"])
    tb = settings["train_batch"]
    lines = [
        f"Run {report['started_utc']} to {report['finished_utc']} on {m['cpu_model']} ({m['physical_cores']} cores; "
        f"{', '.join(m['flags'])}), {m['memory_gib']} GiB; torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"TensorFlow {m['keras_side'].get('tensorflow', '-')} / Keras {m['keras_side'].get('keras', '-')}. "
        f"Load average (1/5/15 min) at start, after Keras, at end: {report['load_average_1_5_15min']}. "
        f"Image size {settings['image_size']}, median of {settings['reps']} after {settings['warmup']} warm-up; "
        f"{_fmt(s['forward_gflop_per_image'], '.2f')} GFLOP per image forward.",
        "",
        f"| configuration | img/s b{b1} | img/s b{bn} | x Keras b{b1} | x Keras b{bn} | x Keras b{bn} (CPU s) "
        f"| % bf16 ceiling b{bn} | % own ceiling b{bn} | train s/step b{tb} | x Keras train | peak MiB infer / train "
        f"| accuracy % [95% CI] | diff. vs fp32 pp [95% CI] | class agree % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peak = s.get("peak_gflops") or {}
    k = s.get("keras")
    if k:
        g = k.get("infer_gflops", {}).get(bn)
        lines.append(
            f"| Keras 3 + TF (fp32) | {_fmt(k['infer_images_per_s'].get(b1))} | {_fmt(k['infer_images_per_s'].get(bn))} "
            f"| 1.00 | 1.00 | 1.00 | {_fmt(100 * g / peak['bf16'] if g and peak.get('bf16') else None)} "
            f"| {_fmt(k.get('infer_pct_of_own_peak', {}).get(bn))} "
            f"| {_fmt(k['train_step_s'].get(tb), '.2f')} | 1.00 | {_fmt(k['peak_rss_mib']['infer'], '.0f')} / "
            f"{_fmt(k['peak_rss_mib']['train'], '.0f')} | - | - | - |"
        )
    for name, o in s["ours"].items():
        acc = o.get("accuracy") or {}
        ci = acc.get("accuracy_ci95_pct")
        dci = acc.get("accuracy_diff_ci95_pp")
        lines.append(
            f"| {name} | {_fmt(o['infer_images_per_s'].get(b1))} | {_fmt(o['infer_images_per_s'].get(bn))} "
            f"| {_fmt(o.get('infer_ratio_vs_keras', {}).get(b1), '.2f')} "
            f"| {_fmt(o.get('infer_ratio_vs_keras', {}).get(bn), '.2f')} "
            f"| {_fmt(o.get('infer_cpu_ratio_vs_keras', {}).get(bn), '.2f')} "
            f"| {_fmt(o.get('infer_pct_of_bf16_peak', {}).get(bn))} "
            f"| {_fmt(o.get('infer_pct_of_own_peak', {}).get(bn))} ({o.get('format', '-')}) "
            f"| {_fmt(o['train_step_s'].get(tb), '.2f')} | {_fmt(o.get('train_ratio_vs_keras', {}).get(tb), '.2f')} "
            f"| {_fmt(o['peak_rss_mib']['infer'], '.0f')} / {_fmt(o['peak_rss_mib']['train'], '.0f')} "
            f"| {_fmt(acc.get('accuracy_pct'))}{f' [{ci[0]:.1f}, {ci[1]:.1f}]' if ci else ''} "
            f"| {_fmt(acc.get('accuracy_diff_pp'), '+.2f')}{f' [{dci[0]:+.2f}, {dci[1]:+.2f}]' if dci else ''} "
            f"| {_fmt(acc.get('class_agreement_pct'))} |"
        )
    if peak:
        lines += ["", "Instruction ceilings measured on this machine (benchmarks/peak.py, all physical cores): "
                      + ", ".join(f"{fmt} {value:.0f} GFLOP/s" for fmt, value in peak.items()) + "."]
    errors = [e for o in s["ours"].values() for e in o.get("errors", [])]
    if errors:
        lines += ["", "Failed runs:"] + [f"- {e}" for e in errors]
    d = s.get("datapath")
    if d:
        lines += ["", f"Data path (memmap cache reads + batched affine augmentation, batch {d['batch']}, "
                      f"{d['images']} images at {d['image_size']} px): {_fmt(d['steady_images_per_s'])} images/s "
                      f"(reads alone {_fmt(d['steady_read_images_per_s'], '.0f')}/s, augmentation "
                      f"{_fmt(d['steady_augment_images_per_s'])}/s) against {_fmt(d.get('training_images_per_s'))} "
                      f"images/s trained: {_fmt(d.get('headroom_x'))}x headroom, on the same cores."]
    t = s["targets"]
    g = t["targets"]
    lines += ["", f"Targets ({t['machine_class']} machine class): " + "; ".join([
        f"training step {_fmt(t['train_ratio'], '.2f')}x (>= {g['train_ratio']}: "
        f"{'met' if t['met']['train_ratio'] else 'not met'})",
        f"default inference b{bn} {_fmt(t['infer_default_ratio'], '.2f')}x (>= {g['infer_default_ratio']}: "
        f"{'met' if t['met']['infer_default_ratio'] else 'not met'})",
        f"int8 ({t['best_int8']}) {_fmt(t['infer_int8_ratio'], '.2f')}x at {_fmt(t['int8_pp_lost'], '.2f')} pp lost "
        f"(>= {g['infer_int8_ratio']}x at <= 0.5 pp: {'met' if t['met']['infer_int8'] else 'not met'})",
        f"{_fmt(t['pct_of_bf16_peak'])}% of the bf16 ceiling eager, {_fmt(t.get('pct_of_bf16_peak_compiled'))}% "
        f"compiled (>= 70: {'met' if t['met']['pct_of_bf16_peak'] else 'not met'})",
    ]) + "."]
    lines += ["", f"Accuracy reference: {report['reference']['description']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Rebuild results.json/results.md from a run folder's raw-runs.json (e.g. of a run that was cut short)."""
    import argparse
    import json
    import time
    from types import SimpleNamespace

    from benchmarks.machine import describe_machine, load_average

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run", type=Path, help="the --out folder of python -m benchmarks")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--train-batch", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--reference", default="see the run folder's reference/", help="accuracy reference description")
    args = parser.parse_args()
    runs = json.loads((args.run / "raw-runs.json").read_text())
    ref = SimpleNamespace(eval_set=args.run / "reference" / "eval_set.npz", description=args.reference)
    summary = analyse(runs, ref, args.run, batch_sizes=args.batch_sizes, train_batch=args.train_batch)
    keras_versions = next((r["versions"] for e in runs for r in e["results"] if r.get("side") == "keras"), {})
    report = {
        "started_utc": "see runs", "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": describe_machine(keras_versions), "load_average_1_5_15min": [load_average()],
        "settings": {"warmup": args.warmup, "reps": args.reps, "batch_sizes": args.batch_sizes,
                     "train_batch": args.train_batch, "image_size": args.image_size},
        "reference": {"description": args.reference}, "summary": summary, "runs": runs,
    }
    (args.run / "results.json").write_text(json.dumps(report, indent=2, default=str))
    table = render_table(report)
    (args.run / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
