"""Kaldi fbank for a batch of clips at many frame shifts at once, in batched torch (CPU or CUDA).

Notation: ``N`` clips, ``S`` samples (16 kHz unless ``sample_frequency`` says otherwise), ``W`` window length
in samples, ``P`` padded FFT length, ``K = P // 2`` FFT bins used (the Nyquist bin has zero mel weight),
``F`` output features (mel bins, plus one when ``use_energy``), ``T`` frames of one clip at one shift,
``R`` distinct frames (rows) across all shifts. Frame lengths and shifts are in ms.

How it is exact. Bins far below a frame's peak (about -90 dB) hold float32 rounding noise, and any
re-association of the arithmetic *before* the FFT moves them by up to 1e-2 in log units. So everything up
to the FFT input repeats the reference's float32 operations in the reference's order (gather, row mean,
subtract, pre-emphasis, window, zero pad); those are elementwise or row-wise and give the same bits whatever
the batch. After the FFT, rounding only perturbs each value relative to itself (1e-7), so we are free to
reorganise: ``re² + im²`` instead of ``|z|²``, folded into a banded mel GEMM, and an in-place log.

How it is fast.
- Frames whose start sample coincides across shifts are computed once: the rows are the union of the
  start samples of every shift (3224 instead of 7562 for a 10 s clip at the 16 ElasticAST shifts), and
  each shift gathers its rows from that union.
- Rows are processed in chunks that fit a core's L2 (``chunk_rows``), through reused buffers.
- The window, the mel matrix and the row plan of each clip length are built once and cached.
- Work the options do not need (energy when ``use_energy`` is off) is skipped.

Clips shorter than one window (or than ``min_duration``) give zero frames, shape ``(0, F)``, at every
shift; the reference raises instead. Callers that need at least one frame check ``len(out[shift][i])``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from flexast.pipeline.errors import FeatureError
from flexast.pipeline.fbank_options import FLT_EPSILON, FbankOptions, mel_banks, window_function

BACKENDS = ("flexast", "kaldi-native", "torchaudio", "nnaudio-mel")
DEFAULT_CHUNK_ROWS = {"cpu": 512, "cuda": 65536}  # CPU: per torch thread; (512, 512) float32 fits its L2


@dataclass(frozen=True)
class RowPlan:
    """Which frames one clip length needs: ``starts`` (R,) distinct start samples, sorted; per shift the rows
    of ``starts`` it uses (``None`` when it uses all of them in order); and ``uses`` (n_shifts, R), bool, the
    same as a membership table in ``rows``' order (``uses[j, r]``: shift j uses row r)."""

    starts: torch.Tensor
    rows: dict[float, torch.Tensor | None]
    uses: torch.Tensor


@lru_cache(maxsize=256)
def row_plan(num_samples: int, window: int, hops: tuple[tuple[float, int], ...]) -> RowPlan:
    """Distinct frame starts of a clip of ``num_samples`` across ``hops`` ((shift_ms, hop_samples) pairs)."""
    if num_samples < window:
        empty = torch.zeros(0, dtype=torch.long)
        return RowPlan(empty, {s: empty for s, _ in hops}, torch.zeros(len(hops), 0, dtype=torch.bool))
    per_shift = {s: torch.arange(1 + (num_samples - window) // h, dtype=torch.long) * h for s, h in hops}
    if len({h for _, h in hops}) == 1:
        starts = next(iter(per_shift.values()))
        return RowPlan(starts, dict.fromkeys(per_shift), torch.ones(len(hops), starts.numel(), dtype=torch.bool))
    starts = torch.unique(torch.cat(list(per_shift.values())))  # sorted
    rows = {s: torch.searchsorted(starts, st) for s, st in per_shift.items()}
    uses = torch.zeros(len(hops), starts.numel(), dtype=torch.bool)
    for j, idx in enumerate(rows.values()):
        uses[j, idx] = True
    return RowPlan(starts, rows, uses)


def _as_padded(waveforms, lengths) -> tuple[torch.Tensor, list[int]]:
    """(N, S_max) contiguous batch and the python lengths, from a padded tensor or a list of 1-D tensors."""
    if isinstance(waveforms, torch.Tensor):
        if waveforms.dim() == 1:
            waveforms = waveforms.unsqueeze(0)  # (1, S)
        if waveforms.dim() != 2:
            raise FeatureError(f"waveforms must be (N, S) or (S,), got shape {tuple(waveforms.shape)}")
        n, s = waveforms.shape
        if lengths is None:
            lens = [s] * n
        else:
            lens = [int(x) for x in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if len(lens) != n or any(not 0 <= x <= s for x in lens):
            raise FeatureError(f"lengths {lens} do not fit waveforms of shape {tuple(waveforms.shape)}")
        return waveforms.contiguous(), lens
    clips = [torch.as_tensor(w) for w in waveforms]
    bad = [(i, tuple(w.shape)) for i, w in enumerate(clips) if w.dim() != 1]
    if bad:
        raise FeatureError(f"each clip must be a 1-D tensor; (index, shape) of the others: {bad}")
    if lengths is not None:
        raise FeatureError("lengths must be None when waveforms is a list (each clip has its own length)")
    if not clips:
        return torch.zeros(0, 0), []
    lens = [w.numel() for w in clips]
    if len(clips) == 1:  # nothing to pad: a view, not a copy
        return clips[0].reshape(1, -1).contiguous(), lens  # (1, S)
    return torch.nn.utils.rnn.pad_sequence(clips, batch_first=True), lens  # (N, S_max)


def _mel_blocks(banks_t: torch.Tensor, per_block: int = 16) -> list[tuple[int, int, torch.Tensor]]:
    """The mel GEMM cut into bands: ``(lo, hi, weights)`` per group of ``per_block`` consecutive filters.

    Power and mel go in one product: the FFT output viewed as interleaved (re, im) columns, squared, times
    each filter weight repeated for re and im. The triangles are narrow and sorted, so each group of filters
    only touches the FFT columns ``[lo, hi)``; with 128 bins this is 13% of the dense product's work.
    """
    f = banks_t.shape[1]  # banks_t: (K, F)
    weights_ri = banks_t.repeat_interleave(2, dim=0)  # (2K, F): row 2k is re of bin k, row 2k + 1 its im
    blocks = []
    for f0 in range(0, f, per_block):
        band = weights_ri[:, f0 : f0 + per_block]  # (2K, f_b)
        used = band.ne(0).any(dim=1).nonzero().flatten()
        lo, hi = (int(used.min()), int(used.max()) + 1) if used.numel() else (0, 1)
        blocks.append((lo, hi, band[lo:hi].contiguous()))  # (hi - lo, f_b)
    return blocks


@dataclass(frozen=True)
class _Constants:
    """What the kernel needs that depends only on the options, dtype and device (built once, then cached)."""

    window: torch.Tensor  # (W,)
    banks_t: torch.Tensor  # (K, F)
    blocks: list  # _mel_blocks(banks_t)
    eps: torch.Tensor  # ()


@lru_cache(maxsize=32)
def _constants(opts: FbankOptions, dtype: torch.dtype, device: torch.device) -> _Constants:
    banks_t = mel_banks(opts, dtype, device).T.contiguous()  # (K, F)
    eps = torch.tensor(FLT_EPSILON, dtype=dtype, device=device)
    return _Constants(window_function(opts, dtype, device), banks_t, _mel_blocks(banks_t), eps)


class _Kernel:
    """The per-row computation for one set of options, dtype and device; one per call (it owns a buffer)."""

    def __init__(self, opts: FbankOptions, dtype: torch.dtype, device: torch.device):
        self.opts = opts
        c = _constants(opts, dtype, device)
        self.window, self.banks_t, self.blocks, self.eps = c.window, c.banks_t, c.blocks, c.eps
        self.log_floor = math.log(opts.energy_floor) if opts.energy_floor > 0 else None
        self._buf = torch.zeros(0, opts.padded_size, dtype=dtype, device=device)

    def _log_energy(self, frames: torch.Tensor) -> torch.Tensor:
        energy = torch.maximum(frames.pow(2).sum(1), self.eps).log()  # (R,)
        return energy if self.log_floor is None else energy.clamp_min(self.log_floor)

    def __call__(self, frames: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """``frames`` (R, W), a fresh copy we may overwrite; ``noise`` (R, W) or None. Returns (R, F)."""
        o = self.opts
        r, w = frames.shape
        if noise is not None:
            frames = frames + noise * o.dither
        if o.remove_dc_offset:
            frames = frames - torch.mean(frames, dim=1).unsqueeze(1)
        energy = self._log_energy(frames) if o.use_energy and o.raw_energy else None
        if self._buf.shape[0] < r:
            self._buf = torch.empty(r, o.padded_size, dtype=frames.dtype, device=frames.device)
            self._buf[:, w:] = 0  # the zero padding; columns :W are overwritten for every chunk
        buf = self._buf[:r]  # (R, P); columns W: stay zero
        a = o.preemphasis_coefficient
        if a != 0.0:
            torch.sub(frames[:, 1:], a * frames[:, :-1], out=buf[:, 1:w])
            torch.sub(frames[:, :1], a * frames[:, :1], out=buf[:, :1])
        else:
            buf[:, :w] = frames
        buf[:, :w] *= self.window
        if o.use_energy and not o.raw_energy:
            energy = self._log_energy(buf)
        spec = torch.view_as_real(torch.fft.rfft(buf))  # (R, K + 1, 2)
        if o.use_power:
            power_ri = spec.square_().reshape(r, -1)  # (R, 2(K + 1)): re², im² interleaved
            mel = torch.cat([power_ri[:, lo:hi] @ weights for lo, hi, weights in self.blocks], dim=1)  # (R, F)
        else:
            magnitude = (spec[:, :-1, 0].square() + spec[:, :-1, 1].square()).sqrt_()  # (R, K)
            mel = magnitude @ self.banks_t  # (R, F)
        if o.use_log_fbank:
            mel = torch.maximum(mel, self.eps).log_()
        if energy is not None:
            energy = energy.unsqueeze(1)  # (R, 1)
            mel = torch.cat((mel, energy), dim=1) if o.htk_compat else torch.cat((energy, mel), dim=1)
        return mel


@dataclass(frozen=True)
class ClipRows:
    """One clip's features at every shift, each distinct frame stored once: ``values`` (R, F) and the plan.

    ``at(shift_ms)`` gathers that shift's ``(T, F)`` features. Consumers that reduce over every shift
    (the build's statistics) can work on ``values`` once and weight rows by ``plan.uses`` instead.
    """

    values: torch.Tensor
    plan: RowPlan

    def frames(self, shift_ms: float) -> int:
        """``T`` at ``shift_ms``, without gathering."""
        rows = self.plan.rows[shift_ms]
        return int(self.values.shape[0] if rows is None else rows.numel())

    def at(self, shift_ms: float) -> torch.Tensor:
        rows = self.plan.rows[shift_ms]
        return self.values if rows is None else self.values.index_select(0, rows.to(self.values.device))  # (T, F)


def _flexast_rows(
    wave: torch.Tensor,
    lens: list[int],
    shifts: tuple[float, ...],
    opts: FbankOptions,
    chunk_rows: int,
    seed: int,
    store_dtype: torch.dtype,
) -> list[ClipRows]:
    s_max = wave.shape[1]
    device, dtype = wave.device, wave.dtype
    w = opts.window_size
    hops = tuple((s, opts.hop(s)) for s in shifts)
    min_samples = max(w, math.ceil(opts.min_duration * opts.sample_frequency))
    plans = [row_plan(x if x >= min_samples else 0, w, hops) for x in lens]
    counts = [p.starts.numel() for p in plans]
    offsets = [0, *torch.tensor(counts).cumsum(0).tolist()] if counts else [0]
    total = offsets[-1]
    out = torch.empty(total, opts.num_features, dtype=store_dtype, device=device)  # (ΣR, F)
    if total:
        # Global start sample of every distinct row: clip i's samples begin at i * S_max in the flat batch.
        starts = torch.cat([p.starts + i * s_max for i, p in enumerate(plans)]).to(device)  # (ΣR,)
        flat = wave.reshape(-1)  # (N * S_max,)
        every = flat.as_strided((flat.numel() - w + 1, w), (1, 1))  # (N * S_max - W + 1, W): a view
        noise = _dither_noise(counts, w, opts, seed, dtype, device)
        kernel = _Kernel(opts, dtype, device)
        for lo in range(0, total, chunk_rows):
            hi = min(lo + chunk_rows, total)
            frames = every.index_select(0, starts[lo:hi])  # (R_chunk, W)
            out[lo:hi] = kernel(frames, None if noise is None else noise[lo:hi])  # casts to store_dtype
    return [ClipRows(out[offsets[i] : offsets[i + 1]], plan) for i, plan in enumerate(plans)]


def _dither_noise(counts, w, opts, seed, dtype, device) -> torch.Tensor | None:
    """Gaussian noise (ΣR, W), drawn per clip from a generator seeded ``seed + clip index``, so the output
    does not depend on ``chunk_rows``. A frame shared by several shifts gets the same noise in each."""
    if opts.dither == 0.0:
        return None
    parts = []
    for i, c in enumerate(counts):
        gen = torch.Generator(device=device).manual_seed(seed + i)
        parts.append(torch.randn(c, w, generator=gen, dtype=dtype, device=device))
    return torch.cat(parts)  # (ΣR, W)


def _prepare(waveforms, lengths, shifts_ms, options) -> tuple[FbankOptions, tuple[float, ...], torch.Tensor, list]:
    """Validated options, shifts, padded ``(N, S_max)`` batch and lengths of a call."""
    opts = FbankOptions.from_kwargs(**options)
    shifts = tuple(float(s) for s in (shifts_ms if shifts_ms is not None else [opts.frame_shift]))
    if not shifts or len(set(shifts)) != len(shifts):
        raise FeatureError(f"shifts_ms must be a non-empty list of distinct shifts, got {list(shifts)}")
    opts.validate(shifts)
    wave, lens = _as_padded(waveforms, lengths)
    if wave.dtype not in (torch.float32, torch.float64):
        raise FeatureError(f"waveforms must be float32 (or float64 for tests), got {wave.dtype}")
    return opts, shifts, wave, lens


OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _out_dtype(out_dtype: torch.dtype | None, wave: torch.Tensor) -> torch.dtype:
    if out_dtype is None:
        return wave.dtype
    if out_dtype not in OUT_DTYPES:
        raise FeatureError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    return out_dtype


def _chunk_rows(chunk_rows: int | None, device: torch.device) -> int:
    if chunk_rows is None:  # on CPU, each of torch's threads takes about DEFAULT_CHUNK_ROWS["cpu"] rows
        per = DEFAULT_CHUNK_ROWS.get(device.type, DEFAULT_CHUNK_ROWS["cpu"])
        chunk_rows = per * torch.get_num_threads() if device.type == "cpu" else per
    if chunk_rows <= 0:
        raise FeatureError(f"chunk_rows must be positive, got {chunk_rows}")
    return chunk_rows


def fbank(
    waveforms: torch.Tensor | Sequence[torch.Tensor],
    lengths: torch.Tensor | Sequence[int] | None = None,
    shifts_ms: Sequence[float] | None = None,
    *,
    backend: str = "flexast",
    out_dtype: torch.dtype | None = None,
    chunk_rows: int | None = None,
    seed: int = 0,
    **options,
) -> dict[float, list[torch.Tensor]]:
    """Kaldi fbank of every clip at every frame shift.

    Args:
        waveforms: padded ``(N, S)`` tensor (with ``lengths``), one clip ``(S,)``, or a list of 1-D tensors.
            float32 is the production dtype; float64 is supported for tests. The device of the input is used.
        lengths: valid samples of each row of a padded batch; ``None`` means every row is full.
        shifts_ms: frame shifts in ms (e.g. ``ELASTICAST_SHIFTS_MS``); default ``[frame_shift]``.
        backend: ``"flexast"`` (ours, default), ``"kaldi-native"``, ``"torchaudio"`` or ``"nnaudio-mel"``
            (a librosa-style GPU mel frontend, *not* Kaldi or AST compatible); see :mod:`pipeline.fbank_backends`.
        out_dtype: dtype of the returned features (default: the waveform's). ``torch.float16`` is what shards
            store; the cast happens once per distinct frame, before the per-shift gather, and gives the same
            values as casting each shift's float32 features.
        chunk_rows: frames per chunk; default 512 per torch thread on CPU (each thread's share of the
            buffers stays in its core's L2), 65536 on CUDA.
        seed: seeds the dither noise (only used when ``dither > 0``).
        **options: the keywords of ``torchaudio.compliance.kaldi.fbank`` (see :class:`FbankOptions`).

    Returns:
        ``{shift_ms: [features of clip i, (T_i, F)]}``, in input order. ``T_i`` follows
        :func:`pipeline.units.num_frames`; it is 0 for a clip shorter than one window.
    """
    opts, shifts, wave, lens = _prepare(waveforms, lengths, shifts_ms, options)
    out_dtype = _out_dtype(out_dtype, wave)
    if backend != "flexast":
        from flexast.pipeline.fbank_backends import run_backend

        feats = run_backend(backend, wave, lens, shifts, opts)
        return {s: [x.to(out_dtype) for x in clips] for s, clips in feats.items()}
    # Per-shift mean subtraction needs the compute dtype; otherwise rows are stored in out_dtype directly.
    store = wave.dtype if opts.subtract_mean else out_dtype
    clips = _flexast_rows(wave, lens, shifts, opts, _chunk_rows(chunk_rows, wave.device), seed, store)
    result: dict[float, list[torch.Tensor]] = {s: [] for s in shifts}
    for clip in clips:
        for s in shifts:
            feats = clip.at(s)  # (T, F)
            if opts.subtract_mean and feats.shape[0]:
                feats = (feats - feats.mean(dim=0).unsqueeze(0)).to(out_dtype)
            result[s].append(feats)
    return result


def fbank_rows(
    waveforms: torch.Tensor | Sequence[torch.Tensor],
    lengths: torch.Tensor | Sequence[int] | None = None,
    shifts_ms: Sequence[float] | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    chunk_rows: int | None = None,
    seed: int = 0,
    **options,
) -> list[ClipRows]:
    """Like :func:`fbank` (flexast backend), but each clip's distinct frames once, as :class:`ClipRows`.

    ``fbank_rows(...)[i].at(s)`` equals ``fbank(...)[s][i]`` up to float32 rounding (another FFT batch shape;
    bitwise on some CPUs, see docs/fbank.md). Not available with
    ``subtract_mean=True``, where a frame's value depends on the shift that uses it.
    """
    opts, shifts, wave, lens = _prepare(waveforms, lengths, shifts_ms, options)
    if opts.subtract_mean:
        raise FeatureError("fbank_rows cannot share frames across shifts with subtract_mean=True; use fbank")
    store = _out_dtype(out_dtype, wave)
    return _flexast_rows(wave, lens, shifts, opts, _chunk_rows(chunk_rows, wave.device), seed, store)


def fbank_one(waveform: torch.Tensor, channel: int = -1, **options) -> torch.Tensor:
    """Drop-in for ``torchaudio.compliance.kaldi.fbank(waveform, **options)``: one ``(C, S)`` clip, one shift.

    Returns ``(T, F)``. Unlike the reference, a clip shorter than one window gives ``(0, F)``, not an error.
    """
    if waveform.dim() == 2:
        c = max(channel, 0)
        if c >= waveform.shape[0]:
            raise FeatureError(f"channel {channel} does not exist in a waveform of shape {tuple(waveform.shape)}")
        waveform = waveform[c]
    return fbank(waveform, **options)[float(options.get("frame_shift", 10.0))][0]
