"""The recipes' view of :class:`model.ast.ASTModel`: build from a run config, move between stages, save, load.

Notation: ``(p_f, p_t)`` patch, ``(H, W)`` stored positional grid, ``D`` width, ``C`` classes.

Moving weights to a new geometry (coarse-to-fine phase transitions, initialisation from another
checkpoint): a fresh model is built for the new :class:`~model.ast.ModelConfig` and every tensor of the
old one is copied; the patch kernel is resized with PI-resize or bilinear (``model.patch_embed``) and
the positional tables are interpolated to the new grid (``model.pos_embed``). Tensors whose shapes
cannot be related (a classifier for another number of classes) keep their fresh initialisation and
are listed in the returned report.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flexast.model.ast import ASTModel, ModelConfig
from flexast.model.checkpoint import WEIGHTS, load_checkpoint, load_init, save_checkpoint
from flexast.model.config import Config
from flexast.model.data import padded_view
from flexast.model.pos_embed import resize_grid, resize_table
from flexast.pipeline.batch import PackedBatch

POOL_NAMES = {"cls": "cls", "cls_dist": "cls_dist", "attention": "attn", "mean": "mean"}
POS_NAMES = {"grid": "grid", "factorised": "factorized"}


def stage_kernel(cfg: Config, stage=None) -> tuple[int, int]:
    """Native kernel size: the stage's (coarse-to-fine), the fixed patch (ast/elasticast) or the base (flexiast)."""
    if stage is not None and stage.kernel is not None:
        return tuple(stage.kernel)
    kind = stage.kind if stage is not None else cfg.recipe.name
    if kind == "flexiast":
        return tuple(int(v) for v in cfg.model.base_patch)
    return tuple(int(v) for v in cfg.recipe.patch)


def model_config(cfg: Config, n_classes: int, n_mels: int, stage=None) -> ModelConfig:
    """The :class:`ModelConfig` of a run (at a stage's geometry when given)."""
    m = cfg.model
    kernel = stage_kernel(cfg, stage)
    max_frames = stage.max_frames if stage is not None else cfg.data.max_frames
    if cfg.data.pad_to:
        max_frames = cfg.data.pad_to
    over = {
        "num_classes": n_classes,
        "n_mels": n_mels,
        "max_frames": max_frames,
        "mlp_ratio": m.mlp_ratio,
        "base_patch": kernel,
        "fstride": m.fstride or kernel[0],
        "tstride": m.tstride or kernel[1],
        "patch_resize": cfg.recipe.resize,
        "resize_axes": "time" if cfg.recipe.time_only else "both",
        "pos_embed": POS_NAMES[m.pos],
        "pool": POOL_NAMES[m.pool],
        "drop_path": m.drop_path,
        "token_dropout": m.token_dropout,
        "attention": cfg.run.attention,
    }
    if m.preset == "custom":
        return ModelConfig(embed_dim=m.embed_dim, depth=m.depth, num_heads=m.heads, **over)
    extra = {k: v for k, v in (("embed_dim", m.embed_dim), ("depth", m.depth), ("num_heads", m.heads)) if v}
    return ModelConfig.preset(m.preset, **over, **extra)


@torch.no_grad()
def transfer(src: nn.Module, dst: ASTModel, method: str = "pi") -> list[str]:
    """Copy ``src``'s weights into ``dst``, resizing the patch kernel and positional tables to ``dst``'s grid.

    Returns:
        Names of ``dst`` tensors left at their initialisation (no counterpart of a relatable shape).
    """
    src_state = src.state_dict()
    out = dst.state_dict()
    skipped = []
    for name, value in out.items():
        if name not in src_state:
            skipped.append(name)
            continue
        old = src_state[name]
        if old.shape == value.shape:
            out[name] = old.clone()
        elif name == "patch_embed.proj.weight":
            pe = src.patch_embed
            saved = pe.resize
            pe.resize = method
            try:
                out[name] = pe.kernel(tuple(value.shape[-2:])).detach().clone()  # (D, 1, p_f, p_t)
            finally:
                pe.resize = saved
        elif name == "pos_embed.weight":
            n_pre = dst.pos_embed.n_prefix
            grid = src.pos_embed.table()  # (D, H, W)
            new = resize_grid(grid, dst.pos_embed.grid).flatten(1).T  # (H'·W', D)
            prefix = old[0, :n_pre] if src.pos_embed.n_prefix == n_pre else value[0, :n_pre]
            out[name] = torch.cat([prefix, new], 0)[None]  # (1, P + H'·W', D)
        elif name in ("pos_embed.freq", "pos_embed.time"):
            out[name] = resize_table(old, value.shape[0])  # (n, D)
        else:
            skipped.append(name)
    dst.load_state_dict(out)
    return skipped


def build_model(cfg: Config, n_classes: int, n_mels: int) -> ASTModel:
    """A fresh model for ``cfg``, initialised from ``model.init`` when given (resized to this geometry)."""
    model = ASTModel(model_config(cfg, n_classes, n_mels))
    if cfg.model.init:
        src = load_init(cfg.model.init, cfg.model.init_format)
        skipped = transfer(src, model, cfg.recipe.resize)
        if skipped:
            print(f"init from {cfg.model.init}: kept fresh {skipped}")
    return model


def move_to_stage(model: ASTModel, stage, cfg: Config) -> ASTModel:
    """``model`` rebuilt at ``stage``'s kernel and grid (the same object when nothing changes)."""
    c = model.config
    new = model_config(cfg, c.num_classes, c.n_mels, stage)
    if (new.base_patch, new.max_frames, new.fstride, new.tstride) == (c.base_patch, c.max_frames, c.fstride, c.tstride):
        return model
    dst = ASTModel(new).to(next(model.parameters()).device)
    transfer(model, dst, stage.transfer)
    return dst


def model_input(batch: PackedBatch, padded: bool):
    """The model's input: the packed batch, or its ``(B, T, F)`` view for the classic padded AST (``data.pad_to``)."""
    return padded_view(batch) if padded else batch


def logits(model: nn.Module, batch: PackedBatch, cfg: Config) -> torch.Tensor:
    """``(N, C)`` logits of a batch (packed, or padded when ``data.pad_to``)."""
    return model(model_input(batch, bool(cfg.data.pad_to)))


def embeddings(model: ASTModel, batch: PackedBatch, padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (N, C), pooled embeddings (N, D))``."""
    return model(model_input(batch, padded), return_embeddings=True)


def teacher_logits(teacher: ASTModel, batch: PackedBatch, cfg: Config) -> torch.Tensor:
    """The frozen teacher on the same clips, at ``recipe.kd.teacher_patch`` or the teacher's own kernel."""
    if cfg.data.pad_to:
        return teacher(padded_view(batch))
    patch = tuple(cfg.recipe.kd.teacher_patch) or teacher.config.base_patch
    if tuple(patch) == batch.patch:
        return teacher(batch)
    clips = batch.clip_frames()
    return teacher(
        PackedBatch.from_clips(clips, batch.labels, batch.keys, patch, frame_shift_ms=batch.frame_shift_ms.cpu())
    )


# Kept for callers outside issue 15's files until they move (evaluate, demo, their tests): the run folder's
# reads and writes belong to model.run_dir, the checkpoint format's to model.checkpoint.


def save_weights(model: ASTModel, folder: str | Path) -> Path:
    """``folder/model.safetensors`` (+ ``.json`` config sidecar)."""
    return save_checkpoint(model, Path(folder) / WEIGHTS)


load_model = load_checkpoint
