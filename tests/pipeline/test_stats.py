"""Running statistics merge exactly: any split and order of the data gives numpy's float64 answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexast.pipeline.fbank import row_plan
from flexast.pipeline.stats import RunningStats, merge_all, update_shared_rows


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


def test_shared_rows_give_the_per_shift_statistics():
    """Reducing each distinct row once and weighting by the plan equals reducing every shift's own rows."""
    hops = ((10.0, 160), (12.0, 192), (25.0, 400))
    plan = row_plan(16000, 400, hops)
    rng = np.random.default_rng(1)
    values = torch.from_numpy(rng.normal(-3.0, 4.0, size=(plan.starts.numel(), 8)).astype(np.float16))  # (R, F)
    shared = {s: RunningStats() for s, _ in hops}
    update_shared_rows(shared, values, plan)
    for s, _ in hops:
        direct = values[plan.rows[s]].numpy().astype(np.float64).ravel()  # this shift's own values
        assert shared[s].count == direct.size == len(plan.rows[s]) * 8
        assert shared[s].sum == float(np.sum(direct))  # exact: float16 partial sums are exact in float64
        assert shared[s].sumsq == pytest.approx(float(np.dot(direct, direct)), rel=1e-15)
    alone = row_plan(16000, 400, hops[:1])  # one shift: it uses every row
    one = {10.0: RunningStats()}
    update_shared_rows(one, values[: alone.starts.numel()], alone)
    assert one[10.0].count == alone.starts.numel() * 8 == 98 * 8
    assert one[10.0].sum == float(values[:98].double().sum())


def test_shared_rows_leave_float64_input_untouched():
    plan = row_plan(8000, 400, ((10.0, 160), (20.0, 320)))
    values = torch.randn(plan.starts.numel(), 4, dtype=torch.float64)
    before = values.clone()
    stats = {10.0: RunningStats(), 20.0: RunningStats()}
    update_shared_rows(stats, values, plan)
    assert torch.equal(values, before)
    assert stats[10.0].sumsq == pytest.approx(float((values * values).sum()), rel=1e-12)
