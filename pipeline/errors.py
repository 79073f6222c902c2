"""Typed errors of the data pipeline. Every message carries the offending value: file, key, shard, shape."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error raised on purpose by :mod:`pipeline`."""


class AudioError(PipelineError):
    """Audio that cannot be used: missing, unreadable, empty, too short, or with NaN/Inf samples.

    ``reason`` is a short machine-readable tag written to ``rejected.jsonl``.
    """

    def __init__(self, reason: str, source: str, detail: str = ""):
        self.reason = reason
        self.source = source
        self.detail = detail
        super().__init__(f"{reason}: {source}" + (f" ({detail})" if detail else ""))


class ManifestError(PipelineError):
    """A manifest that cannot be parsed (missing column, bad number, unknown format), with file and row."""


class LabelError(PipelineError):
    """A label that is not in the vocabulary."""


class ShardError(PipelineError):
    """A shard that is missing, truncated or inconsistent with ``index.json``; the message names the shard."""


class ConfigError(PipelineError):
    """Bad options or config keys; the message lists every offending key at once."""


class FeatureError(PipelineError):
    """Bad input to the featurizer (shapes, lengths, options)."""


def check_known_keys(cls, given, what: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` naming every key of ``given`` that is not a field of dataclass ``cls``, and the known ones."""
    import dataclasses

    known = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise error(f"unknown {what}: {unknown} (known: {known})")
