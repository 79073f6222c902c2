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

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.fbank import RowPlan

ROW_BLOCK = 256  # rows reduced at a time by update_shared_rows (float64 temporaries fit L2)


class RunningStats:
    """Exact-merge accumulator of one frame shift's values."""

    def __init__(self, count: int = 0, sum: float = 0.0, sumsq: float = 0.0):
        self.count = int(count)
        self._sums = [float(sum)]
        self._sumsqs = [float(sumsq)]

    def update(self, values) -> None:
        """Add every element of ``values`` (numpy array or torch tensor, any shape; summed in float64).

        Torch tensors are converted and summed with torch (much faster than numpy for float16 input).
        """
        if isinstance(values, np.ndarray):
            x = np.asarray(values, dtype=np.float64).ravel()
            self.count += int(x.size)
            self._sums.append(float(x.sum()))
            self._sumsqs.append(float(np.dot(x, x)))
            return
        x = values.detach().reshape(-1)
        if x.dtype == torch.float16:
            x = x.float()  # exact; half -> float -> double is faster than half -> double
        x = x.to(dtype=torch.float64)
        self.count += int(x.numel())
        self._sums.append(float(x.sum()))
        self._sumsqs.append(float(torch.dot(x, x)))

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


def update_shared_rows(stats: dict[float, RunningStats], values: torch.Tensor, plan: RowPlan) -> None:
    """Add to ``stats[s]`` the rows of ``values`` (R, F) that shift ``s`` uses, for every shift of ``plan``.

    Rows shared by several shifts (see :class:`pipeline.fbank.ClipRows`) are reduced once: each row's sum
    and sum of squares in float64, then one product with the plan's 0/1 membership table. For float16 values
    the sums are exact (every partial sum is a multiple of 2^-24 well inside float64's 53 bits), so they
    equal a direct reduction of each shift's values bit for bit; sums of squares agree to float64 rounding.
    """
    values = values.detach()
    moments = torch.empty(values.shape[0], 2, dtype=torch.float64)  # (R, 2): row sum, row sum of squares
    for lo in range(0, values.shape[0], ROW_BLOCK):  # blocks: the float64 temporaries stay in cache
        x = values[lo : lo + ROW_BLOCK]
        x = (x.float() if x.dtype == torch.float16 else x).to(torch.float64, copy=True)  # (B, F); via float32: faster
        moments[lo : lo + ROW_BLOCK, 0] = x.sum(dim=1)
        moments[lo : lo + ROW_BLOCK, 1] = x.square_().sum(dim=1)
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
