"""Typed errors of the model package. Every message carries the offending value: key, shape, size, name.

They derive from :class:`pipeline.errors.FlexastError`, the root both halves raise (see there for the tree).
"""

from __future__ import annotations

from flexast.pipeline.errors import ConfigError, FlexastError


class ModelError(FlexastError):
    """Base class of every error raised on purpose by :mod:`model`."""


class ModelConfigError(ModelError, ConfigError):
    """A bad :class:`model.ast.ModelConfig`; the message lists every offending field at once."""


class ShapeError(ModelError, ValueError):
    """An input or weight whose shape does not fit the model (patch size, mel bins, grid)."""


class BackendError(ModelError, RuntimeError):
    """An attention backend that cannot run here (unknown name, no CUDA, wrong dtype, no backward)."""


class ConversionError(ModelError, KeyError):
    """A foreign state dict that cannot be converted: missing or unexpected keys, or shapes that disagree."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0]) if self.args else ""


class CheckpointError(ModelError):
    """A checkpoint file that is missing, not ours, or inconsistent with its stored config."""
