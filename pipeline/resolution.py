"""Per-clip time resolution: which stored frame shift a clip uses, and whether it is pooled.

Notation: ``T`` frames at a stored shift ``s`` ms; pooling by ``R`` over time turns ``T`` frames at
``s`` ms into ``T // R`` (tail ``floor``) or ``ceil(T / R)`` (tail ``ceil``) frames at ``s·R`` ms.
A clip's compression ``C = s·R / 10``.

Policies (chosen per clip with the clip's own generator):

* ``fixed``: one stored shift (``shift_ms``).
* ``random``: a shift drawn uniformly from ``shifts_ms`` (default: all stored shifts), ElasticAST's
  mixed-resolution training.
* ``pool``: the stored ``shift_ms`` features pooled over time by a factor drawn from ``pool_factors``
  with ``pool_mode`` avg or max (ElasticAST's pooling ablation, coarse-to-fine's Pool method), using
  the numba kernels of :mod:`pipeline.pooling`.

Coarse-to-fine training changes the policy between the recipe's stages (:mod:`model.recipes`), each stage
with its own loader; there is no schedule inside one loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flexast.pipeline.errors import ConfigError, ShardError
from flexast.pipeline.pooling import pool_time, pooled_length
from flexast.pipeline.units import parse_shift_name, shift_name

POLICIES = ("fixed", "random", "pool")


@dataclass(frozen=True)
class TimeScale:
    """A time resolution: features stored at ``shift_ms``, pooled over time by ``pool``."""

    shift_ms: float = 10.0
    pool: int = 1

    @property
    def frame_shift_ms(self) -> float:
        return self.shift_ms * self.pool

    @property
    def compression(self) -> float:
        """ElasticAST's ``C``: 10 ms frames that one frame covers (scales the SpecAugment time mask)."""
        return self.frame_shift_ms / 10.0


@dataclass(frozen=True, kw_only=True)
class Resolution(TimeScale):
    """One clip's resolution: its time scale, the stored shift's name and the frames it then has."""

    shift: str
    n_frames: int


@dataclass
class ResolutionPolicy:
    """How a clip's resolution is chosen (see the module docstring)."""

    kind: str = "fixed"
    shift_ms: float = 10.0
    shifts_ms: Sequence[float] = ()
    pool_factors: Sequence[int] = (2,)
    pool_mode: str = "avg"
    pool_tail: str = "floor"

    def __post_init__(self) -> None:
        errors = []
        if self.kind not in POLICIES:
            errors.append(f"kind={self.kind!r} (expected one of {POLICIES})")
        if self.pool_mode not in ("avg", "max"):
            errors.append(f"pool_mode={self.pool_mode!r} (expected 'avg' or 'max')")
        if self.pool_tail not in ("floor", "ceil"):
            errors.append(f"pool_tail={self.pool_tail!r} (expected 'floor' or 'ceil')")
        if any(int(r) < 1 for r in self.pool_factors) or not self.pool_factors:
            errors.append(f"pool_factors={list(self.pool_factors)} (need integers >= 1)")
        if errors:
            raise ConfigError("bad resolution policy: " + "; ".join(errors))

    @classmethod
    def at(cls, scale: TimeScale, pool_mode: str = "avg") -> ResolutionPolicy:
        """The policy that gives every clip the one time scale ``scale`` (evaluation sweeps)."""
        if scale.pool == 1:
            return cls("fixed", shift_ms=float(scale.shift_ms))
        return cls("pool", shift_ms=float(scale.shift_ms), pool_factors=[int(scale.pool)], pool_mode=pool_mode)

    def choices(self) -> list[TimeScale]:
        """The time scales a clip may get, in draw order (``random``: its ``shifts_ms``, which must be given)."""
        if self.kind == "fixed":
            return [TimeScale(float(self.shift_ms), 1)]
        if self.kind == "random":
            return [TimeScale(float(s), 1) for s in self.shifts_ms]
        return [TimeScale(float(self.shift_ms), int(r)) for r in self.pool_factors]

    def choose(self, frames: dict[str, int], rng: np.random.Generator) -> Resolution:
        """Pick a resolution for a clip whose stored frame counts are ``frames`` (``{"s10": T, ...}``)."""
        if self.kind == "random":
            names = [shift_name(s) for s in self.shifts_ms] if self.shifts_ms else sorted(frames)
            missing = [n for n in names if n not in frames]
            if missing:
                raise ShardError(
                    f"random resolution needs shifts {missing} that the clip does not store ({sorted(frames)})"
                )
            name = names[int(rng.integers(len(names)))]
            return Resolution(parse_shift_name(name), 1, shift=name, n_frames=int(frames[name]))
        name = shift_name(self.shift_ms)
        if name not in frames:
            raise ShardError(f"resolution {self.kind!r} needs shift {name!r}; the clip stores {sorted(frames)}")
        t = int(frames[name])
        if self.kind == "fixed":
            return Resolution(float(self.shift_ms), 1, shift=name, n_frames=t)
        r = int(self.pool_factors[int(rng.integers(len(self.pool_factors)))])
        return Resolution(float(self.shift_ms), r, shift=name, n_frames=pooled_length(t, r, self.pool_tail))


def apply_pool(x: np.ndarray, res: Resolution, mode: str = "avg", tail: str = "floor") -> np.ndarray:
    """``(T, F)`` → ``(T', F)`` pooled over time by ``res.pool`` with :func:`pipeline.pooling.pool_time`."""
    if res.pool == 1:
        return x
    return np.asarray(pool_time(x, res.pool, mode=mode, tail=tail))
