"""Per-clip resolution policies, the pooling they apply, and the phase schedule; also through the stream."""

from __future__ import annotations

import numpy as np
import pytest

from flexast.pipeline.errors import ConfigError, ShardError
from flexast.pipeline.loader import make_stream
from flexast.pipeline.resolution import ResolutionPolicy, TimeScale, apply_pool
from flexast.pipeline.stream_config import StreamConfig
from tests.factories import write_shard_folder

FRAMES = {"s10": 998, "s12": 831, "s20": 498}


def test_fixed_policy_uses_the_named_shift():
    res = ResolutionPolicy("fixed", shift_ms=12).choose(FRAMES, np.random.default_rng(0))
    assert (res.shift, res.pool, res.n_frames, res.frame_shift_ms) == ("s12", 1, 831, 12.0)
    assert res.compression == pytest.approx(1.2)


def test_random_policy_draws_every_stored_shift_uniformly():
    pol = ResolutionPolicy("random")
    rng = np.random.default_rng(0)
    picks = [pol.choose(FRAMES, rng).shift for _ in range(3000)]
    counts = {s: picks.count(s) for s in FRAMES}
    assert set(counts) == set(FRAMES) and min(counts.values()) > 900
    only = ResolutionPolicy("random", shifts_ms=[10, 20])
    assert {only.choose(FRAMES, rng).shift for _ in range(50)} == {"s10", "s20"}


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("tail", ["floor", "ceil"])
def test_pool_policy_matches_a_reshape_reference(mode, tail):
    pol = ResolutionPolicy("pool", shift_ms=10, pool_factors=[3], pool_mode=mode, pool_tail=tail)
    res = pol.choose(FRAMES, np.random.default_rng(0))
    assert res.pool == 3 and res.frame_shift_ms == 30.0
    x = np.random.default_rng(1).normal(size=(998, 8)).astype(np.float32)
    got = apply_pool(x, res, mode, tail)
    assert got.shape == (res.n_frames, 8)
    groups = [x[i : i + 3] for i in range(0, 998, 3)]
    if tail == "floor":
        groups = [g for g in groups if len(g) == 3]
    want = np.stack([g.mean(0) if mode == "avg" else g.max(0) for g in groups])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_missing_shift_and_bad_policy_are_typed_errors():
    with pytest.raises(ShardError, match="s40"):
        ResolutionPolicy("fixed", shift_ms=40).choose(FRAMES, np.random.default_rng(0))
    with pytest.raises(ConfigError) as err:
        ResolutionPolicy("zoom", pool_mode="median")
    assert "zoom" in str(err.value) and "median" in str(err.value)


def test_choices_list_what_a_clip_may_get_in_draw_order():
    assert ResolutionPolicy("fixed", shift_ms=20).choices() == [TimeScale(20.0, 1)]
    assert ResolutionPolicy("random", shifts_ms=[40, 10]).choices() == [TimeScale(40.0), TimeScale(10.0)]
    pool = ResolutionPolicy("pool", shift_ms=10, pool_factors=[1, 4])
    assert [t.frame_shift_ms for t in pool.choices()] == [10.0, 40.0]


def test_stream_applies_the_policy(tmp_path):
    write_shard_folder(tmp_path, n_shards=2, per_shard=6)
    coarse = StreamConfig(budget_tokens=512, patches=[[4, 4]], resolution={"kind": "pool", "pool_factors": [2]})
    fine = StreamConfig(budget_tokens=512, patches=[[4, 4]], resolution={"kind": "fixed", "shift_ms": 10})
    first = [float(s) for b in make_stream(coarse, str(tmp_path), epoch=0) for s in b.frame_shift_ms]
    later = [float(s) for b in make_stream(fine, str(tmp_path), epoch=1) for s in b.frame_shift_ms]
    assert set(first) == {20.0} and set(later) == {10.0} and len(first) == len(later) == 12
    random = StreamConfig(budget_tokens=512, patches=[[4, 4]], resolution={"kind": "random"})
    shifts = {float(s) for b in make_stream(random, str(tmp_path)) for s in b.frame_shift_ms}
    assert shifts == {10.0, 20.0}
