"""pipeline.pooling against a plain numpy reference, for many shapes, factors, dtypes, modes and tails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexast.pipeline import pooling
from flexast.pipeline.errors import FeatureError
from flexast.pipeline.pooling import pool_time, pool_time_ragged, pooled_length


def numpy_pool(x: np.ndarray, factor: int, mode: str, tail: str) -> np.ndarray:
    """Reference: float32 groups summed in frame order (or maxed), the short tail pooled over its own frames."""
    wide = x.astype(np.float32)
    rows = []
    stop = len(x) if tail == "ceil" else len(x) // factor * factor
    for start in range(0, stop, factor):
        group = wide[start : min(start + factor, stop)]
        if mode == "max":
            rows.append(group.max(0))
        else:
            total = group[0].copy()
            for row in group[1:]:
                total += row
            rows.append(total / np.float32(len(group)))
    out = np.stack(rows) if rows else np.zeros((0, x.shape[1]), np.float32)
    return out.astype(x.dtype)


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(0, 70),
    f=st.integers(1, 9),
    factor=st.integers(1, 8),
    mode=st.sampled_from(["avg", "max"]),
    tail=st.sampled_from(["floor", "ceil"]),
    dtype=st.sampled_from([np.float16, np.float32]),
    seed=st.integers(0, 2**16),
)
def test_numba_and_torch_paths_equal_the_numpy_reference(t, f, factor, mode, tail, dtype, seed):
    x = (np.random.default_rng(seed).normal(size=(t, f)) * 4).astype(dtype)
    want = numpy_pool(x, factor, mode, tail)
    got = pool_time(x, factor, mode, tail)
    assert got.dtype == dtype and got.shape == (pooled_length(t, factor, tail), f)
    # Bitwise on every CPU: the kernel adds float32 values in the reference's order (no fastmath, so no FMA
    # contraction or reassociation), and IEEE-754 rounds each such addition and the division identically.
    np.testing.assert_array_equal(got, want)
    via_torch = pool_time(torch.from_numpy(x), factor, mode, tail, backend="torch").numpy()
    np.testing.assert_allclose(
        via_torch.astype(np.float32), want.astype(np.float32), rtol=2e-3 if dtype == np.float16 else 1e-6, atol=1e-6
    )


def test_torch_cpu_tensor_in_torch_tensor_out():
    x = torch.randn(1000, 128)
    y = pool_time(x, 3, "max", "ceil")
    assert isinstance(y, torch.Tensor) and y.shape == (334, 128)
    np.testing.assert_array_equal(y.numpy(), numpy_pool(x.numpy(), 3, "max", "ceil"))


def test_large_array_takes_the_parallel_kernel_and_agrees(monkeypatch):
    monkeypatch.setattr(pooling, "PARALLEL_MIN_ELEMENTS", 0)  # every array counts as large
    x = np.random.default_rng(0).normal(size=(2011, 16)).astype(np.float32)
    for mode in ("avg", "max"):
        np.testing.assert_array_equal(pool_time(x, 4, mode, "ceil"), numpy_pool(x, 4, mode, "ceil"))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("tail", ["floor", "ceil"])
def test_ragged_batch_pools_each_clip_on_its_own(dtype, tail, parallel, monkeypatch):
    if parallel:
        monkeypatch.setattr(pooling, "PARALLEL_MIN_ELEMENTS", 0)
    rng = np.random.default_rng(1)
    lengths = [0, 1, 5, 17, 40, 3]
    clips = [rng.normal(size=(n, 6)).astype(dtype) for n in lengths]
    values, out_lens = pool_time_ragged(np.concatenate(clips), lengths, 4, "avg", tail)
    assert out_lens.tolist() == [pooled_length(n, 4, tail) for n in lengths]
    np.testing.assert_array_equal(values, np.concatenate([numpy_pool(c, 4, "avg", tail) for c in clips]))
    t_values, t_lens = pool_time_ragged(torch.from_numpy(np.concatenate(clips)), lengths, 4, "avg", tail, "torch")
    assert t_lens.tolist() == out_lens.tolist()
    np.testing.assert_allclose(t_values.float().numpy(), values.astype(np.float32), rtol=2e-3, atol=1e-6)


def test_bad_arguments_raise_with_the_values():
    with pytest.raises(FeatureError, match=r"mode='mean'.*factor=0"):
        pool_time(np.zeros((4, 2), np.float32), 0, "mean")
    with pytest.raises(FeatureError, match="float64"):
        pool_time(np.zeros((4, 2)), 2)
    with pytest.raises(FeatureError, match=r"sum 5"):
        pool_time_ragged(np.zeros((4, 2), np.float32), [2, 3], 2)


@pytest.mark.gpu
def test_cuda_tensors_pool_on_the_device():
    x = torch.randn(999, 128, device="cuda").half()
    y = pool_time(x, 4, "avg", "ceil")
    assert y.is_cuda and y.dtype == torch.float16
    want = numpy_pool(x.cpu().numpy(), 4, "avg", "ceil").astype(np.float32)
    np.testing.assert_allclose(y.float().cpu().numpy(), want, rtol=2e-3, atol=1e-3)
