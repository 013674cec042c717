"""Why the AUC bootstrap keeps its own AUC: scikit-learn's beside ours, on the paper's test-set size.

``compute_metrics`` draws 1000 patient resamples and needs three one-vs-rest AUCs for each: 3000
AUCs per evaluation, and one evaluation per fold and per report. scikit-learn computes one AUC
from a sort of the scores (``roc_auc_score`` with the resample's counts as ``sample_weight``);
ours (``_AucPlan`` in :mod:`covid_cxr.evaluate.metrics`) sorts once and turns every resample
into one cumulative sum, all resamples together. The single AUC (no bootstrap) is scikit-learn's.

Run: ``python benchmarks/metrics_speed.py [--images 11302] [--resamples 1000] [--sklearn-resamples 100]``.
Prints the CPU, the seconds of each way, the ratio, and the largest difference between the two
AUCs over the resamples compared (both must agree to rounding).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.machine import _cpuinfo
from covid_cxr.evaluate.metrics import _AucPlan, bootstrap_auc_cis


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels in the paper's test mix (31 COVID-19, 4420 pneumonia, the rest normal), noisy scores, 2 images a patient."""
    rng = np.random.default_rng(seed)
    true = np.repeat([0, 1, 2], [31, 4420 * n // 11302, n - 31 - 4420 * n // 11302])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), true] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return true, np.round(probs, 4), np.arange(n) // 2  # rounded: ties, as float32 softmax outputs have


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=11302, help="test images (default: the paper's 11302)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples, ours (default 1000)")
    parser.add_argument("--sklearn-resamples", type=int, default=100,
                        help="resamples timed with scikit-learn (default 100; its time is scaled to --resamples)")
    args = parser.parse_args()
    true, probs, groups = synthetic(args.images)
    positives, scores = [true == k for k in range(3)], [probs[:, k] for k in range(3)]

    start = time.perf_counter()
    bootstrap_auc_cis(positives, scores, groups, n_boot=args.resamples, seed=0)
    ours = time.perf_counter() - start

    _, group_idx = np.unique(groups, return_inverse=True)
    n_groups = int(group_idx.max()) + 1
    rng = np.random.default_rng(0)
    draws = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=args.sklearn_resamples).astype(float)
    weights = draws[:, group_idx]
    start = time.perf_counter()
    theirs = [[roc_auc_score(p, s, sample_weight=w) for p, s in zip(positives, scores)] for w in weights]
    sk = (time.perf_counter() - start) * args.resamples / args.sklearn_resamples

    plans = [_AucPlan.of(p, s) for p, s in zip(positives, scores)]
    mine = np.stack([plan.weighted(draws, group_idx) for plan in plans], axis=1)
    gap = float(np.max(np.abs(mine - np.asarray(theirs))))
    print(f"CPU: {_cpuinfo().get('model name', 'unknown')}")
    print(f"{args.images} images, 3 classes, {args.resamples} patient resamples")
    print(f"ours (one sort, a cumulative sum per resample): {ours:.2f} s")
    print(f"scikit-learn roc_auc_score per resample (timed on {args.sklearn_resamples}, scaled): {sk:.2f} s")
    print(f"scikit-learn / ours: {sk / ours:.1f}x; largest AUC difference: {gap:.2e}")


if __name__ == "__main__":
    main()
