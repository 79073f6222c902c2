"""Kaldi fbank options, window functions and mel banks: the definitions :mod:`pipeline.fbank` computes with.

The option names and defaults are those of ``torchaudio.compliance.kaldi.fbank``, so a call moves over
unchanged. Lengths are in milliseconds (``frame_length``, ``frame_shift``), frequencies in Hz.

Notation: ``W`` window length in samples, ``P`` padded FFT length (a power of two when
``round_to_power_of_two``), ``K = P // 2`` FFT bins below Nyquist, ``F`` mel bins.

Why bin 3 of the AST preset is constant: with 128 mel bins between 20 Hz and 8 kHz and a 512-point FFT
(31.25 Hz per FFT bin), the lowest triangles are narrower than two FFT bins. Triangle 3 spans 62.96-93.01 Hz
and no FFT bin lies inside it (62.5 Hz is just below its left edge, 93.75 Hz just above its right edge), so
all its weights are zero, its energy is zero, and the log clamps it to ``log(FLT_EPSILON) = -15.9424``.
The reference does exactly this and pretrained AST checkpoints were trained on it, so we reproduce it
instead of "fixing" it (kaldi-native-fbank refuses such settings outright).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from flexast.pipeline.config_schema import check_known_keys
from flexast.pipeline.errors import ConfigError
from flexast.pipeline.units import ms_to_samples

WINDOW_TYPES = ("hamming", "hanning", "povey", "rectangular", "blackman")
FLT_EPSILON = torch.finfo(torch.float32).eps  # the log floor; float32's epsilon even for float64 runs


@dataclass(frozen=True)
class FbankOptions:
    """Every option of ``torchaudio.compliance.kaldi.fbank`` (same names, same defaults).

    ``vtln_*`` and ``snip_edges`` are accepted for drop-in compatibility, but only their identity values
    (``vtln_warp=1.0``, ``snip_edges=True``) are supported.
    """

    blackman_coeff: float = 0.42
    dither: float = 0.0
    energy_floor: float = 1.0
    frame_length: float = 25.0
    frame_shift: float = 10.0
    high_freq: float = 0.0
    htk_compat: bool = False
    low_freq: float = 20.0
    min_duration: float = 0.0
    num_mel_bins: int = 23
    preemphasis_coefficient: float = 0.97
    raw_energy: bool = True
    remove_dc_offset: bool = True
    round_to_power_of_two: bool = True
    sample_frequency: float = 16000.0
    snip_edges: bool = True
    subtract_mean: bool = False
    use_energy: bool = False
    use_log_fbank: bool = True
    use_power: bool = True
    vtln_high: float = -500.0
    vtln_low: float = 100.0
    vtln_warp: float = 1.0
    window_type: str = "povey"

    @classmethod
    def from_kwargs(cls, **kwargs) -> FbankOptions:
        """Build from keyword arguments; unknown names and bad values are reported all at once."""
        check_known_keys(cls, kwargs, "fbank option(s)")
        opts = cls(**kwargs)
        opts.validate()
        return opts

    @property
    def window_size(self) -> int:
        """``W``: window length in samples (truncated, as the reference does)."""
        return ms_to_samples(self.frame_length, self.sample_frequency)

    @property
    def padded_size(self) -> int:
        """``P``: FFT length."""
        w = self.window_size
        return 1 << (w - 1).bit_length() if self.round_to_power_of_two else w

    @property
    def num_features(self) -> int:
        """Columns of the output: ``F``, plus one for the energy when ``use_energy``."""
        return self.num_mel_bins + int(self.use_energy)

    def hop(self, shift_ms: float) -> int:
        """Frame hop in samples for a shift in ms."""
        return ms_to_samples(shift_ms, self.sample_frequency)

    def validate(self, shifts_ms: tuple[float, ...] = ()) -> None:
        """Raise :class:`ConfigError` listing every invalid option at once."""
        bad = []
        nyquist = 0.5 * self.sample_frequency
        if self.sample_frequency <= 0:
            bad.append(f"sample_frequency={self.sample_frequency} must be > 0")
        if self.window_type not in WINDOW_TYPES:
            bad.append(f"window_type={self.window_type!r} not in {WINDOW_TYPES}")
        if self.sample_frequency > 0:
            if self.window_size < 2:
                bad.append(f"frame_length={self.frame_length} ms gives {self.window_size} samples (< 2)")
            elif self.padded_size % 2:
                bad.append(f"padded window {self.padded_size} is odd: use round_to_power_of_two or change frame_length")
            for s in (self.frame_shift, *shifts_ms):
                if self.hop(s) <= 0:
                    bad.append(f"frame shift {s} ms gives a hop of {self.hop(s)} samples (must be > 0)")
            high = self.high_freq + nyquist if self.high_freq <= 0 else self.high_freq
            if not (0.0 <= self.low_freq < nyquist and 0.0 < high <= nyquist and self.low_freq < high):
                bad.append(f"need 0 <= low_freq < high_freq <= nyquist, got low_freq={self.low_freq}, high_freq={high}")
        if self.num_mel_bins <= 3:
            bad.append(f"num_mel_bins={self.num_mel_bins} must be > 3")
        if not 0.0 <= self.preemphasis_coefficient <= 1.0:
            bad.append(f"preemphasis_coefficient={self.preemphasis_coefficient} must be in [0, 1]")
        if self.dither < 0:
            bad.append(f"dither={self.dither} must be >= 0")
        if not self.snip_edges:
            bad.append("snip_edges=False is not supported (frames are snipped at the edges, as AST does)")
        if self.vtln_warp != 1.0:
            bad.append(f"vtln_warp={self.vtln_warp} is not supported (only 1.0)")
        if bad:
            raise ConfigError("invalid fbank options: " + "; ".join(bad))


AST_FBANK = {
    "htk_compat": True,
    "window_type": "hanning",
    "use_energy": False,
    "num_mel_bins": 128,
    "dither": 0.0,
    "frame_length": 25.0,
    "frame_shift": 10.0,
    "sample_frequency": 16000.0,
}
"""The AST preset (Gong et al. 2021, as their data loader calls the reference). Bin 3 is constant: see above."""


def window_function(opts: FbankOptions, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The analysis window ``(W,)``, computed exactly as the reference computes it (bit for bit)."""
    size, kind = opts.window_size, opts.window_type
    if kind == "hanning":
        return torch.hann_window(size, periodic=False, dtype=dtype, device=device)
    if kind == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46, dtype=dtype, device=device)
    if kind == "povey":
        return torch.hann_window(size, periodic=False, dtype=dtype, device=device).pow(0.85)
    if kind == "rectangular":
        return torch.ones(size, dtype=dtype, device=device)
    a = 2 * math.pi / (size - 1)  # blackman with Kaldi's coefficient (torch.blackman_window differs)
    n = torch.arange(size, dtype=dtype, device=device)
    c = opts.blackman_coeff
    return c - 0.5 * torch.cos(a * n) + (0.5 - c) * torch.cos(2 * a * n)


def _mel(freq):
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


@lru_cache(maxsize=64)
def _mel_banks_cpu(num_bins: int, padded: int, sr: float, low_freq: float, high_freq: float) -> torch.Tensor:
    nyquist = 0.5 * sr
    high = high_freq + nyquist if high_freq <= 0.0 else high_freq
    mel_low, mel_high = _mel(low_freq), _mel(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)  # (F, 1)
    left, center, right = mel_low + b * delta, mel_low + (b + 1.0) * delta, mel_low + (b + 2.0) * delta
    mel = _mel((sr / padded) * torch.arange(padded // 2, dtype=torch.float32)).unsqueeze(0)  # (1, P // 2)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return torch.clamp_min(torch.minimum(up, down), 0.0)  # (F, P // 2)


def mel_banks(opts: FbankOptions, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Triangular filters ``(F, P // 2)`` (the Nyquist bin has weight zero and is left out).

    Built in float32 like the reference (so the same FFT bins fall inside each triangle), then cast.
    """
    banks = _mel_banks_cpu(
        opts.num_mel_bins, opts.padded_size, float(opts.sample_frequency), float(opts.low_freq), float(opts.high_freq)
    )
    return banks.to(device=device, dtype=dtype)
