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
    n = round(seconds * sr)
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
    t = torch.arange(round(seconds * sr), dtype=torch.float64) / sr
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
    zarr_store: bool = False,
    max_labels: int = 2,
) -> dict:
    """Shards written directly per ``docs/shard-format.md`` (tar of json + float16 npy, and ``index.json``).

    Features are seeded random values, so a test can reload any member independently. Keys are
    ``clip{shard:03d}{i:04d}``. With ``zarr_store`` the same data also goes to ``store.zarr`` (one
    group per shard: ``<shift>/values``, ``<shift>/offsets``, ``keys``, ``label_values``,
    ``label_offsets``, ``duration_s``). Each clip has 1 to ``max_labels`` labels. Returns the index
    dict (also written to ``out_dir/index.json``).
    """
    import io
    import json
    import os
    import tarfile

    import numpy as np

    from flexast.pipeline.units import num_frames, shift_name

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

            group: dict = {"keys": [], "labels": [], "duration_s": [], "values": {}}
            for i in range(per_shard):
                key = f"clip{s:03d}{i:04d}"
                seconds = float(rng.uniform(min_seconds, max_seconds))
                n_samples = int(seconds * 16000)
                n_labels = int(rng.integers(1, max_labels + 1))
                label_ids = sorted({int(c) for c in rng.integers(0, n_classes, size=n_labels)})
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
                group["keys"].append(key)
                group["labels"].append(label_ids)
                group["duration_s"].append(meta["duration_s"])
                for k, a in arrays.items():
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, a, allow_pickle=False)
                    add(f"{key}.{k}.npy", buf.getvalue())
                    group["values"].setdefault(k, []).append(a)
                    frames_total[k] += a.shape[0]
                    v = a.astype(np.float64)
                    stats[k][0] += v.size
                    stats[k][1] += float(v.sum())
                    stats[k][2] += float((v * v).sum())
        shards.append(
            {
                "name": name,
                "samples": per_shard,
                "bytes": os.path.getsize(path),
                "frames": frames_total,
                "zarr_group": name[: -len(".tar")] if zarr_store else None,
            }
        )
        if zarr_store:
            _write_zarr_group(os.path.join(out_dir, "store.zarr", name[: -len(".tar")]), group)
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


def synthetic_clipset(
    n_clips: int = 48,
    n_classes: int = 4,
    n_mels: int = 32,
    shifts_ms=(10.0, 20.0, 40.0),
    min_frames: int = 40,
    max_frames: int = 120,
    multi_label: bool = False,
    seed: int = 0,
    n_shards: int = 4,
):
    """An in-memory source (:class:`pipeline.datasource.MemorySource`) of log-mel-like features whose
    classes differ in spectral shape, dealt round-robin over ``n_shards`` shards.

    Class ``c`` adds a ripple across mel bins with ``2(c + 1)`` periods over the band (3 nats deep) to a noise
    floor of about -6.5, so every patch, wherever it sits, shows its class's texture and a tiny model
    separates the classes in a few dozen steps. Coarser shifts are the 10 ms frames subsampled.
    """
    import numpy as np

    from flexast.pipeline.datasource import MemorySource
    from flexast.pipeline.units import shift_name

    rng = np.random.default_rng(seed)
    bins = np.arange(n_mels)
    shards: dict = {f"memory://synthetic/{s:06d}": [] for s in range(n_shards)}
    urls = list(shards)
    counts = [0] * n_classes
    names = [f"class{c}" for c in range(n_classes)]
    for i in range(n_clips):
        labels = [i % n_classes]
        if multi_label and rng.random() < 0.3:
            labels.append(int((labels[0] + 1 + rng.integers(n_classes - 1)) % n_classes))
        labels = sorted(labels)
        for c in labels:
            counts[c] += 1
        t = int(rng.integers(min_frames, max_frames + 1))
        base = -6.5 + rng.normal(0.0, 1.0, size=(t, n_mels))
        for c in labels:
            base += 3.0 * np.cos(2 * np.pi * 2 * (c + 1) * bins / n_mels)[None, :]
        feats = {shift_name(s): base[:: max(1, round(s / 10.0))].astype(np.float16) for s in shifts_ms}
        key = f"clip{i:04d}"
        url = urls[i % n_shards]
        meta = {"key": key, "label_ids": labels, "labels": [names[c] for c in labels]}
        meta["frames"] = {k: int(v.shape[0]) for k, v in feats.items()}
        shards[url].append({"key": key, "url": url, "meta": meta, "loc": feats})
    index = {
        "n_mels": n_mels,
        "shifts_ms": [float(s) for s in shifts_ms],
        "total_samples": n_clips,
        "labels": {"names": names, "display_names": [f"Class {c}" for c in range(n_classes)], "counts": counts},
        "stats": {shift_name(s): {"mean": -6.5, "std": 3.0} for s in shifts_ms},
    }
    return MemorySource("synthetic", index, {u: r for u, r in shards.items() if r})


# --- audio files, manifests, bad inputs and built shard sets (build-shards tests) -------------------------------

AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3")
_SUBTYPES = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}


def tone_array(seconds: float, sr: int = 16000, freq: float = 440.0, channels: int = 1, seed: int = 0):
    """A sine plus faint noise as numpy float32: ``(S,)`` for mono, ``(S, C)`` otherwise, peak about 0.5."""
    import numpy as np

    n = round(seconds * sr)
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    x = 0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(n)
    if channels > 1:
        x = np.stack([x * (1.0 - 0.1 * c) for c in range(channels)], axis=1)  # (S, C)
    return x.astype(np.float32)


def write_audio(path, seconds=0.5, sr=16000, freq=440.0, channels=1, seed=0, subtype=None) -> str:
    """Write a tone to ``path``; the format comes from the extension (wav, flac, ogg, mp3). Returns ``path``."""
    import os

    import soundfile as sf

    path = str(path)
    ext = path.rsplit(".", 1)[1].lower()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(
        path, tone_array(seconds, sr, freq, channels, seed), sr, format=ext.upper(), subtype=subtype or _SUBTYPES[ext]
    )
    return path


def write_manifest(path, rows: list[dict]) -> str:
    """Write rows (dicts with ``path``, ``label``/``labels``, ...) as CSV, TSV or JSONL by extension."""
    import csv
    import json
    import os

    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return path
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter="\t" if path.endswith(".tsv") else ",")
        w.writeheader()
        w.writerows(rows)
    return path


def write_collection(root, n=8, labels=("a", "b"), formats=AUDIO_FORMATS, seconds=(0.3, 0.9), manifest="manifest.csv"):
    """``n`` small clips under ``root/audio/`` cycling through formats and labels; every 5th at 22.05 kHz, every
    4th (from 1) stereo. Returns ``(manifest path, rows)``; rows hold relative ``path``, ``label`` and ``key``.
    """
    import os

    import numpy as np

    rows = []
    rng = np.random.default_rng(n)
    for i in range(n):
        fmt = formats[i % len(formats)]
        sr = 22050 if i % 5 == 3 else 16000
        channels = 2 if i % 4 == 1 else 1
        sec = float(np.round(rng.uniform(*seconds), 3))
        rel = f"audio/clip{i:03d}.{fmt}"
        write_audio(os.path.join(str(root), rel), sec, sr, 200.0 + 150.0 * i, channels, seed=i)
        rows.append({"path": rel, "label": labels[i % len(labels)], "key": f"clip{i:03d}"})
    return write_manifest(os.path.join(str(root), manifest), rows), rows


def write_bad_inputs(root) -> dict[str, dict]:
    """One bad input of each kind under ``root/bad/``: ``{expected reason (+ _variant): manifest row}``.

    Reasons: empty, unreadable (truncated header, random bytes, text named .wav), nonfinite (NaN samples),
    missing, unknown_label (vocabulary a, b), duplicate_key (key ``clip000``, as :func:`write_collection` uses).
    """
    import os

    import numpy as np
    import soundfile as sf

    bad = os.path.join(str(root), "bad")
    os.makedirs(bad, exist_ok=True)
    sf.write(os.path.join(bad, "empty.wav"), np.zeros((0,), np.float32), 16000, subtype="PCM_16")
    good = write_audio(os.path.join(bad, "good.wav"), 0.4)
    with open(good, "rb") as f:
        header = f.read()[:30]
    with open(os.path.join(bad, "truncated.wav"), "wb") as f:
        f.write(header)
    with open(os.path.join(bad, "random.flac"), "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with open(os.path.join(bad, "text.wav"), "w") as f:
        f.write("this is not audio\n" * 50)
    nan = tone_array(0.4)
    nan[100:110] = np.nan
    sf.write(os.path.join(bad, "nan.wav"), nan, 16000, subtype="FLOAT")
    return {
        "empty": {"path": "bad/empty.wav", "label": "a", "key": "bad_empty"},
        "unreadable_truncated": {"path": "bad/truncated.wav", "label": "a", "key": "bad_truncated"},
        "unreadable_random": {"path": "bad/random.flac", "label": "a", "key": "bad_random"},
        "unreadable_text": {"path": "bad/text.wav", "label": "a", "key": "bad_text"},
        "nonfinite": {"path": "bad/nan.wav", "label": "a", "key": "bad_nan"},
        "missing": {"path": "bad/does_not_exist.wav", "label": "a", "key": "bad_missing"},
        "unknown_label": {"path": "bad/good.wav", "label": "zzz", "key": "bad_label"},
        "duplicate_key": {"path": "bad/good.wav", "label": "a", "key": "clip000"},
    }


def build_small_shards(root, n=8, shifts_ms=(10.0,), shard_samples=3, fmt="wds", workers=1, **config):
    """A small collection under ``root`` built into ``root/shards`` by :func:`pipeline.build.build_shards`.

    ``config`` holds further :class:`pipeline.build_config.BuildConfig` fields. Returns the ``BuildReport``
    (``report.out`` is the shard folder, ``report.index`` the index).
    """
    import os

    from flexast.pipeline.build import build_shards
    from flexast.pipeline.build_config import BuildConfig

    manifest, _ = write_collection(root, n)
    cfg = BuildConfig(name="small", shifts_ms=tuple(shifts_ms), shard_samples=shard_samples, format=fmt, **config)
    return build_shards(manifest, os.path.join(str(root), "shards"), cfg, workers=workers, progress=False)


def _write_zarr_group(folder: str, group: dict) -> None:
    """One shard's Zarr v3 group per ``docs/shard-format.md`` (plain chunks, no sharding codec)."""
    import numpy as np
    import zarr

    root = zarr.open_group(folder, mode="w", zarr_format=3)

    def put(name, values):
        values = np.asarray(values)
        chunks = (64, values.shape[1]) if values.ndim == 2 else (max(1, values.shape[0]),)
        root.create_array(
            name, shape=values.shape, dtype=str if values.dtype.kind == "U" else values.dtype, chunks=chunks
        )[...] = values

    for shift, arrays in group["values"].items():
        put(f"{shift}/values", np.concatenate(arrays, 0))
        put(f"{shift}/offsets", np.concatenate([[0], np.cumsum([a.shape[0] for a in arrays])]).astype(np.int64))
    put("keys", np.array(group["keys"]))
    put("label_values", np.array([c for ids in group["labels"] for c in ids], dtype=np.int64))
    put("label_offsets", np.concatenate([[0], np.cumsum([len(ids) for ids in group["labels"]])]).astype(np.int64))
    put("duration_s", np.array(group["duration_s"], dtype=np.float64))


def write_model_folder(folder, model, names, display_names, labels="single", stats=None, features=None):
    """A run's ``final/``-style folder written by hand: ``model.safetensors`` and the ``labels.json`` that
    ``model predict``, ``model eval`` and ``model export`` read (training statistics per shift, no config norm)."""
    import json
    from pathlib import Path

    from flexast.model.checkpoint import save_checkpoint

    folder = Path(folder)
    save_checkpoint(model, folder / "model.safetensors")
    info = {
        "names": list(names),
        "display_names": list(display_names),
        "labels": labels,
        "stats": stats or {"10.0": [-6.0, 4.0]},
        "norm": [],
        "features": features or {},
        "sample_rate": 16000,
    }
    (folder / "labels.json").write_text(json.dumps(info))
    return folder
