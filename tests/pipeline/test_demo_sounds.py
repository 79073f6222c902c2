"""The demo collection: deterministic and varied; spectral classes differ in spectrum, temporal pairs only in time."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import soundfile as sf

from flexast.pipeline.build import build_shards
from flexast.pipeline.build_config import BuildConfig
from flexast.pipeline.demo_sounds import (
    CLASSES,
    SPECTRAL,
    TEMPORAL,
    Layout,
    _beeps,
    _pulses,
    _sweeps,
    background,
    plan,
    write_demo,
)
from tests.pipeline.test_build import all_samples


def test_plan_covers_rates_channels_formats_and_lengths():
    clips = plan(240)
    assert {c.sample_rate for c in clips} == {16000, 22050} and {c.channels for c in clips} == {1, 2}
    assert {c.path.rsplit(".", 1)[1] for c in clips} == {"wav", "flac", "ogg", "mp3"}
    assert min(c.seconds for c in clips) >= 2.6 and max(c.seconds for c in clips) <= 5.2
    # 20 rounds of 12 classes; every 6th round (0, 6, 12, 18) is held out.
    assert sum(c.split == "eval" for c in clips) == 48 and {c.label for c in clips} == set(CLASSES)
    held = plan(24, seed=1, layout=Layout(held_fraction=1.0, held_split="eval"))
    assert all(c.split == "eval" for c in held)


def test_same_seed_same_audio(tmp_path):
    a = write_demo(str(tmp_path / "a"), n_clips=10, seed=3)
    b = write_demo(str(tmp_path / "b"), n_clips=10, seed=3)
    write_demo(str(tmp_path / "c"), n_clips=10, seed=4)
    rel = [line.split(",")[0] for line in Path(a["all"]).read_text().splitlines()[1:]]
    assert rel == [line.split(",")[0] for line in Path(b["all"]).read_text().splitlines()[1:]]
    for r in rel:  # the same generator code twice in one process, on one CPU, written as PCM: identical samples
        np.testing.assert_array_equal(sf.read(tmp_path / "a" / r)[0], sf.read(tmp_path / "b" / r)[0])
    assert not np.array_equal(sf.read(tmp_path / "a" / rel[0])[0][:100], sf.read(tmp_path / "c" / rel[0])[0][:100])
    assert Path(a["classes"]).read_text().split() == list(CLASSES)


def _zero_crossing_rate(x: np.ndarray) -> float:
    return float(np.mean(np.abs(np.diff(np.sign(x))) > 0))


def test_beeps_differ_only_in_order():
    """The first beep of each pair is the low one for ``beeps_up`` and the high one for ``beeps_down``
    (zero-crossing rate inside the two gates), from the same frequency and timing draws."""
    sr, seconds = 16000, 3.0
    t = np.arange(int(sr * seconds)) / sr
    for up in (True, False):
        x = _beeps(t, seconds, np.random.default_rng(5), up=up)
        on = np.abs(x) > 1e-6
        starts = np.flatnonzero(np.diff(on.astype(int)) == 1) + 1  # sample indices where a beep starts
        # Inside a pair two starts are beep + gap (at most 0.10 + 0.09 s) apart; from a pair's second beep to
        # the next pair's first, beep + rest (at least 0.08 + 2 * 0.08 s).
        pairs = [(a, b) for a, b in itertools.pairwise(starts) if b - a <= 0.21 * sr]
        assert len(pairs) >= 5
        assert np.diff([a for a, _ in pairs]).max() <= 0.53 * sr  # a period fits the shortest window, 0.64 s
        for a, b in pairs:  # 600 samples: inside an 80 ms beep
            assert (_zero_crossing_rate(x[a : a + 600]) < _zero_crossing_rate(x[b : b + 600])) == up


def test_sweeps_rise_or_fall_within_every_period():
    """The zero-crossing rate (twice the frequency) over 10 ms windows mostly rises for ``chirp_up`` and falls
    for ``chirp_down``; a sweep restarts at least every 0.5 s, so a 0.64 s window holds a whole one."""
    sr, seconds = 16000, 3.0
    t = np.arange(int(sr * seconds)) / sr
    for up in (True, False):
        x = _sweeps(t, sr, np.random.default_rng(4), up=up)
        zcr = np.array([_zero_crossing_rate(w) for w in x.reshape(-1, 160)])  # (300,) one per 10 ms
        steps = np.diff(zcr)
        rising = np.mean(steps[np.abs(steps) > 0.01] > 0)
        assert (rising > 0.8) if up else (rising < 0.2), rising
        jumps = np.flatnonzero(np.abs(steps) > 0.15)  # the jump back to the start frequency (over 1-2 windows)
        resets = jumps[np.r_[True, np.diff(jumps) > 2]]  # (resets,) the first window of each jump
        assert len(resets) >= 5 and np.diff(resets).max() <= 51, resets


def test_pulses_same_on_time_different_durations():
    """Even and dotted pulses from the same draws: the same total on-time, bursts 1:1 against 3:1."""
    sr, seconds = 16000, 4.0
    t = np.arange(int(sr * seconds)) / sr
    runs = {}
    for dotted in (False, True):
        x = _pulses(t, seconds, sr, np.random.default_rng(9), dotted=dotted)
        on = np.abs(x) > 0
        edges = np.flatnonzero(np.diff(on.astype(int)))  # alternating rise / fall indices
        lengths = np.diff(edges)[::2] if on[0] == 0 else np.diff(edges)[1::2]
        runs[dotted] = (on.mean(), np.sort(lengths[1:-1]))  # inner bursts only: the first and last may be cut
        rises = np.flatnonzero(np.diff(on.astype(int)) == 1)
        assert np.diff(rises).max() <= 0.27 * sr + 1  # bursts every P / 2: a period (<= 0.54 s) fits in 0.64 s
    assert abs(runs[False][0] - runs[True][0]) < 0.03
    even, dotted = runs[False][1], runs[True][1]
    assert even.max() / even.min() < 1.1
    assert 2.5 < dotted.max() / dotted.min() < 3.5


def test_background_is_not_stationary():
    """The background's short-time level varies by more than 2× over a clip (a swell and bursts)."""
    x = background(4.0, 16000, np.random.default_rng(2))
    frames = x[: 4 * 16000].reshape(40, -1)  # (40 frames of 100 ms, samples)
    rms = np.sqrt((frames**2).mean(1))
    assert rms.max() / rms.min() > 2.0


def test_spectral_classes_differ_in_spectrum_temporal_pairs_do_not(tmp_path):
    """Nearest neighbour (leave one out) on the log-mel spectrum averaged over each half of a clip: the spectral
    classes are told apart far above chance (5×) despite the background (the two chirps, repeated sweeps that
    differ only in direction, count as one). On the clip's average spectrum each temporal pair is near chance."""
    manifests = write_demo(
        str(tmp_path / "demo"), n_clips=12 * 8, seed=0, layout=Layout(min_seconds=2.6, max_seconds=3.0)
    )
    cfg = BuildConfig(name="demo", shard_samples=100, features={"num_mel_bins": 64})
    report = build_shards(manifests["all"], str(tmp_path / "out"), cfg, workers=1, progress=False, log=lambda *a: None)
    samples = list(all_samples(report.out, report.index).values())
    names = report.index["labels"]["names"]
    y = np.array([names[s["json"]["label_ids"][0]] for s in samples])
    spectral = np.where(np.isin(y, ("chirp_up", "chirp_down")), "chirp", y)  # (N,) the sweeps' direction merged
    mean = np.stack([s["s10"].astype(np.float64).mean(0) for s in samples])  # (N, F)
    halves = np.stack([np.concatenate([h.mean(0) for h in np.array_split(s["s10"].astype(np.float64), 2)])
                       for s in samples])  # (N, 2F): rising and falling chirps differ  # fmt: skip

    def nn_accuracy(x: np.ndarray, keep: np.ndarray, labels: np.ndarray = y) -> float:
        xs, ys = x[keep], labels[keep]
        xs = (xs - xs.mean(0)) / (xs.std(0) + 1e-9)
        d = ((xs[:, None] - xs[None]) ** 2).sum(-1) + np.diag(np.full(len(ys), np.inf))  # (n, n), self excluded
        return float(np.mean(ys[d.argmin(1)] == ys))

    assert nn_accuracy(halves, np.isin(y, SPECTRAL), spectral) >= 0.6  # chance: 1/7
    for pair in (TEMPORAL[:2], TEMPORAL[2:]):
        assert nn_accuracy(mean, np.isin(y, pair)) <= 0.75, pair  # chance: 1/2
