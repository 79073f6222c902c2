"""Temporal pooling of fbank features by an integer factor: numba kernels on CPU, torch ops on GPU.

Notation: ``T`` input frames, ``F`` features, ``R`` the pooling factor, ``T'`` output frames, ``N`` clips of a
ragged batch stored as ``values (ΣT, F)`` plus ``lengths (N,)``.

- ``mode="avg"`` averages each group of ``R`` consecutive frames; ``mode="max"`` takes their maximum.
- ``tail="floor"`` drops a last group shorter than ``R`` (``T' = T // R``); ``tail="ceil"`` keeps it
  (``T' = ceil(T / R)``) and pools it over the frames it has (an average divides by its own size), the
  convention of ``avg_pool1d(ceil_mode=True)`` without padding.
- float16 and float32 are supported; sums accumulate in float32 in frame order, and the result has the
  input's dtype. NaNs are not given special treatment (features are finite by construction).

numba has no float16 data model, so float16 input is widened to float32 before the kernel and the result
narrowed after it, both by torch (vectorised; numpy's float16 casts were 5-30x slower here). Kernels are
compiled lazily on first use and cached on disk (``cache=True``), so importing this module stays fast.
The parallel kernels (``prange``) are used only where the work pays for the threads (at least
``PARALLEL_MIN_ELEMENTS`` input values), so the small per-clip calls of DataLoader workers never start
numba's thread pool (which is not safe to fork).
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
import torch

from flexast.pipeline.errors import FeatureError

MODES = ("avg", "max")
TAILS = ("floor", "ceil")
PARALLEL_MIN_ELEMENTS = 1 << 21  # below this many input elements, pooling runs on one thread (no thread pool)


@numba.njit(cache=True, inline="always")
def _pool_rows(x, t0, t1, factor, is_max, out, o0):
    """Pool rows [t0, t1) of ``x`` into ``out`` rows starting at ``o0``; a last short group is pooled too."""
    n_feat = x.shape[1]
    acc = np.empty(n_feat, dtype=np.float32)
    o = o0
    t = t0
    while t < t1:
        stop = min(t + factor, t1)
        for f in range(n_feat):
            acc[f] = x[t, f]
        for k in range(t + 1, stop):
            if is_max:
                for f in range(n_feat):
                    v = x[k, f]
                    if v > acc[f]:
                        acc[f] = v
            else:
                for f in range(n_feat):
                    acc[f] += x[k, f]
        if is_max:
            for f in range(n_feat):
                out[o, f] = acc[f]
        else:
            count = np.float32(stop - t)
            for f in range(n_feat):
                out[o, f] = acc[f] / count
        o += 1
        t = stop


@numba.njit(cache=True)
def _pool_single(x, n_out, factor, is_max):
    out = np.empty((n_out, x.shape[1]), dtype=np.float32)
    _pool_rows(x, 0, min(x.shape[0], n_out * factor), factor, is_max, out, 0)
    return out


@numba.njit(cache=True, parallel=True)
def _pool_single_parallel(x, n_out, factor, is_max):
    out = np.empty((n_out, x.shape[1]), dtype=np.float32)
    n_rows = min(x.shape[0], n_out * factor)
    blocks = 64
    per = (n_out + blocks - 1) // blocks
    for b in numba.prange(blocks):
        o0 = b * per
        if o0 < n_out:
            _pool_rows(x, o0 * factor, min(n_rows, (o0 + per) * factor), factor, is_max, out, o0)
    return out


@numba.njit(cache=True, inline="always")
def _pool_clip(x, i, starts, lengths, out_starts, out_lengths, factor, is_max, out):
    n_rows = min(lengths[i], out_lengths[i] * factor)
    _pool_rows(x, starts[i], starts[i] + n_rows, factor, is_max, out, out_starts[i])


@numba.njit(cache=True)
def _pool_ragged(x, starts, lengths, out_starts, out_lengths, factor, is_max):
    out = np.empty((out_lengths.sum(), x.shape[1]), dtype=np.float32)
    for i in range(len(starts)):
        _pool_clip(x, i, starts, lengths, out_starts, out_lengths, factor, is_max, out)
    return out


@numba.njit(cache=True, parallel=True)
def _pool_ragged_parallel(x, starts, lengths, out_starts, out_lengths, factor, is_max):
    out = np.empty((out_lengths.sum(), x.shape[1]), dtype=np.float32)
    for i in numba.prange(len(starts)):
        _pool_clip(x, i, starts, lengths, out_starts, out_lengths, factor, is_max, out)
    return out


def pooled_length(num_frames: int, factor: int, tail: str = "floor") -> int:
    """``T'`` for ``T`` frames: ``T // R`` (floor) or ``ceil(T / R)`` (ceil)."""
    return num_frames // factor if tail == "floor" else -(-num_frames // factor)


def _check(mode: str, tail: str, factor: int, x) -> None:
    bad = []
    if mode not in MODES:
        bad.append(f"mode={mode!r} not in {MODES}")
    if tail not in TAILS:
        bad.append(f"tail={tail!r} not in {TAILS}")
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        bad.append(f"factor={factor!r} must be a positive int")
    if x.ndim != 2:
        bad.append(f"features must be (T, F), got shape {tuple(x.shape)}")
    if str(x.dtype).split(".")[-1] not in ("float16", "float32"):
        bad.append(f"dtype {x.dtype} is not float16 or float32")
    if bad:
        raise FeatureError("cannot pool: " + "; ".join(bad))


def _host_only(x, backend: str) -> None:
    """The numba kernels run on the host: a device tensor forced through them would come back on the CPU."""
    if isinstance(x, torch.Tensor) and x.device.type != "cpu":
        raise FeatureError(
            f"backend={backend!r} pools on the CPU only, got a tensor on {x.device}; "
            f"use backend='torch' (or 'auto') to pool it on its device"
        )


def _widen(x: np.ndarray) -> np.ndarray:
    """Contiguous float32 input for the kernels (float16 is widened exactly, by torch)."""
    if x.dtype == np.float16:
        # Memory-mapped shard members are read-only; torch warns about that, but .float() copies and never writes.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()
    return np.ascontiguousarray(x)


def _narrow(out: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Back to the input dtype (round to nearest even, by torch)."""
    return torch.from_numpy(out).half().numpy() if dtype == np.float16 else out


def _torch_pool(x: torch.Tensor, factor: int, mode: str, n_out: int) -> torch.Tensor:
    """Torch ops (any device): groups (T', R, F), a short last group pooled on its own."""
    t_full = x.shape[0] // factor
    wide = x.float()
    groups = wide[: t_full * factor].reshape(t_full, factor, x.shape[1])  # (T', R, F)
    parts = [groups.mean(1) if mode == "avg" else groups.amax(1)]
    if n_out > t_full:
        rest = wide[t_full * factor :]  # (T mod R, F)
        parts.append(rest.mean(0, keepdim=True) if mode == "avg" else rest.amax(0, keepdim=True))
    return torch.cat(parts).to(x.dtype)  # (T', F)


def pool_time(x, factor: int, mode: str = "avg", tail: str = "floor", backend: str = "auto"):
    """Pool ``x`` ``(T, F)`` over time by ``factor``; returns ``(T', F)`` of the same type, dtype and device.

    Args:
        x: numpy array or torch tensor, float16 or float32.
        factor: ``R``; 1 returns a copy.
        mode: ``"avg"`` or ``"max"``.
        tail: ``"floor"`` or ``"ceil"`` (see the module docstring).
        backend: ``"auto"`` (numba for CPU, torch for CUDA tensors), ``"numba"`` or ``"torch"``.
    """
    _check(mode, tail, factor, x)
    n_out = pooled_length(x.shape[0], factor, tail)
    is_tensor = isinstance(x, torch.Tensor)
    if backend == "torch" or (backend == "auto" and is_tensor and x.device.type != "cpu"):
        out = _torch_pool(x if is_tensor else torch.from_numpy(np.ascontiguousarray(x)), factor, mode, n_out)
        return out if is_tensor else out.numpy()
    if backend not in ("auto", "numba"):
        raise FeatureError(f"backend={backend!r} not in ('auto', 'numba', 'torch')")
    _host_only(x, backend)
    arr = x.detach().numpy() if is_tensor else x
    data = _widen(arr)
    kernel = _pool_single_parallel if n_out * arr.shape[1] * factor >= PARALLEL_MIN_ELEMENTS else _pool_single
    out = _narrow(kernel(data, n_out, factor, mode == "max"), arr.dtype)
    return torch.from_numpy(out) if is_tensor else out


def pool_time_ragged(values, lengths, factor: int, mode: str = "avg", tail: str = "floor", backend: str = "auto"):
    """Pool every clip of a ragged batch: ``values (ΣT, F)``, ``lengths (N,)`` -> ``(values', lengths')``.

    Clips never mix: each pools its own frames and its own tail. Types follow :func:`pool_time`.
    """
    _check(mode, tail, factor, values)
    is_tensor = isinstance(values, torch.Tensor)
    lens = np.asarray(lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths, dtype=np.int64).reshape(-1)
    if lens.sum() != values.shape[0] or (lens < 0).any():
        raise FeatureError(f"lengths (sum {int(lens.sum())}) do not cover values of shape {tuple(values.shape)}")
    out_lens = lens // factor if tail == "floor" else -(-lens // factor)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    out_starts = np.concatenate([[0], np.cumsum(out_lens)[:-1]]).astype(np.int64)
    if backend == "torch" or (backend == "auto" and is_tensor and values.device.type != "cpu"):
        v = values if is_tensor else torch.from_numpy(np.ascontiguousarray(values))
        pieces = [
            _torch_pool(v[s : s + n], factor, mode, int(m)) for s, n, m in zip(starts, lens, out_lens, strict=True)
        ]
        out = torch.cat(pieces) if pieces else v[:0]
        out_lens_t = torch.from_numpy(out_lens)
        return (out, out_lens_t) if is_tensor else (out.numpy(), out_lens)
    if backend not in ("auto", "numba"):
        raise FeatureError(f"backend={backend!r} not in ('auto', 'numba', 'torch')")
    _host_only(values, backend)
    arr = values.detach().numpy() if is_tensor else values
    data = _widen(arr)
    if len(lens) == 0:
        out = np.zeros((0, arr.shape[1]), dtype=arr.dtype)
    else:
        kernel = _pool_ragged_parallel if data.size >= PARALLEL_MIN_ELEMENTS else _pool_ragged
        out = _narrow(kernel(data, starts, lens, out_starts, out_lens, factor, mode == "max"), arr.dtype)
    return (torch.from_numpy(out), torch.from_numpy(out_lens)) if is_tensor else (out, out_lens)
