"""Test factories shared by the whole suite: synthetic audio (and, later, shards), all seeded.

Audio is mono float32 at ``sr`` Hz, amplitudes well inside [-1, 1].
"""

from __future__ import annotations

import math

import torch


def broadband_clip(seconds: float, sr: int = 16000, seed: int = 0) -> torch.Tensor:
    """Tones, a chirp and a white-noise floor: every mel bin well above float32 rounding noise.

    Use it where two *different* implementations are compared (their rounding differs in near-silent bins).
    """
    g = torch.Generator().manual_seed(seed)
    n = int(round(seconds * sr))
    t = torch.arange(n, dtype=torch.float64) / sr
    f0 = 100.0 + 900.0 * torch.rand((), generator=g, dtype=torch.float64)
    x = 0.2 * torch.sin(2 * math.pi * f0 * t) + 0.1 * torch.sin(2 * math.pi * (3.7 * f0) * t + 1.0)
    x += 0.1 * torch.sin(2 * math.pi * (200.0 * t + 1500.0 * t * t))  # chirp
    x += 0.02 * torch.randn(n, generator=g, dtype=torch.float64)
    return x.float()


def random_clips(count: int, min_seconds: float, max_seconds: float, sr: int = 16000, seed: int = 0):
    """``count`` broadband clips of random lengths in [min_seconds, max_seconds]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.empty(count).uniform_(min_seconds, max_seconds, generator=g).tolist()
    return [broadband_clip(s, sr, seed + 1 + i) for i, s in enumerate(lengths)]


def tone_clip(seconds: float, freq: float, sr: int = 16000, amplitude: float = 0.5) -> torch.Tensor:
    """A pure sine tone."""
    t = torch.arange(int(round(seconds * sr)), dtype=torch.float64) / sr
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def write_shard_folder(
    out_dir,
    n_shards: int = 3,
    per_shard: int = 8,
    shifts_ms=(10.0, 20.0),
    n_mels: int = 16,
    n_classes: int = 5,
    min_seconds: float = 0.3,
    max_seconds: float = 1.5,
    seed: int = 0,
    split: str = "train",
) -> dict:
    """Shards written directly per ``docs/shard-format.md`` (tar of json + float16 npy, and ``index.json``).

    Features are seeded random values, so a test can reload any member independently. Keys are
    ``clip{shard:03d}{i:04d}``. Returns the index dict (also written to ``out_dir/index.json``).
    """
    import io
    import json
    import os
    import tarfile

    import numpy as np

    from pipeline.units import num_frames, shift_name

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"label{c}" for c in range(n_classes)]
    counts = [0] * n_classes
    stats = {shift_name(s): [0, 0.0, 0.0] for s in shifts_ms}
    shards = []
    for s in range(n_shards):
        name = f"{split}-{s:06d}.tar"
        frames_total = {shift_name(x): 0 for x in shifts_ms}
        path = os.path.join(out_dir, name)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:

            def add(member: str, data: bytes, tar=tar) -> None:
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                tar.addfile(info, io.BytesIO(data))

            for i in range(per_shard):
                key = f"clip{s:03d}{i:04d}"
                seconds = float(rng.uniform(min_seconds, max_seconds))
                n_samples = int(seconds * 16000)
                label_ids = sorted({int(c) for c in rng.integers(0, n_classes, size=int(rng.integers(1, 3)))})
                for c in label_ids:
                    counts[c] += 1
                arrays = {}
                for shift in shifts_ms:
                    t = num_frames(n_samples, 25.0, shift, 16000)
                    arrays[shift_name(shift)] = rng.normal(-4.0, 3.0, size=(t, n_mels)).astype(np.float16)
                meta = {
                    "key": key,
                    "labels": [names[c] for c in label_ids],
                    "label_ids": label_ids,
                    "duration_s": n_samples / 16000,
                    "source": f"synthetic/{key}.wav",
                    "sample_rate": 16000,
                    "frames": {k: int(a.shape[0]) for k, a in arrays.items()},
                    "start_s": 0.0,
                    "end_s": n_samples / 16000,
                }
                add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                for k, a in arrays.items():
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, a, allow_pickle=False)
                    add(f"{key}.{k}.npy", buf.getvalue())
                    frames_total[k] += a.shape[0]
                    v = a.astype(np.float64)
                    stats[k][0] += v.size
                    stats[k][1] += float(v.sum())
                    stats[k][2] += float((v * v).sum())
        shards.append({"name": name, "samples": per_shard, "bytes": os.path.getsize(path), "frames": frames_total})
    stat_out = {}
    for k, (n, sm, sq) in stats.items():
        mean = sm / n
        stat_out[k] = {"count": n, "sum": sm, "sumsq": sq, "mean": mean, "std": max(sq / n - mean * mean, 0.0) ** 0.5}
    index = {
        "format_version": 1,
        "name": "synthetic",
        "split": split,
        "n_mels": n_mels,
        "sample_rate": 16000,
        "shifts_ms": list(shifts_ms),
        "shards": shards,
        "total_samples": n_shards * per_shard,
        "labels": {"names": names, "display_names": names, "counts": counts},
        "stats": stat_out,
    }
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f)
    return index
