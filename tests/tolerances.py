"""Tolerances for float results that the code may compute in a different order.

Bitwise equality is asserted only where the code promises it on every CPU: the same call with the same
shapes (and, for builds, the same machine and thread count). Anywhere else (another chunking or batching
of the same frames, a strided view against its copy, a peer implementation) the BLAS and FFT kernels may
block their sums differently, and Intel and AMD CPUs take different SIMD paths: the results then differ in
their last bits (the chunked fbank by one float32 ulp on an AMD EPYC, bitwise equal on an Intel Xeon).
Those comparisons use :func:`assert_close_ulps`, a tolerance stated in units of the format's rounding.
"""

from __future__ import annotations

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7: the spacing of float32 values at 1.0
EPS16 = float(np.finfo(np.float16).eps)  # 9.77e-4: the same for float16


def assert_close_ulps(got, want, ulps: float, eps: float = EPS32) -> None:
    """``|got − want| ≤ ulps · eps · max(1, |want|)`` elementwise, and equal shapes.

    The bound is relative for values above 1 and absolute below, so rounding noise in values near zero
    (a log-mel bin of near silence) does not need its own rule.
    """
    got = torch.as_tensor(np.asarray(got, dtype=np.float64) if not torch.is_tensor(got) else got).double()
    want = torch.as_tensor(np.asarray(want, dtype=np.float64) if not torch.is_tensor(want) else want).double()
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    bound = ulps * eps * want.abs().clamp(min=1.0)
    excess = (got - want).abs() - bound
    if excess.numel() and excess.max() > 0:
        i = int(excess.argmax())
        raise AssertionError(
            f"{int((excess > 0).sum())} of {excess.numel()} values differ by more than {ulps} ulp(s) of eps={eps:.3g}: "
            f"worst at flat index {i}: got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}"
        )
