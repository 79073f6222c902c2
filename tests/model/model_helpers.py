"""Helpers of the model tests: a tiny config and a packed batch from clips."""

from __future__ import annotations

import torch

from flexast.model import ModelConfig
from flexast.pipeline.batch import PackedBatch


def tiny_config(**overrides) -> ModelConfig:
    """A 32-wide, 2-deep model on 32 mel bins: fast enough for numerics on 2 CPU cores."""
    base = dict(
        num_classes=5,
        n_mels=32,
        max_frames=64,
        embed_dim=32,
        depth=2,
        num_heads=2,
        base_patch=(8, 8),
        fstride=8,
        tstride=8,
    )
    return ModelConfig(**{**base, **overrides})


def packed(clips, patch, n_classes=5) -> PackedBatch:
    """A PackedBatch of ``(T_i, F)`` clips with zero labels and keys ``c0, c1, ...``."""
    return PackedBatch.from_clips(
        clips, torch.zeros(len(clips), n_classes), [f"c{i}" for i in range(len(clips))], patch
    )
