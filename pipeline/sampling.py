"""AST balanced sampling, applied to a stream as sample-level reweighting.

As in the AST repository: a label's weight is ``1000 / (count + 0.01)`` and a clip's weight is the
sum of its labels' weights. A stream has no sampler to hand weights to, so the reweighting stage
emits each clip ``k`` times, ``k`` the clip's weight over the dataset's mean clip weight, rounded
stochastically (``floor(r)`` plus one with probability ``r − floor(r)``). The expected epoch size
is unchanged, rare-label clips repeat and common-label clips are thinned. Repeats of a clip get an
occurrence number so their per-clip random draws differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def label_weights(counts: Sequence[float]) -> np.ndarray:
    """``(C,)`` label weights ``1000 / (count + 0.01)``."""
    return 1000.0 / (np.asarray(counts, dtype=np.float64) + 0.01)


def clip_weights(label_ids: Sequence[Sequence[int]], counts: Sequence[float]) -> np.ndarray:
    """``(N,)`` clip weights: the sum over each clip's labels of the label weights."""
    w = label_weights(counts)
    return np.array([float(w[list(ids)].sum()) if len(ids) else 0.0 for ids in label_ids])


def mean_clip_weight(counts: Sequence[float], n_clips: int) -> float:
    """Mean clip weight over a dataset whose label counts are ``counts`` (Σ_c count_c·w_c / N)."""
    c = np.asarray(counts, dtype=np.float64)
    return float((c * label_weights(c)).sum() / max(n_clips, 1))


def reweight_stage(
    src: Iterable[dict], counts: Sequence[float], mean_weight: float, rng: np.random.Generator
) -> Iterator[dict]:
    """Repeat or drop samples (``meta["label_ids"]``) in proportion to their balanced weight; sets ``"occurrence"``."""
    w = label_weights(counts)
    for sample in src:
        ids = sample["meta"].get("label_ids", [])
        r = float(w[list(ids)].sum()) / mean_weight if len(ids) else 0.0
        k = int(np.floor(r)) + int(rng.random() < r - np.floor(r))
        for occ in range(k):
            yield {**sample, "occurrence": occ}
