"""The demo collection: deterministic, varied in rate/channels/format/length, and separable by spectral shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from flexast.pipeline.build import build_shards
from flexast.pipeline.build_config import BuildConfig
from flexast.pipeline.demo import CLASSES, plan, write_demo
from tests.pipeline.test_build import all_samples


def test_plan_covers_rates_channels_formats_and_lengths():
    clips = plan(240)
    assert {c.sample_rate for c in clips} == {16000, 22050} and {c.channels for c in clips} == {1, 2}
    assert {c.path.rsplit(".", 1)[1] for c in clips} == {"wav", "flac", "ogg", "mp3"}
    assert min(c.seconds for c in clips) >= 0.5 and max(c.seconds for c in clips) <= 8.0
    assert sum(c.split == "eval" for c in clips) == 40 and {c.label for c in clips} == set(CLASSES)


def test_same_seed_same_audio(tmp_path):
    a = write_demo(str(tmp_path / "a"), n_clips=10, seed=3)
    b = write_demo(str(tmp_path / "b"), n_clips=10, seed=3)
    write_demo(str(tmp_path / "c"), n_clips=10, seed=4)
    rel = [line.split(",")[0] for line in Path(a["all"]).read_text().splitlines()[1:]]
    assert rel == [line.split(",")[0] for line in Path(b["all"]).read_text().splitlines()[1:]]
    for r in rel:
        np.testing.assert_array_equal(sf.read(tmp_path / "a" / r)[0], sf.read(tmp_path / "b" / r)[0])
    assert not np.array_equal(sf.read(tmp_path / "a" / rel[0])[0][:100], sf.read(tmp_path / "c" / rel[0])[0][:100])


def test_classes_differ_in_spectral_shape(tmp_path):
    """Nearest neighbour on the log-mel spectrum averaged over each half of the clip (so rising and falling chirps
    differ), leave one out: far above chance (1/8)."""
    manifests = write_demo(str(tmp_path / "demo"), n_clips=64, seed=0)
    cfg = BuildConfig(name="demo", shard_samples=100)
    report = build_shards(manifests["all"], str(tmp_path / "out"), cfg, workers=1, progress=False)
    assert report.written == 64
    samples = list(all_samples(report.out, report.index).values())
    halves = [np.array_split(s["s10"].astype(np.float64), 2) for s in samples]
    x = np.stack([np.concatenate([h[0].mean(0), h[1].mean(0)]) for h in halves])  # (N, 2F)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    y = np.array([s["json"]["label_ids"][0] for s in samples])
    correct, confusion, names = 0, [], report.index["labels"]["names"]
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        guess = int(y[keep][np.argmin(((x[keep] - x[i]) ** 2).sum(1))])
        correct += int(guess == y[i])
        if guess != y[i]:
            confusion.append((names[y[i]], names[guess]))
    assert correct / len(y) >= 0.9, confusion
