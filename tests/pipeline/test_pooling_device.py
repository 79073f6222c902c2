"""Pooling keeps a tensor on its device: forcing the CPU-only numba kernels on a device tensor is a clear error,
never a tensor silently returned on the CPU (a ``meta`` tensor stands in for a CUDA one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexast.pipeline.errors import FeatureError
from flexast.pipeline.pooling import pool_time, pool_time_ragged


def test_numba_refuses_a_device_tensor():
    x = torch.empty(12, 4, device="meta")
    with pytest.raises(FeatureError, match=r"backend='numba' pools on the CPU only, got a tensor on meta"):
        pool_time(x, 2, backend="numba")
    with pytest.raises(FeatureError, match=r"backend='numba' pools on the CPU only, got a tensor on meta"):
        pool_time_ragged(x, [5, 7], 2, backend="numba")


def test_auto_and_torch_pool_a_device_tensor_on_its_device():
    x = torch.empty(12, 4, device="meta")
    assert pool_time(x, 2).device.type == "meta"
    assert pool_time(x, 2, backend="torch").device.type == "meta"
    assert pool_time_ragged(x, [5, 7], 2)[0].device.type == "meta"


def test_numba_still_pools_cpu_tensors_like_torch():
    x = torch.randn(13, 4)
    np.testing.assert_allclose(pool_time(x, 3, "avg", "ceil", backend="numba"), pool_time(x, 3, "avg", "ceil", "torch"))
