"""The built-in demo collection: procedural sounds that need the papers to be told apart.

Twelve classes in two families:

* **spectral** (eight): a steady tone, noise in a low, mid or high band, a click train and a harmonic
  stack, recognisable from the spectrum alone, and rising and falling chirps (a sweep repeated every
  0.3-0.5 s, told apart by the sweep's direction, visible in any 0.3 s of a clip);
* **temporal** (two pairs, each pair with the same spectrum on average, told apart only by temporal
  structure): ``beeps_up`` / ``beeps_down`` repeat pairs of short tone beeps, low then high or high then
  low (the *order* of events); ``pulses_even`` / ``pulses_dotted`` repeat two noise bursts per period,
  of equal length or of lengths 3:1 with the same total on-time (an event's *duration*).

The temporal classes are defined by ratios, not absolute times, so each stays decidable at 10, 20 and
40 ms frame shifts: a model that knows nothing of the frame shift (ElasticAST's does not) can learn
them at every resolution. An absolute rate would not be: a 2 Hz rhythm at 20 ms looks like 4 Hz at 10 ms.
A pattern repeats every 0.40-0.54 s, so even the shortest window the demo evaluates (64 frames at 10 ms,
0.64 s) holds a whole period. Every beep, gap and even pulse lasts at least 80 ms, two frames at the
coarsest shift (40 ms); a dotted pattern's short burst and short gap last 60-68 ms (1.5 frames at 40 ms),
its long ones 180-200 ms against the even pattern's 120-135 ms.

Every clip lies on a **non-stationary background**: noise whose band drifts and whose level swells
slowly, plus short distractor bursts at random times, 8–22 dB below the sound. So the evidence for a
class is spread unevenly over time, and time resolution, clip length and patch size matter.

Clips last ``min_seconds``–``max_seconds`` (default 2.6–5.2 s); most are 16 kHz mono, every 5th is
22.05 kHz and every 7th stereo; 40% are wav, 40% flac, 10% ogg and 10% mp3. The audio content is
deterministic given the seed (ogg and mp3 encoders may write different container bytes run to run; the
decoded samples are what builds depend on).

Notation: ``S`` samples, ``sr`` sampling rate in Hz, times in seconds, frequencies in Hz.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from flexast.pipeline.errors import ConfigError

SPECTRAL = ("tone", "chirp_up", "chirp_down", "noise_low", "noise_mid", "noise_high", "clicks", "harmonic")
TEMPORAL = ("beeps_up", "beeps_down", "pulses_even", "pulses_dotted")
CLASSES = SPECTRAL + TEMPORAL
FORMATS = ("wav", "flac", "ogg", "mp3")


@dataclass(frozen=True)
class DemoClip:
    """One generated clip: relative path, class, length in seconds, rate in Hz, channels, split."""

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


def _gate(t: np.ndarray, onsets: np.ndarray, durations: np.ndarray, ramp: float = 0.005) -> np.ndarray:
    """``(S,)`` envelope: 1 inside each ``[onset, onset + duration)`` with ``ramp``-second linear edges, else 0."""
    env = np.zeros_like(t)
    for on, d in zip(onsets, durations, strict=True):
        rise = np.clip((t - on) / ramp, 0.0, 1.0)
        fall = np.clip((on + d - t) / ramp, 0.0, 1.0)
        env = np.maximum(env, np.minimum(rise, fall))
    return env


def _beeps(t: np.ndarray, seconds: float, rng: np.random.Generator, up: bool) -> np.ndarray:
    """Pairs of beeps (low, high) or (high, low), one pair per period, from a random phase.

    A beep lasts 80-100 ms, the gap inside a pair 80-90 ms and the rest between pairs 2-2.5 times that gap
    (so the order inside a pair is not the order across pairs): a period of 0.40-0.52 s.
    """
    f_lo = rng.uniform(400, 900)
    f_hi = f_lo * rng.uniform(2.0, 3.0)
    beep, gap = rng.uniform(0.08, 0.10), rng.uniform(0.08, 0.09)
    period = 2 * beep + gap + gap * rng.uniform(2.0, 2.5)
    starts = np.arange(-rng.uniform(0, period), seconds, period)
    first, second = (f_lo, f_hi) if up else (f_hi, f_lo)
    env1 = _gate(t, starts, np.full(starts.shape, beep))
    env2 = _gate(t, starts + beep + gap, np.full(starts.shape, beep))
    return env1 * np.sin(2 * np.pi * first * t) + env2 * np.sin(2 * np.pi * second * t)


def _sweeps(t: np.ndarray, sr: int, rng: np.random.Generator, up: bool) -> np.ndarray:
    """Linear sweeps between 200-600 Hz and 3-6 kHz, rising or falling, one every 0.3-0.5 s from a random phase."""
    f0, f1 = rng.uniform(200, 600), rng.uniform(3000, 6000)
    frac = np.mod(t / rng.uniform(0.3, 0.5) + rng.uniform(0, 1), 1.0)  # (S,) position inside the sweep, 0..1
    f = f0 + (f1 - f0) * (frac if up else 1.0 - frac)  # (S,) instantaneous frequency
    return np.sin(2 * np.pi * np.cumsum(f) / sr)  # continuous phase


def _pulses(t: np.ndarray, seconds: float, sr: int, rng: np.random.Generator, dotted: bool) -> np.ndarray:
    """Two noise bursts per period at 0 and P/2: equal (P/4 each) or dotted (3P/8 then P/8), same total on-time."""
    lo = rng.uniform(1000, 1500)
    carrier = _band_noise(rng, t.shape[0], sr, lo, lo + 1500)
    period = rng.uniform(0.48, 0.54)
    starts = np.arange(-rng.uniform(0, period), seconds, period)
    d1, d2 = (0.375 * period, 0.125 * period) if dotted else (0.25 * period, 0.25 * period)
    onsets = np.concatenate([starts, starts + period / 2])
    durations = np.concatenate([np.full(starts.shape, d1), np.full(starts.shape, d2)])
    return _gate(t, onsets, durations) * carrier


def background(seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """``(S,)`` non-stationary background of peak about 1: drifting-band noise with a slow swell, plus bursts."""
    n = max(1, round(seconds * sr))
    t = np.arange(n) / sr
    lo = rng.uniform(150, 2000)
    bed = _band_noise(rng, n, sr, lo, lo * rng.uniform(2.0, 4.0))
    swell = 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(0.15, 0.8) * t + rng.uniform(0, 2 * np.pi))
    x = bed * swell
    n_bursts = rng.poisson(1.0 * seconds)  # distractors: ~1 per second, 50-250 ms, any band
    for _ in range(n_bursts):
        a = int(rng.uniform(0, seconds) * sr)
        m = min(n - a, max(2, int(rng.uniform(0.05, 0.25) * sr)))  # burst samples, cut at the clip's end
        f0 = rng.uniform(200, 5000)
        ramp = np.minimum(1.0, np.minimum(np.arange(m), np.arange(m)[::-1]) / (0.005 * sr))  # (m,) 5 ms edges
        x[a : a + m] += 0.7 * ramp * _band_noise(rng, m, sr, f0, f0 * 1.5)
    return x / (np.abs(x).max() + 1e-9)


def synth(label: str, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """A ``(S,)`` float64 waveform of class ``label`` on the non-stationary background, peak about 0.5."""
    n = max(1, round(seconds * sr))
    t = np.arange(n) / sr
    if label == "tone":
        x = np.sin(2 * np.pi * rng.uniform(300, 3000) * t)
    elif label in ("chirp_up", "chirp_down"):
        x = _sweeps(t, sr, rng, up=label == "chirp_up")
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
    elif label in ("beeps_up", "beeps_down"):
        x = _beeps(t, seconds, rng, up=label == "beeps_up")
    elif label in ("pulses_even", "pulses_dotted"):
        x = _pulses(t, seconds, sr, rng, dotted=label == "pulses_dotted")
    else:
        raise ConfigError(f"unknown demo class {label!r}; classes are {CLASSES}")
    x = np.asarray(x, dtype=np.float64)
    x = 0.5 * rng.uniform(0.4, 1.0) * x / (np.abs(x).max() + 1e-9)
    level = np.abs(x).max() * 10 ** (-rng.uniform(8, 22) / 20)  # background 8-22 dB below the sound's peak
    return x + level * background(seconds, sr, rng) + 0.002 * rng.standard_normal(n)


@dataclass(frozen=True)
class Layout:
    """How a collection splits and how long its clips last.

    Whole rounds of one clip per class go to ``held_split`` (every ``1 / held_fraction``-th round; all of
    them when ``held_fraction`` is 1), the rest to ``train``. Clips last ``min_seconds``-``max_seconds``.
    """

    held_fraction: float = 1 / 6
    held_split: str = "eval"
    min_seconds: float = 2.6
    max_seconds: float = 5.2


def plan(n_clips: int = 240, seed: int = 0, layout: Layout = Layout()) -> list[DemoClip]:
    """Which clips to make: classes balanced, every 5th at 22.05 kHz, every 7th stereo, split by ``layout``."""
    held_fraction, held_split = layout.held_fraction, layout.held_split
    min_seconds, max_seconds = layout.min_seconds, layout.max_seconds
    if not 0 < held_fraction <= 1 or not 0 < min_seconds <= max_seconds:
        raise ConfigError(f"plan: bad held_fraction={held_fraction} or seconds {min_seconds}..{max_seconds}")
    rng = np.random.default_rng(seed)
    clips = []
    every = max(1, round(1 / held_fraction))
    for i in range(n_clips):
        label = CLASSES[i % len(CLASSES)]
        fmt = FORMATS[min((i % 10) // 4, 1) if i % 10 < 8 else i % 10 - 6]  # 40% wav, 40% flac, 10% ogg, 10% mp3
        sr = 22050 if i % 5 == 3 else 16000
        channels = 2 if i % 7 == 2 else 1
        seconds = float(np.round(rng.uniform(min_seconds, max_seconds), 3))
        split = held_split if (i // len(CLASSES)) % every == 0 else "train"
        clips.append(DemoClip(f"audio/{label}/{label}_{i:04d}.{fmt}", label, seconds, sr, channels, split))
    return clips


def write_demo(out: str, n_clips: int = 240, seed: int = 0, layout: Layout = Layout()) -> dict[str, str]:
    """Write the demo collection under ``out``; returns ``{"train": …, held_split: …, "all": …}`` manifest paths.

    Each manifest has columns ``path,label,split`` with paths relative to ``out``; ``classes.txt`` lists the
    vocabulary (one name a line, :data:`CLASSES` order) so that separately built sets share label ids.
    """
    clips = plan(n_clips, seed, layout)
    held_split = layout.held_split
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
    os.makedirs(out, exist_ok=True)
    manifests = {"classes": os.path.join(out, "classes.txt")}
    with open(manifests["classes"], "w") as f:
        f.write("".join(f"{c}\n" for c in CLASSES))
    for name, keep in (("train", "train"), (held_split, held_split), ("all", None)):
        path = os.path.join(out, f"{name}.csv")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "split"])
            for clip in clips:
                if keep is None or clip.split == keep:
                    w.writerow([clip.path, clip.label, clip.split])
        manifests[name] = path
    return manifests
