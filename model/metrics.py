"""Classification metrics of the AST family: mAP, macro AUC, d-prime and top-1 accuracy.

Notation: ``N`` clips, ``C`` classes. ``scores (N, C)`` are any monotone scores (logits or
probabilities); ``targets`` are multi-hot ``(N, C)`` (values > 0.5 are positives) or class indices
``(N,)``. Everything is numpy float64 and independent of sklearn.

Definitions (the ones AST reports, as sklearn computes them):
    AP_c   = Σ_k (R_k − R_{k−1}) · P_k over the distinct score thresholds of class c, descending;
             ties share one threshold.
    AUC_c  = P(score of a random positive > score of a random negative) + ½ P(equal).
    mAP, AUC = unweighted means over classes that have at least one positive (AUC: and one negative).
    d'     = √2 · Φ⁻¹(AUC).

95% intervals: :func:`wilson_interval` for a proportion such as top-1 accuracy (k correct of n), and
:func:`bootstrap_interval` (percentile bootstrap over clips) for any metric of ``(scores, targets)``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from flexast.pipeline.errors import ConfigError


def to_multi_hot(targets: np.ndarray, n_classes: int) -> np.ndarray:
    """``(N,)`` class indices as ``(N, C)`` 0/1, or multi-hot ``(N, C)`` binarised at 0.5."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        out = np.zeros((targets.shape[0], n_classes), dtype=np.float64)
        out[np.arange(targets.shape[0]), targets.astype(np.int64)] = 1.0
        return out
    return (targets > 0.5).astype(np.float64)


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class: step-wise area under the precision-recall curve, ties grouped.

    Args:
        scores: ``(N,)`` scores.
        positives: ``(N,)`` 0/1.

    Returns:
        AP, or NaN when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=np.float64)
    n_pos = positives.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positives[order]
    tp = np.cumsum(y)
    # Last index of each group of equal scores: the thresholds.
    last = np.r_[np.nonzero(np.diff(s))[0], s.shape[0] - 1]
    tp_at, n_at = tp[last], last + 1.0
    precision = tp_at / n_at
    recall = tp_at / n_pos
    d_recall = np.diff(np.r_[0.0, recall])
    return float((d_recall * precision).sum())


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """AUC of one class via the Mann–Whitney rank statistic with average ranks for ties; NaN if one-sided."""
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=np.float64) > 0.5
    n_pos = int(positives.sum())
    n_neg = positives.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average rank (1-based) within each run of tied scores.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    start = np.cumsum(counts) - counts
    rank_of = (start + (counts + 1) / 2.0)[inverse]
    u = rank_of[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def d_prime(auc: float) -> float:
    """Sensitivity index d' = √2 · Φ⁻¹(AUC); ±inf at AUC 1/0, NaN for NaN."""
    if not math.isfinite(auc):
        return float("nan")
    if auc >= 1.0:
        return float("inf")
    if auc <= 0.0:
        return float("-inf")
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def top1_accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of clips whose highest score is a positive class (AST's ESC-50/Speech Commands accuracy)."""
    scores = np.asarray(scores)
    if scores.shape[0] == 0:
        return float("nan")
    pred = scores.argmax(axis=1)
    hot = to_multi_hot(targets, scores.shape[1])
    return float(hot[np.arange(scores.shape[0]), pred].mean())


def classification_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """mAP, macro AUC, d-prime (from the macro AUC, as AST reports it) and top-1 accuracy.

    Args:
        scores: ``(N, C)``.
        targets: ``(N, C)`` multi-hot or ``(N,)`` class indices.
    """
    scores = np.asarray(scores, dtype=np.float64)
    hot = to_multi_hot(targets, scores.shape[1])
    aps = [average_precision(scores[:, c], hot[:, c]) for c in range(scores.shape[1])]
    aucs = [roc_auc(scores[:, c], hot[:, c]) for c in range(scores.shape[1])]
    aps = [a for a in aps if math.isfinite(a)]
    aucs = [a for a in aucs if math.isfinite(a)]
    m_ap = float(np.mean(aps)) if aps else float("nan")
    auc = float(np.mean(aucs)) if aucs else float("nan")
    return {"mAP": m_ap, "AUC": auc, "d_prime": d_prime(auc), "top1": top1_accuracy(scores, targets)}


def chance_metrics(targets: np.ndarray, n_classes: int) -> dict[str, float]:
    """What a constant predictor scores: mAP = mean class prevalence, AUC 0.5, top-1 = largest class share."""
    hot = to_multi_hot(targets, n_classes)
    prevalence = hot.mean(axis=0)
    present = prevalence[prevalence > 0]
    return {
        "mAP": float(present.mean()) if present.size else float("nan"),
        "AUC": 0.5,
        "d_prime": 0.0,
        "top1": float(prevalence.max()) if prevalence.size else float("nan"),
    }


def wilson_interval(k: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (k successes of n trials).

    ``(p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)`` with ``z = Φ⁻¹((1 + confidence) / 2)``; stays inside
    [0, 1] and is not degenerate at 0 or n successes. ``(nan, nan)`` when ``n == 0``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ConfigError(f"wilson_interval: k={k} must lie in [0, n={n}]")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    metric, scores: np.ndarray, targets: np.ndarray, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(scores, targets)``, resampling clips with replacement.

    Args:
        metric: a function of ``(scores (N, C), targets)`` returning a float (e.g. :func:`top1_accuracy`).
        scores: ``(N, C)``.
        targets: ``(N,)`` or ``(N, C)``, resampled with the same clip indices.
    """
    scores, targets = np.asarray(scores), np.asarray(targets)
    n = scores.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.array([metric(scores[idx], targets[idx]) for idx in rng.integers(0, n, size=(n_boot, n))])
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))
