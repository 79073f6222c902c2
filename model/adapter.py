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

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from flexast.model.ast import ASTModel, ModelConfig
from flexast.model.checkpoint import load_checkpoint, load_state_dict, read_config, save_checkpoint
from flexast.model.config import Config
from flexast.model.data import padded_view
from flexast.model.errors import CheckpointError
from flexast.model.pos_embed import resize_grid, resize_table
from flexast.pipeline.batch import PackedBatch

WEIGHTS = "model.safetensors"
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


def load_init(path: str, fmt: str) -> ASTModel:
    """A model from our checkpoint folder/file, an official AST ``.pth`` or an HF state dict."""
    if fmt == "flexast":
        return load_model(path, "cpu")
    from flexast.model import convert  # the model engineer's converters

    state = load_state_dict(path)
    if fmt == "official":
        return convert.from_official_ast(state)
    return convert.from_hf(state)


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


def train_flops(model: ASTModel, batch, cfg: Config) -> float:
    """Forward + backward FLOPs of one micro-step (3× the forward), from :mod:`model.flops` when available."""
    try:
        from flexast.model import flops as fl
    except ImportError:
        fl = None
    if fl is not None and hasattr(fl, "train_flops"):
        try:
            return float(fl.train_flops(model.config, batch))
        except TypeError:
            pass
    return 3.0 * forward_flops_estimate(model.config, batch)


def forward_flops_estimate(c: ModelConfig, batch) -> float:
    """Fallback analytic forward FLOPs (2·MACs): patch embedding, attention per clip, MLP, head."""
    d = c.embed_dim
    lengths = batch.tokens.tolist()
    p_f, p_t = batch.patch
    total = 0.0
    for n in lengths:
        n_all = n + c.n_prefix
        per_block = 2 * n_all * (4 * d * d + 2 * c.mlp_ratio * d * d) + 4 * n_all * n_all * d
        total += 2 * n * p_f * p_t * d + c.depth * per_block + 2 * d * c.num_classes
    return total


def save_weights(model: ASTModel, folder: str | Path, cfg: Config | None = None, extra: dict | None = None) -> Path:
    """``folder/model.safetensors`` (+ ``.json`` config sidecar) and the run config next to it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(model, folder / WEIGHTS, extra)
    if cfg is not None:
        from flexast.model.config import save_config

        save_config(cfg, folder / "config.yaml")
    return path


def weights_path(path: str | Path) -> Path:
    """The ``model.safetensors`` inside a checkpoint folder, or the file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"no model weights at {path} (expected a run's final/ folder or a .safetensors file)")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ASTModel:
    """Rebuild a model from a checkpoint folder (or ``.safetensors`` file), weights included."""
    return load_checkpoint(weights_path(path), device)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    return load_state_dict(weights_path(path))


def stored_model_config(path: str | Path) -> ModelConfig:
    return read_config(weights_path(path))


def label_info(path: str | Path) -> dict:
    """The ``labels.json`` saved beside a checkpoint's weights (vocabulary, label mode, training statistics),
    or ``{}`` when there is none."""
    folder = weights_path(path).parent
    for candidate in (folder / "labels.json", folder.parent / "labels.json"):
        if candidate.exists():
            return json.loads(candidate.read_text())
    return {}


def label_names(path: str | Path) -> tuple[list[str], list[str]]:
    """Class names and display names saved with a run (``labels.json`` beside the weights), or numbers."""
    folder = weights_path(path).parent
    for candidate in (folder / "labels.json", folder.parent / "labels.json"):
        if candidate.exists():
            data = json.loads(candidate.read_text())
            return list(data["names"]), list(data.get("display_names", data["names"]))
    n = stored_model_config(path).num_classes
    names = [str(i) for i in range(n)]
    return names, names


def describe(model: ASTModel) -> dict:
    """A small JSON-able summary of a model."""
    return {**dataclasses.asdict(model.config), "params": model.num_params()}
