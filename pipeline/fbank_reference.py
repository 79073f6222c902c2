"""Per-clip peer of ``torchaudio.compliance.kaldi.fbank``: the reference definition in plain torch ops.

This is *not* the featurizer (that is :mod:`pipeline.fbank`). It is a deliberately literal,
one-clip-one-shift-per-call transcription of the reference definition, kept self-contained
(its own window and mel-bank code) so that it can serve as an independent peer:

- the featurize benchmark times it as "the reference, as the AST repo calls it" where torchaudio
  itself cannot be imported (its registry wheel fails on these CPU machines);
- tests check it against the golden torchaudio fixtures first, then use it in float64 as the oracle
  for option combinations that the fixtures do not cover (blackman, rectangular, low/high freq, ...).

Notation: ``S`` samples of one mono clip, ``T`` frames, ``W`` window length in samples, ``P`` the
padded FFT length, ``K = P // 2 + 1`` FFT bins, ``F`` mel bins. Frame length and shift are in ms.
"""

from __future__ import annotations

import math

import torch

from flexast.pipeline.errors import ConfigError, FeatureError

_MS = 0.001


def _mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


def _mel_banks(num_bins: int, padded: int, sr: float, low_freq: float, high_freq: float) -> torch.Tensor:
    """(F, P // 2) triangles in mel space, built in float32 as the reference does."""
    nyquist = 0.5 * sr
    if high_freq <= 0.0:
        high_freq += nyquist
    bin_width = sr / padded
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins).unsqueeze(1)  # (F, 1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _mel(bin_width * torch.arange(padded // 2)).unsqueeze(0)  # (1, P // 2)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    return torch.max(torch.zeros(1), torch.min(up, down))  # (F, P // 2)


def _window(window_type: str, size: int, blackman_coeff: float, dtype: torch.dtype) -> torch.Tensor:
    if window_type == "hanning":
        return torch.hann_window(size, periodic=False, dtype=dtype)
    if window_type == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46, dtype=dtype)
    if window_type == "povey":
        return torch.hann_window(size, periodic=False, dtype=dtype).pow(0.85)
    if window_type == "rectangular":
        return torch.ones(size, dtype=dtype)
    if window_type == "blackman":
        a = 2 * math.pi / (size - 1)
        n = torch.arange(size, dtype=dtype)
        return blackman_coeff - 0.5 * torch.cos(a * n) + (0.5 - blackman_coeff) * torch.cos(2 * a * n)
    raise ConfigError(f"unknown window_type {window_type!r}")


def _log_energy(frames: torch.Tensor, eps: torch.Tensor, energy_floor: float) -> torch.Tensor:
    log_energy = torch.max(frames.pow(2).sum(1), eps).log()  # (T,)
    if energy_floor == 0.0:
        return log_energy
    return torch.max(log_energy, torch.tensor(math.log(energy_floor), dtype=frames.dtype))


def reference_fbank(
    waveform: torch.Tensor,
    blackman_coeff: float = 0.42,
    dither: float = 0.0,
    energy_floor: float = 1.0,
    frame_length: float = 25.0,
    frame_shift: float = 10.0,
    high_freq: float = 0.0,
    htk_compat: bool = False,
    low_freq: float = 20.0,
    min_duration: float = 0.0,
    num_mel_bins: int = 23,
    preemphasis_coefficient: float = 0.97,
    raw_energy: bool = True,
    remove_dc_offset: bool = True,
    round_to_power_of_two: bool = True,
    sample_frequency: float = 16000.0,
    subtract_mean: bool = False,
    use_energy: bool = False,
    use_log_fbank: bool = True,
    use_power: bool = True,
    window_type: str = "povey",
) -> torch.Tensor:
    """Kaldi fbank of one mono clip ``(S,)`` at one shift, ``snip_edges=True``: returns ``(T, F [+1])``.

    Same keyword names and defaults as ``torchaudio.compliance.kaldi.fbank``; computed in the
    waveform's dtype, with the mel banks built in float32 exactly as the reference builds them.
    """
    dtype = waveform.dtype
    eps = torch.tensor(torch.finfo(torch.float).eps, dtype=dtype)
    shift = int(sample_frequency * frame_shift * _MS)
    size = int(sample_frequency * frame_length * _MS)
    padded = 1 << (size - 1).bit_length() if round_to_power_of_two else size
    if not 2 <= size <= waveform.numel():
        raise FeatureError(f"window of {size} samples does not fit a clip of {waveform.numel()} samples")
    if waveform.numel() < min_duration * sample_frequency:
        return torch.empty(0, dtype=dtype)
    n_frames = 1 + (waveform.numel() - size) // shift
    frames = waveform.as_strided((n_frames, size), (shift * waveform.stride(0), waveform.stride(0)))  # (T, W)
    if dither != 0.0:
        frames = frames + torch.randn(frames.shape, dtype=dtype) * dither
    if remove_dc_offset:
        frames = frames - torch.mean(frames, dim=1).unsqueeze(1)
    if raw_energy:
        log_energy = _log_energy(frames, eps, energy_floor)
    if preemphasis_coefficient != 0.0:
        previous = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)  # (T, W + 1)
        frames = frames - preemphasis_coefficient * previous[:, :-1]
    frames = frames * _window(window_type, size, blackman_coeff, dtype).unsqueeze(0)
    if padded != size:
        frames = torch.nn.functional.pad(frames.unsqueeze(0), (0, padded - size)).squeeze(0)  # (T, P)
    if not raw_energy:
        log_energy = _log_energy(frames, eps, energy_floor)
    spectrum = torch.fft.rfft(frames).abs()  # (T, K)
    if use_power:
        spectrum = spectrum.pow(2.0)
    banks = _mel_banks(num_mel_bins, padded, sample_frequency, low_freq, high_freq).to(dtype)
    banks = torch.nn.functional.pad(banks, (0, 1))  # (F, K): the Nyquist bin has weight zero
    mel = torch.mm(spectrum, banks.T)  # (T, F)
    if use_log_fbank:
        mel = torch.max(mel, eps).log()
    if use_energy:
        energy = log_energy.unsqueeze(1)  # (T, 1)
        mel = torch.cat((mel, energy), dim=1) if htk_compat else torch.cat((energy, mel), dim=1)
    if subtract_mean:
        mel = mel - mel.mean(dim=0).unsqueeze(0)
    return mel
