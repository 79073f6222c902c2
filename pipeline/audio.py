"""Audio decoding: file or fsspec URL → mono float32 waveform at the target rate.

Notation: ``S`` samples, ``C`` channels, ``sr`` sampling rate in Hz, times in seconds.

Steps, in this order (AST's own preprocessing, with soxr instead of torchaudio's resampler):
    1. decode with soundfile (wav, flac, ogg, mp3), optionally only ``[start_s, end_s)``;
    2. mix down to mono by averaging the channels;
    3. resample to the target rate with soxr (HQ, deterministic);
    4. check: not empty, finite, not shorter than the minimum.
The waveform mean is subtracted per clip or segment by :func:`subtract_mean`, just before the fbank.

Every failure raises :class:`~pipeline.errors.AudioError` with a reason tag (see ``REASONS``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec
import numpy as np
import soundfile as sf
import soxr

from flexast.pipeline.errors import AudioError
from flexast.pipeline.manifest import is_url
from flexast.pipeline.units import samples_to_seconds, seconds_to_samples

REASONS = {
    "missing": "the file does not exist",
    "unreadable": "soundfile cannot decode it (corrupt, truncated, not audio)",
    "empty": "it decodes to zero samples",
    "too_short": "shorter than --min-seconds or than one analysis window",
    "nonfinite": "it contains NaN or Inf samples",
    "nonfinite_features": "its fbank has NaN or Inf values (float samples far outside [-1, 1], e.g. 1e30)",
    "bad_segment": "start/end lie outside the file",
    "unknown_label": "a label is not in the vocabulary",
    "no_label": "the row has no label, in a labelled collection",
    "duplicate_key": "an earlier row has the same key",
    "bad_row": "the manifest row itself is unusable (bad number, no path)",
    "error": "an unexpected error while processing it (see detail)",
}
"""Reason tags written to ``rejected.jsonl``, with what they mean."""


@dataclass
class Audio:
    """A decoded clip: mono ``(S,)`` float32 waveform at ``sample_rate``, and where it came from."""

    waveform: np.ndarray
    sample_rate: int
    source: str
    source_sample_rate: int
    source_channels: int

    @property
    def duration_s(self) -> float:
        return samples_to_seconds(int(self.waveform.shape[0]), self.sample_rate)


def _open(source: str, storage_options: dict | None):
    if is_url(source):
        return fsspec.open(source, "rb", **(storage_options or {})).open()
    path = source[len("file://") :] if source.startswith("file://") else source
    return open(path, "rb")


def probe_seconds(source: str, storage_options: dict | None = None) -> float | None:
    """Duration of a file in seconds from its header only, or None if it cannot be read."""
    try:
        with _open(source, storage_options) as f:
            info = sf.info(f)
        return float(info.frames) / float(info.samplerate) if info.frames > 0 else 0.0
    except Exception:
        return None


def decode(
    source: str, start_s: float | None = None, end_s: float | None = None, storage_options: dict | None = None
) -> tuple[np.ndarray, int]:
    """Decode ``source`` (optionally the segment ``[start_s, end_s)``) to a ``(S, C)`` float32 array and its rate."""
    try:
        f = _open(source, storage_options)
    except FileNotFoundError as exc:
        raise AudioError("missing", source, str(exc)) from exc
    except OSError as exc:
        if not is_url(source) and not os.path.exists(source):
            raise AudioError("missing", source, str(exc)) from exc
        raise AudioError("unreadable", source, str(exc)) from exc
    try:
        with f, sf.SoundFile(f) as snd:
            sr, total = int(snd.samplerate), int(snd.frames)
            start = 0 if start_s is None else seconds_to_samples(start_s, sr)
            stop = total if end_s is None else min(total, seconds_to_samples(end_s, sr))
            if start_s is not None and start >= total and total > 0:
                raise AudioError("bad_segment", source, f"start_s={start_s} but the file lasts {total / sr:.3f} s")
            if start > 0:
                snd.seek(start)
            data = _read_float32(snd, max(0, stop - start))  # (S, C)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError) as exc:
        raise AudioError("unreadable", source, str(exc).strip() or type(exc).__name__) from exc
    return data, sr


def _read_float32(snd: sf.SoundFile, frames: int) -> np.ndarray:
    """``frames`` frames as ``(S, C)`` float32, scaled as libsndfile scales them.

    16-bit PCM (WAV, FLAC, …) is read as int16 and scaled here by 2^-15, which is exact and gives libsndfile's
    float values bit for bit, several times faster for WAV (libsndfile's own conversion dominates there).
    """
    if snd.subtype != "PCM_16":
        return snd.read(frames, dtype="float32", always_2d=True)
    data = snd.read(frames, dtype="int16", always_2d=True).astype(np.float32)  # (S, C)
    data *= np.float32(2.0**-15)
    return data


def to_mono(data: np.ndarray) -> np.ndarray:
    """``(S, C)`` → ``(S,)`` by averaging the channels."""
    if data.ndim == 1:
        return data
    mono = data[:, 0].copy()  # (S,)
    if data.shape[1] == 1:
        return mono
    for c in range(1, data.shape[1]):  # channel by channel: much faster than a strided mean over axis 1
        mono += data[:, c]
    mono *= np.float32(1.0 / data.shape[1])
    return mono


def resample(waveform: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample a ``(S,)`` float32 waveform with soxr (HQ); returns the input itself when the rates match."""
    if sr_in == sr_out:
        return waveform
    return soxr.resample(waveform, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def subtract_mean(waveform: np.ndarray) -> np.ndarray:
    """AST's waveform normalisation: remove the DC offset of the clip (a copy)."""
    return waveform.astype(np.float32, copy=False) - np.float32(waveform.mean(dtype=np.float64))


def load_audio(
    source: str,
    sample_rate: int = 16000,
    start_s: float | None = None,
    end_s: float | None = None,
    min_seconds: float = 0.0,
    storage_options: dict | None = None,
) -> Audio:
    """Decode, mix to mono, resample to ``sample_rate`` and validate one clip.

    Args:
        source: local path or fsspec URL.
        sample_rate: target rate in Hz.
        start_s: segment start in seconds (None: file start).
        end_s: segment end in seconds (None: file end).
        min_seconds: clips shorter than this (after decoding) are rejected as ``too_short``.
        storage_options: fsspec options for URLs.

    Raises:
        AudioError: with reason ``missing``, ``unreadable``, ``empty``, ``nonfinite``, ``too_short`` or ``bad_segment``.
    """
    data, sr = decode(source, start_s, end_s, storage_options)
    channels = int(data.shape[1])
    if data.shape[0] == 0:
        raise AudioError("empty", source, f"0 samples at {sr} Hz")
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise AudioError("nonfinite", source, f"{bad} NaN/Inf samples of {data.size}")
    mono = to_mono(data)  # (S,)
    wave = resample(np.ascontiguousarray(mono), sr, sample_rate)
    audio = Audio(wave, sample_rate, source, sr, channels)
    if audio.duration_s < min_seconds:
        raise AudioError("too_short", source, f"{audio.duration_s:.3f} s < min_seconds={min_seconds}")
    return audio
