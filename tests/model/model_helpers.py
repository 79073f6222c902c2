"""Helpers of the model tests: a tiny config, a tiny transformers peer and a packed batch from clips."""

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


def tiny_hf_ast(hf_ast, seed: int = 0, **overrides):
    """A tiny ``ASTForAudioClassification`` of ``transformers`` (``hf_ast``: its AST module), in eval mode:
    32 wide, 2 layers of 2 heads, 8×8 patches at stride 8 on 32 mel bins, 64 frames, 5 labels."""
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=5)
    base.update(patch_size=8, frequency_stride=8, time_stride=8, max_length=64, num_mel_bins=32)  # tiny_config's input
    torch.manual_seed(seed)
    return hf_ast.ASTForAudioClassification(hf_ast.ASTConfig(**{**base, **overrides})).eval()


def packed(clips, patch, n_classes=5) -> PackedBatch:
    """A PackedBatch of ``(T_i, F)`` clips with zero labels and keys ``c0, c1, ...``."""
    return PackedBatch.from_clips(
        clips, torch.zeros(len(clips), n_classes), [f"c{i}" for i in range(len(clips))], patch
    )
