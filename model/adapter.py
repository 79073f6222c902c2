"""Batch dispatch: the model (and a KD teacher) on a packed or a padded batch.

Notation: ``N`` clips, ``C`` classes, ``D`` width.

What else this module held now lives with its owner: the model of each stage and the weight transfer in
:mod:`model.recipes` (each layer resizing its own weight, in :mod:`model.patch_embed` and
:mod:`model.pos_embed`), checkpoint reads in :mod:`model.checkpoint`, the run folder in :mod:`model.run_dir`,
FLOPs in :mod:`model.flops`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flexast.model.ast import ASTModel
from flexast.model.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from flexast.model.config import Config, save_config
from flexast.model.data import padded_view
from flexast.pipeline.batch import PackedBatch


def model_input(batch: PackedBatch, padded: bool):
    """The model's input: the packed batch, or its ``(B, T, F)`` view for the classic padded AST
    (``data.loader.target_frames``)."""
    return padded_view(batch) if padded else batch


def logits(model: nn.Module, batch: PackedBatch, cfg: Config) -> torch.Tensor:
    """``(N, C)`` logits of a batch (packed, or padded when ``data.loader.target_frames``)."""
    return model(model_input(batch, bool(cfg.data.loader.target_frames)))


def embeddings(model: ASTModel, batch: PackedBatch, padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, C), pooled embeddings (N, D))``."""
    return model(model_input(batch, padded), return_embeddings=True)


def teacher_logits(teacher: ASTModel, batch: PackedBatch, cfg: Config) -> torch.Tensor:
    """The frozen teacher on the same clips, at ``recipe.kd.teacher_patch`` or the teacher's own kernel."""
    if cfg.data.loader.target_frames:
        return teacher(padded_view(batch))
    patch = tuple(cfg.recipe.kd.teacher_patch) or teacher.config.base_patch
    if tuple(patch) == batch.patch:
        return teacher(batch)
    clips = batch.clip_frames()
    return teacher(
        PackedBatch.from_clips(clips, batch.labels, batch.keys, patch, frame_shift_ms=batch.frame_shift_ms.cpu())
    )


# Kept for callers outside issue 15's files until they move (evaluate, demo, import, their tests): the run
# folder's reads and writes belong to model.run_dir, the checkpoint format's to model.checkpoint.


def save_weights(model: ASTModel, folder: str | Path, cfg: Config | None = None, extra: dict | None = None) -> Path:
    """``folder/model.safetensors`` (+ ``.json`` config sidecar), and the run config beside it when given."""
    path = save_checkpoint(model, Path(folder) / WEIGHTS, extra)
    if cfg is not None:
        save_config(cfg, Path(folder) / "config.yaml")
    return path


load_model = load_checkpoint
