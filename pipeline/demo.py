"""The built-in demo collection: procedural sounds whose classes differ in spectral shape.

Eight classes, each recognisable from a log-mel spectrogram at a glance, so a tiny ViT learns them in
minutes on a CPU: a steady tone, rising and falling chirps, noise in a low, mid or high band, a click
train and a harmonic stack. Each clip draws its own parameters (frequency, band edges, rate, level)
and a little background noise from a per-clip seed, so the classes vary within themselves.

Clips last 0.5-8 s; most are 16 kHz mono, some are 22.05 kHz and some stereo; 40% are wav, 40% flac,
10% ogg and 10% mp3. The audio content is deterministic given the seed (ogg and mp3 encoders may
write different container bytes run to run; the decoded samples are what builds depend on).

Notation: ``S`` samples, ``sr`` sampling rate in Hz, times in seconds, frequencies in Hz.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf

CLASSES = ("tone", "chirp_up", "chirp_down", "noise_low", "noise_mid", "noise_high", "clicks", "harmonic")
FORMATS = ("wav", "flac", "ogg", "mp3")


@dataclass(frozen=True)
class DemoClip:
    """One generated clip: relative path, class, length in seconds, rate in Hz, channels."""

    path: str
    label: str
    seconds: float
    sample_rate: int
    channels: int
    split: str


def _band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float) -> np.ndarray:
    m = 1 << (n - 1).bit_length()  # a power-of-two FFT length; the first n samples are kept
    spec = np.fft.rfft(rng.standard_normal(m))
    freqs = np.fft.rfftfreq(m, 1.0 / sr)
    spec[(freqs < lo) | (freqs > hi)] = 0.0
    x = np.fft.irfft(spec, m)[:n]
    return x / (np.abs(x).max() + 1e-9)


def synth(label: str, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A ``(S,)`` float64 waveform of class ``label``, peak about 0.5."""
    n = max(1, round(seconds * sr))
    t = np.arange(n) / sr
    if label == "tone":
        x = np.sin(2 * np.pi * rng.uniform(300, 3000) * t)
    elif label in ("chirp_up", "chirp_down"):
        f0, f1 = rng.uniform(200, 600), rng.uniform(3000, 6000)
        if label == "chirp_down":
            f0, f1 = f1, f0
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))  # linear sweep over the clip
        x = np.sin(phase)
    elif label == "noise_low":
        x = _band_noise(rng, n, sr, 100, rng.uniform(500, 800))
    elif label == "noise_mid":
        lo = rng.uniform(1200, 1800)
        x = _band_noise(rng, n, sr, lo, lo + 1000)
    elif label == "noise_high":
        x = _band_noise(rng, n, sr, rng.uniform(4500, 5500), 7800)
    elif label == "clicks":
        x = np.zeros(n)
        period = int(sr / rng.uniform(4, 12))
        width = max(1, int(0.002 * sr))
        for start in range(int(rng.integers(0, period)), n, period):
            x[start : start + width] = rng.standard_normal(min(width, n - start))
    elif label == "harmonic":
        f0 = rng.uniform(120, 300)
        x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 9) if k * f0 < 0.45 * sr)
    else:
        raise ValueError(f"unknown demo class {label!r}; classes are {CLASSES}")
    x = np.asarray(x, dtype=np.float64)
    x = 0.5 * rng.uniform(0.4, 1.0) * x / (np.abs(x).max() + 1e-9)
    return x + 0.003 * rng.standard_normal(n)  # a faint noise floor, as in real recordings


def plan(n_clips: int = 240, seed: int = 0, eval_fraction: float = 1 / 6) -> list[DemoClip]:
    """Which clips to make: classes balanced, lengths 0.5-8 s, every 5th at 22.05 kHz, every 7th stereo."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n_clips):
        label = CLASSES[i % len(CLASSES)]
        fmt = FORMATS[min((i % 10) // 4, 1) if i % 10 < 8 else i % 10 - 6]  # 40% wav, 40% flac, 10% ogg, 10% mp3
        sr = 22050 if i % 5 == 3 else 16000
        channels = 2 if i % 7 == 2 else 1
        seconds = float(np.round(rng.uniform(0.5, 8.0), 3))
        split = "eval" if (i // len(CLASSES)) % round(1 / eval_fraction) == 0 else "train"
        clips.append(DemoClip(f"audio/{label}/{label}_{i:04d}.{fmt}", label, seconds, sr, channels, split))
    return clips


def write_demo(out: str, n_clips: int = 240, seed: int = 0) -> dict[str, str]:
    """Write the demo collection under ``out``; returns ``{"train": train.csv, "eval": eval.csv, "all": all.csv}``.

    Each manifest has columns ``path,label,split`` with paths relative to ``out``.
    """
    clips = plan(n_clips, seed)
    for i, clip in enumerate(clips):
        rng = np.random.default_rng([seed, i])
        x = synth(clip.label, clip.seconds, clip.sample_rate, rng)  # (S,)
        if clip.channels == 2:
            x = np.stack([x, 0.8 * x + 0.002 * rng.standard_normal(x.shape[0])], axis=1)  # (S, 2)
        path = os.path.join(out, clip.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ext = clip.path.rsplit(".", 1)[1]
        subtype = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}[ext]
        sf.write(path, x.astype(np.float32), clip.sample_rate, format=ext.upper(), subtype=subtype)
    manifests = {}
    for name, keep in (("train", "train"), ("eval", "eval"), ("all", None)):
        path = os.path.join(out, f"{name}.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "split"])
            for clip in clips:
                if keep is None or clip.split == keep:
                    w.writerow([clip.path, clip.label, clip.split])
        manifests[name] = path
    return manifests
