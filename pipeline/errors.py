"""Typed errors of flexast, rooted here. Every message carries the offending value: file, key, shard, shape.

Hierarchy (``pipeline`` is the lower layer, so the root lives here and ``model.errors`` derives from it)::

    FlexastError                  every error raised on purpose, by either half: catch this one
    ├── ConfigError (ValueError)  a bad config value or key, any config (run, model, build, stream, fbank)
    ├── PipelineError             the data pipeline: AudioError, ManifestError, LabelError, ShardError,
    │                             FeatureError, BatchError (the PackedBatch seam), PackingError (the packer)
    └── model.errors.ModelError   the model: ModelConfigError (also a ConfigError), ShapeError, ...

Typed errors that replace a bare ``ValueError`` also derive from ``ValueError``, so callers that caught it
still do.
"""

from __future__ import annotations


class FlexastError(Exception):
    """Root of every error raised on purpose by flexast (:mod:`pipeline` and :mod:`model`)."""


class ConfigError(FlexastError, ValueError):
    """Bad options or config keys, of any config; the message lists every offending key at once."""


class PipelineError(FlexastError):
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


class FeatureError(PipelineError):
    """Bad input to the featurizer (shapes, lengths, options)."""


class BatchError(PipelineError, ValueError):
    """A :class:`~pipeline.batch.PackedBatch` whose fields disagree, or a clip that cannot enter one (named)."""


class PackingError(PipelineError, ValueError):
    """Packer settings or clips the packer cannot place: budget, mode, row length, a clip over the budget."""


def run_command(run, args) -> int:
    """Exit status of a CLI command ``run(args)``: its own, or 2 after one line naming a :class:`FlexastError`."""
    import sys

    try:
        return int(run(args))
    except FlexastError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
