"""The recipes' data: open ``data.train`` / ``data.valid`` as sources and make the one loader for a phase.

Notation: ``T`` frames at a clip's own frame shift, ``F`` mel bins, ``R`` a pooling factor (frame
shift 10·R ms), ``p = (p_f, p_t)`` the patch of a step.

Every reader of the model side (training, in-training validation, ``model eval``, the demo) goes
through :class:`pipeline.loader.StreamLoader` over a :mod:`pipeline.datasource` source:
``data.source: memory`` caches the shards in memory once (small and medium sets), ``stream`` reads
them on the fly (local, http(s)://, s3://). Tar and Zarr builds are both accepted. ``data.loader`` is the
loader's own config; :func:`stream_config` only sets a phase's patches, seed, resolution and length on it.

The classic padded AST input (``data.loader.target_frames``) is the same :class:`~pipeline.batch.PackedBatch`
with every clip cut or zero-padded to ``target_frames`` frames; :func:`padded_view` gives it as ``(B, T, F)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from flexast.model.config import Config
from flexast.pipeline.batch import PackedBatch
from flexast.pipeline.datasource import MemorySource, Source, label_map, open_source
from flexast.pipeline.errors import ConfigError, ShardError
from flexast.pipeline.resolution import ResolutionPolicy, TimeScale
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.units import parse_shift_name, shift_name


def open_data(spec: str, key: str, loader: str = "memory", max_clips: int = 0, storage_options=None) -> Source:
    """The source a config key (``data.train``, ``data.valid``, ``--data``) names, checked before any step.

    Raises:
        ConfigError: naming the key and the path, when it is empty, names nothing, or holds no clips.
    """
    if not spec:
        raise ConfigError(f"{key} is empty: give a shard folder, its index.json, a glob of .tar shards or a URL")
    try:
        source = open_source(spec, storage_options)
    except ShardError as exc:
        raise ConfigError(f"{key}={spec!r}: {exc}") from exc
    if source.n_clips == 0 and all(s.samples is not None for s in source.shards):
        raise ConfigError(f"{key}={spec!r} holds no clips (its index.json lists {len(source.shards)} empty shards)")
    if loader == "memory":
        try:
            source = MemorySource.cache(source, max_clips)
        except ShardError as exc:
            raise ConfigError(f"{key}={spec!r}: {exc}") from exc
        if source.n_clips == 0:
            raise ConfigError(f"{key}={spec!r}: no readable clips")
    return source


def check_sources(train: Source, valid: Source | None, loader: StreamConfig) -> None:
    """Fail before any step, naming the key and path: a training set without label names or (without
    ``data.loader.norm_mean``) statistics, or a held-out label the training vocabulary lacks (matched by name)."""
    if not train.label_names:
        raise ConfigError(f"data.train={train.spec!r}: its index.json lists no label names")
    if valid is not None:
        counts = valid.index.get("labels", {}).get("counts")
        label_map(valid.label_names, train.label_names, f"data.valid={valid.spec!r}", counts)
    if loader.norm_mean is None and not train.index.get("stats"):
        where = f"data.train={train.spec!r}"
        raise ConfigError(f"{where}: no statistics in its index.json; set data.loader.norm_mean and norm_std")


def shifts_of(source: Source) -> list[float]:
    """The frame shifts (ms) the source stores."""
    return [float(s) for s in source.index.get("shifts_ms", [])]


def training_stats(source: Source) -> dict[str, list[float]]:
    """``{"10.0": [mean, std], ...}``: the per-shift statistics saved with a checkpoint (``labels.json``)."""
    return {str(parse_shift_name(k)): [float(v["mean"]), float(v["std"])] for k, v in source.index["stats"].items()}


def labels_info(source: Source, loader: StreamConfig) -> dict:
    """What ``labels.json`` records beside a checkpoint: class names, label mode, normalisation and the feature
    recipe of the training data (``model predict`` and ``model eval`` featurise and normalise alike)."""
    index = source.index
    labels, build = index.get("labels", {}), index.get("config", {})
    names = source.label_names
    return {
        "names": names,
        "display_names": list(labels.get("display_names", names)),
        "labels": "single" if loader.label_mode == "index" else "multi",
        "stats": training_stats(source) if index.get("stats") else {},
        "norm": [loader.norm_mean, loader.norm_std] if loader.norm_mean is not None else [],
        "features": dict(build.get("features", {})),
        "sample_rate": int(index.get("sample_rate", build.get("sample_rate", 16000))),
    }


def training_norm(source: Source, loader: StreamConfig):
    """The loader's ``norm=`` for the held-out set: ``norm_mean/norm_std``, else the training statistics per shift."""
    if loader.norm_mean is not None:
        return (loader.norm_mean, loader.norm_std)
    return {k: (v["mean"], v["std"]) for k, v in source.index.get("stats", {}).items()}


def norm_from_info(info: dict, shift_ms: float) -> tuple[float, float]:
    """``(mean, std)`` a checkpoint normalises ``shift_ms`` features with: its ``norm`` (the run's
    ``data.loader.norm_mean/norm_std``), else its training statistics at the nearest stored shift, else
    AST's AudioSet values."""
    if info.get("norm"):
        return tuple(float(v) for v in info["norm"])
    stats = {float(k): v for k, v in info.get("stats", {}).items()}
    if not stats:
        return (-4.2677393, 4.5689974)  # AST's AudioSet values
    nearest = min(stats, key=lambda s: abs(s - shift_ms))
    return tuple(float(v) for v in stats[nearest])


def norm_table(info: dict, shifts_ms: Sequence[float]) -> dict[str, tuple[float, float]]:
    """:func:`norm_from_info` for every shift of a held-out set, keyed by shift name (the loader's ``norm=``)."""
    return {shift_name(s): norm_from_info(info, s) for s in shifts_ms}


def stream_config(cfg: Config, phase, seed: int, stride: tuple[int, int] | None = None) -> dict:
    """The loader options of one training phase: ``data.loader`` (already the loader's config) with the phase's
    patches, seed, resolution and length cap set on a copy."""
    lc = cfg.data.loader
    if lc.target_frames and lc.target_frames % phase.patches[0][1]:
        raise ConfigError(
            f"data.loader.target_frames={lc.target_frames} must be a multiple of the patch's time size "
            f"{phase.patches[0][1]}"
        )
    over = {
        "patches": [list(p) for p in phase.patches],
        "train": True,
        "seed": seed,
        "resolution": dataclasses.asdict(phase.resolution),
        "max_frames": None if lc.target_frames else phase.max_frames,
        "stride": list(stride) if lc.target_frames and stride else None,
    }
    return dataclasses.asdict(dataclasses.replace(lc, **over))


def eval_config(
    patch: tuple[int, int],
    resolution: TimeScale,
    max_frames: int,
    n_mels: int,
    *,
    single: bool,
    pool_mode: str = "avg",
    budget: int = 16384,
    pad_to: int = 0,
    stride: tuple[int, int] | None = None,
) -> dict:
    """Loader options of one evaluation pass: every clip once, centre cuts, no augmentation."""
    from flexast.pipeline.batch import token_count

    frames = pad_to or max_frames
    room = int(token_count(frames + patch[1], n_mels, patch, stride if pad_to else None))
    return {
        "budget_tokens": max(budget, room),  # room for the longest clip: nothing is cut by the budget
        "patches": [list(patch)],
        "train": False,
        "resolution": dataclasses.asdict(ResolutionPolicy.at(resolution, pool_mode)),
        "max_frames": None if pad_to else max_frames,
        "target_frames": pad_to or None,
        "label_mode": "index" if single else "multi_hot",
        "stride": list(stride) if pad_to and stride else None,
    }


def padded_view(batch: PackedBatch) -> torch.Tensor:
    """``(B, T, F)`` view of a batch of equal-length clips (the classic padded AST input)."""
    t = int(batch.n_frames[0]) if batch.n_clips else 0
    return batch.frames.view(batch.n_clips, t, batch.n_mels)  # (ΣT, F) → (B, T, F): equal lengths


def model_input(batch: PackedBatch, padded: bool):
    """The model's input: the packed batch, or its ``(B, T, F)`` view for the classic padded AST
    (``data.loader.target_frames``)."""
    return padded_view(batch) if padded else batch


def describe_shift(shift_ms: float) -> str:
    """``'s10'``-style name of a shift, for logs and tables."""
    return shift_name(shift_ms) if math.isfinite(shift_ms) else str(shift_ms)
