"""The build configuration: everything that decides the bytes of the output, and nothing else.

Worker counts, the Dask address, progress bars and ``--overwrite`` are not part of it: they change how
a build runs, never what it writes. The config (with digests of the manifest rows and the shard plan)
is stored in ``index.json`` and in ``_build.json``; its hash decides whether a rerun may resume.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from flexast.pipeline import fbank_options
from flexast.pipeline.errors import ConfigError
from flexast.pipeline.units import ELASTICAST_SHIFTS_MS

AST_FBANK = {k: v for k, v in fbank_options.AST_FBANK.items() if k not in ("frame_shift", "sample_frequency")}
"""The AST fbank preset without shift and rate, which a build sets from ``shifts_ms`` and ``sample_rate``."""

FORMATS = ("wds", "zarr", "both")
LONG_CLIP_MODES = ("cut", "split")


@dataclass
class BuildConfig:
    """What a build writes.

    Attributes:
        name: collection name (``index.json`` ``name``; default output folder ``shards/<name>``).
        shifts_ms: frame shifts in milliseconds; one ``(T, F)`` array per shift per sample.
        sample_rate: target rate in Hz after resampling.
        features: Kaldi fbank options (``torchaudio.compliance.kaldi.fbank`` names), AST preset by default.
        format: ``wds`` (tar shards), ``zarr`` (Zarr v3 store) or ``both``.
        shard_bytes: target size of a shard in bytes (estimated from durations before decoding).
        shard_samples: if set, exactly this many manifest rows per shard instead (no duration probing).
        min_shards: with ``shard_bytes``, make shards smaller when needed so that each split has at least this
            many (when it has that many rows): loaders split shards across ranks and workers, builds across workers.
        max_seconds: cap on a clip's length in seconds, or None.
        long_clips: what happens above the cap: ``cut`` (keep the start, counted) or ``split`` into segments.
        min_seconds: clips shorter than this are rejected (``too_short``).
        keep_audio: also store the mono resampled audio as 16-bit FLAC.
        split: default split name for rows that have none (shards are named ``<split>-000000``).
    """

    name: str = "collection"
    shifts_ms: tuple[float, ...] = (10.0,)
    sample_rate: int = 16000
    features: dict = field(default_factory=lambda: dict(AST_FBANK))
    format: str = "wds"
    shard_bytes: int = 256 * 1024 * 1024
    shard_samples: int | None = None
    min_shards: int = 8
    max_seconds: float | None = None
    long_clips: str = "cut"
    min_seconds: float = 0.0
    keep_audio: bool = False
    split: str = "train"

    def __post_init__(self) -> None:
        self.shifts_ms = tuple(sorted({float(s) for s in self.shifts_ms}))
        self.features = {**AST_FBANK, **(self.features or {})}
        errors = []
        if not self.shifts_ms or any(s <= 0 for s in self.shifts_ms):
            errors.append(f"shifts_ms={self.shifts_ms!r} must be positive milliseconds")
        if self.format not in FORMATS:
            errors.append(f"format={self.format!r} is not one of {FORMATS}")
        if self.long_clips not in LONG_CLIP_MODES:
            errors.append(f"long_clips={self.long_clips!r} is not one of {LONG_CLIP_MODES}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            errors.append(f"max_seconds={self.max_seconds} must be positive")
        if self.min_seconds < 0:
            errors.append(f"min_seconds={self.min_seconds} must be >= 0")
        if self.max_seconds is not None and self.min_seconds > self.max_seconds:
            errors.append(f"min_seconds={self.min_seconds} > max_seconds={self.max_seconds}")
        if self.shard_bytes <= 0:
            errors.append(f"shard_bytes={self.shard_bytes} must be positive")
        if self.min_shards < 1:
            errors.append(f"min_shards={self.min_shards} must be >= 1")
        if self.shard_samples is not None and self.shard_samples <= 0:
            errors.append(f"shard_samples={self.shard_samples} must be positive")
        if "sample_frequency" in self.features:
            errors.append("features.sample_frequency is set from sample_rate; remove it")
        if errors:
            raise ConfigError("bad build config: " + "; ".join(errors))

    @property
    def n_mels(self) -> int:
        return int(self.features["num_mel_bins"])

    @property
    def frame_length_ms(self) -> float:
        return float(self.features["frame_length"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shifts_ms"] = list(self.shifts_ms)
        return d


def parse_shifts(text: str) -> tuple[float, ...]:
    """``"10"``, ``"10,12,20"``, ``"10:40:2"`` (start:stop:step, inclusive) or ``"elastic"`` → shifts in ms."""
    text = text.strip()
    if text == "elastic":
        return ELASTICAST_SHIFTS_MS
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            n = round((stop - start) / step) + 1
            return tuple(start + i * step for i in range(n))
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"--shifts {text!r}: expected 'elastic', '10,12,14' or '10:40:2'") from exc


def parse_size(text: str | int) -> int:
    """``"256MB"``, ``"1.5GB"``, ``"512k"`` or a number of bytes → bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in scale:
            return int(float(s[:-1]) * scale[s[-1]])
        return int(float(s))
    except ValueError as exc:
        raise ConfigError(f"size {text!r}: expected like 256MB, 1GB or a number of bytes") from exc


def digest(obj) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
