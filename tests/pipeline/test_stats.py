"""Running statistics merge exactly: any split and order of the data gives numpy's float64 answer."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.stats import RunningStats, merge_all


def test_merge_is_order_independent_and_matches_numpy():
    rng = np.random.default_rng(0)
    parts = [rng.normal(-4.0, 3.0, size=(int(rng.integers(1, 300)), 16)).astype(np.float16) for _ in range(25)]
    shards = []
    for chunk in np.array_split(np.arange(25), 5):
        st = RunningStats()
        for i in chunk:
            st.update(parts[i])
        shards.append(st)
    a = merge_all(shards)
    b = merge_all(shards[::-1])
    c = shards[0].merge(merge_all(shards[1:]))
    allv = np.concatenate(parts).astype(np.float64)
    assert a.count == allv.size and a.to_dict() == b.to_dict()
    assert a.sum == pytest.approx(float(np.sum(allv)), rel=1e-13) and c.mean == a.mean
    assert a.mean == pytest.approx(allv.mean(), rel=1e-12) and a.std == pytest.approx(allv.std(), rel=1e-9)
    again = RunningStats.from_dict(a.to_dict())
    assert again.to_dict() == a.to_dict()


def test_empty_stats():
    assert RunningStats().to_dict() == {"count": 0, "sum": 0.0, "sumsq": 0.0, "mean": 0.0, "std": 0.0}
