"""Mergeable running statistics of log-mel values, per frame shift, in float64.

Each shard task accumulates ``count``, ``sum`` and ``sumsq`` over every value it writes (the float16
values as stored, so the statistics describe exactly what the loader reads). Partial sums are kept as
float64 terms and combined with :func:`math.fsum` (correctly rounded), so merged results do not depend
on how many workers ran or in which order they finished. Mean and std are derived at the end:
``mean = sum / count`` and ``std = sqrt(sumsq / count - mean²)`` (population std, as AST's recipes use).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numba
import numpy as np
import torch

if TYPE_CHECKING:
    from flexast.pipeline.fbank import RowPlan


class RunningStats:
    """Exact-merge accumulator of one frame shift's values."""

    def __init__(self, count: int = 0, sum: float = 0.0, sumsq: float = 0.0):
        self.count = int(count)
        self._sums = [float(sum)]
        self._sumsqs = [float(sumsq)]

    def update(self, values) -> None:
        """Add every element of ``values`` (numpy array or torch tensor, any shape; summed in float64)."""
        x = torch.as_tensor(values).reshape(1, -1)  # one row holding every value
        total, total_sq = row_moments(x)[0].tolist()
        self.add(x.numel(), total, total_sq)

    def add(self, count: int, sum: float, sumsq: float) -> None:
        """Add already-reduced moments of ``count`` values."""
        self.count += int(count)
        self._sums.append(float(sum))
        self._sumsqs.append(float(sumsq))

    @property
    def sum(self) -> float:
        return math.fsum(self._sums)

    @property
    def sumsq(self) -> float:
        return math.fsum(self._sumsqs)

    def merge(self, other: RunningStats) -> RunningStats:
        """A new accumulator holding both (neither input changes)."""
        return merge_all([self, other])

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 0.0
        return math.sqrt(max(0.0, self.sumsq / self.count - self.mean**2))

    def to_dict(self) -> dict:
        """``{"count", "sum", "sumsq", "mean", "std"}`` as stored in ``index.json``."""
        return {"count": self.count, "sum": self.sum, "sumsq": self.sumsq, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict) -> RunningStats:
        return cls(count=int(d["count"]), sum=float(d["sum"]), sumsq=float(d["sumsq"]))

    def __repr__(self) -> str:
        return f"RunningStats(count={self.count}, mean={self.mean:.6g}, std={self.std:.6g})"


_HALF_TO_DOUBLE = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)  # every float16, widened


@numba.njit(cache=True, nogil=True)
def _half_row_moments(bits: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """``out[r] = (Σ_f x[r, f], Σ_f x[r, f]²)`` in float64 for float16 values given as their ``(R, F)`` bits."""
    n = bits.shape[1]
    for r in range(bits.shape[0]):
        s0, s1, q0, q1 = 0.0, 0.0, 0.0, 0.0  # two chains each: the adds do not wait on one another
        for f in range(0, n - 1, 2):
            a, b = table[bits[r, f]], table[bits[r, f + 1]]
            s0 += a
            s1 += b
            q0 += a * a
            q1 += b * b
        if n % 2:
            a = table[bits[r, n - 1]]
            s0 += a
            q0 += a * a
        out[r, 0] = s0 + s1
        out[r, 1] = q0 + q1


def row_moments(values: torch.Tensor) -> torch.Tensor:
    """``(R, 2)`` float64: each row's sum and sum of squares, for an ``(R, F)`` tensor (float16 on CPU: numba).

    Sums of float16 values are exact in float64 in any order (every partial sum is a multiple of 2^-24 well
    inside 53 bits), so they do not depend on how they are computed; sums of squares agree to float64 rounding.
    """
    values = values.detach()
    if values.dtype == torch.float16 and values.device.type == "cpu":
        out = np.empty((values.shape[0], 2), dtype=np.float64)
        bits = values.contiguous().view(torch.int16).numpy().view(np.uint16)  # (R, F) raw float16 bits
        _half_row_moments(bits, _HALF_TO_DOUBLE, out)
        return torch.from_numpy(out)
    x = values.to(torch.float64)  # (R, F)
    return torch.stack([x.sum(dim=1), (x * x).sum(dim=1)], dim=1)


def update_shared_rows(stats: dict[float, RunningStats], values: torch.Tensor, plan: RowPlan) -> None:
    """Add to ``stats[s]`` the rows of ``values`` (R, F) that shift ``s`` uses, for every shift of ``plan``.

    Rows shared by several shifts (see :class:`pipeline.fbank.ClipRows`) are reduced once
    (:func:`row_moments`), then weighted by one product with the plan's 0/1 membership table. For float16
    values the sums equal a direct reduction of each shift's values bit for bit.
    """
    moments = row_moments(values).cpu()  # (R, 2)
    per_shift = (plan.uses.to(torch.float64) @ moments).tolist()  # (n_shifts, R) @ (R, 2) -> (n_shifts, 2)
    rows_used = plan.uses.sum(dim=1).tolist()  # (n_shifts,)
    for s, (total, total_sq), n_rows in zip(plan.rows, per_shift, rows_used, strict=True):
        stats[s].add(n_rows * int(values.shape[1]), total, total_sq)


def merge_all(parts: Iterable[RunningStats]) -> RunningStats:
    """Merge many accumulators with one correctly-rounded sum (the result is order-independent)."""
    out = RunningStats()
    for p in parts:
        out.count += p.count
        out._sums.extend(p._sums)
        out._sumsqs.extend(p._sumsqs)
    return out
