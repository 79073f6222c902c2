"""Metrics against hand examples and brute-force definitions (no sklearn)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flexast.model.metrics import (
    average_precision,
    chance_metrics,
    classification_metrics,
    d_prime,
    roc_auc,
    top1_accuracy,
)
from flexast.model.schedule import lr_at


def brute_auc(scores, pos):
    p = [s for s, y in zip(scores, pos, strict=True) if y]
    n = [s for s, y in zip(scores, pos, strict=True) if not y]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in p for b in n)
    return wins / (len(p) * len(n))


def brute_ap(scores, pos):
    """Mean over positives of the precision at that positive's score threshold (ties: all equal scores in)."""
    vals = []
    for s, y in zip(scores, pos, strict=True):
        if y:
            above = [y2 for s2, y2 in zip(scores, pos, strict=True) if s2 >= s]
            vals.append(sum(above) / len(above))
    return sum(vals) / len(vals)


def test_hand_examples():
    # Ranking: pos, neg, pos -> precision 1 at first hit, 2/3 at second.
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx((1 + 2 / 3) / 2)
    assert roc_auc(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx(0.5)
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5  # one tie counts half
    assert math.isnan(average_precision(np.array([0.1, 0.2]), np.array([0, 0])))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties on purpose
    pos = rng.random(40) < 0.4
    assert roc_auc(scores, pos) == pytest.approx(brute_auc(scores, pos), abs=1e-12)
    assert average_precision(scores, pos) == pytest.approx(brute_ap(scores, pos), abs=1e-12)


def test_d_prime_inverts_the_binormal_auc():
    # Equal-variance Gaussian model: AUC = Φ(d'/√2).
    for d in (0.0, 0.5, 1.0, 2.5):
        auc = 0.5 * (1 + math.erf(d / math.sqrt(2) / math.sqrt(2)))
        assert d_prime(auc) == pytest.approx(d, abs=1e-9)
    assert d_prime(1.0) == math.inf


def test_classification_metrics_single_and_multi_label():
    scores = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 2.0], [1.0, 0.0, 0.5]])
    m = classification_metrics(scores, np.array([0, 1, 2, 2]))
    assert m["top1"] == 0.75
    hot = np.eye(3)[[0, 1, 2, 2]]
    m2 = classification_metrics(scores, hot)
    assert m2 == pytest.approx(m)
    per_class = [average_precision(scores[:, c], hot[:, c]) for c in range(3)]
    assert m["mAP"] == pytest.approx(np.mean(per_class))
    assert top1_accuracy(scores, hot) == 0.75
    ch = chance_metrics(np.array([0, 1, 2, 2]), 3)
    assert ch["top1"] == 0.5 and ch["AUC"] == 0.5


def test_lr_schedule_ast_step_and_cosine():
    kw = dict(base_lr=1.0, warmup_steps=4, steps_per_epoch=10)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(19, **kw) == 1.0  # epochs 0 and 1 at full lr
    assert lr_at(20, **kw) == 0.5  # halved from the third epoch (after the 2nd)
    assert lr_at(35, **kw) == 0.25
    cos = dict(base_lr=1.0, warmup_steps=0, schedule="cosine", total_steps=100, min_lr=0.1)
    assert lr_at(0, **cos) == 1.0
    assert lr_at(50, **cos) == pytest.approx(0.55)
    assert lr_at(100, **cos) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="linear"):
        lr_at(5, base_lr=1.0, schedule="linear")
