"""Typed errors of the model package. Every message carries the offending value: key, shape, size, name."""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error raised on purpose by :mod:`model`."""


class ModelConfigError(ModelError, ValueError):
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
