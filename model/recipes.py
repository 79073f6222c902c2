"""The four training recipes as plans of phases: what each phase feeds the model and for how long.

A *phase* fixes the patch sizes drawn per step, the per-clip resolution policy, the length cap, whether a
teacher is distilled, and the phase length. ``ast``, ``flexiast`` and ``elasticast`` are one phase;
``coarse_to_fine`` has one per entry of ``recipe.phases``. Between phases the trainer moves the weights to the new
token grid (:func:`move_to_phase`: a model for the phase's :func:`model_config`, the weights copied over by
:func:`transfer`, each layer resizing its own) and resets the optimizer and lr schedule, as the
coarse-to-fine paper does.

Units: frames at the clip's own resolution; frame shifts in ms; R the temporal compression factor.

Recipe → phase mapping:
    ast            patch fixed; resolution from ``data``; padded input with ``data.loader.target_frames``.
    flexiast       patch drawn uniformly per step from ``recipe.patch_sizes`` (``patch_embed.patch_of``:
                   p×p for a square base, the base's shape at width p, ``(base_f, p)`` with ``time_only``),
                   resized by ``recipe.resize``; optional KD.
    elasticast     packed native lengths, resolution from ``data`` (random shifts or pool), fixed patch.
    coarse_to_fine phase i compresses time by R_i: ``fshift`` (stored shift 10·R ms), ``pool`` (avg|max
                   pool by R of the base shift), or ``patch`` (rectangular patch (p_f, R·p_t)); the
                   length cap shrinks by R so each phase sees the same seconds of audio.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from flexast.model.ast import ASTModel, ModelConfig
from flexast.model.checkpoint import load_init
from flexast.model.config import Config, PhaseConfig
from flexast.model.patch_embed import patch_of, resample_patch_embed
from flexast.model.pos_embed import resample_grid_pos_embed, resize_table
from flexast.pipeline.errors import ConfigError
from flexast.pipeline.resolution import ResolutionPolicy


@dataclass
class Phase:
    """One stretch of training with a fixed data/patch geometry."""

    name: str
    kind: str  # the recipe trained inside: ast | flexiast | elasticast
    patches: list[tuple[int, int]]  # drawn uniformly per step
    resolution: ResolutionPolicy  # per-clip resolution (``random`` with its shifts filled in from the shards)
    max_frames: int
    epochs: float = 0.0
    steps: int = 0  # > 0 wins over epochs
    kernel: tuple[int, int] | None = None  # native patch-embedding kernel size of this phase (c2f Patch)
    transfer: str = "pi"  # how the kernel moves into this phase
    kd: bool = False
    eval_patch: tuple[int, int] = (16, 16)
    meta: dict = field(default_factory=dict)


def _patches(cfg: Config, kind: str) -> list[tuple[int, int]]:
    if kind != "flexiast":
        return [tuple(cfg.recipe.patch)]
    axes = "time" if cfg.recipe.time_only else "both"
    return [patch_of(cfg.model.base_patch, axes, p) for p in cfg.recipe.patch_sizes]


def _base_policy(cfg: Config, stored: list[float]) -> ResolutionPolicy:
    """``data.loader.resolution``; ``random`` without shifts draws from every stored shift, in the index's order."""
    policy = cfg.data.loader.policy()
    if policy.kind == "random" and not policy.shifts_ms:
        policy = replace(policy, shifts_ms=[float(s) for s in stored])
    return _plain(policy)


def _plain(policy: ResolutionPolicy) -> ResolutionPolicy:
    """A policy with one choice at its stored resolution is ``fixed`` (no draw per clip)."""
    (first, *more) = policy.choices() or [None]
    if first is not None and not more and first.pool == 1:
        return ResolutionPolicy("fixed", shift_ms=first.shift_ms)
    return policy


def length_cap(cfg: Config) -> int:
    """Frames a training clip keeps: the loader's ``max_frames``, or ``target_frames`` (classic fixed length)."""
    return int(cfg.data.loader.target_frames or cfg.data.loader.max_frames)


def _single(cfg: Config, kind: str, stored: list[float]) -> Phase:
    eval_patch = tuple(int(v) for v in (cfg.model.base_patch if kind == "flexiast" else cfg.recipe.patch))
    return Phase(
        name=kind,
        kind=kind,
        patches=_patches(cfg, kind),
        resolution=_base_policy(cfg, stored),
        max_frames=length_cap(cfg),
        epochs=cfg.optim.epochs,
        steps=cfg.optim.steps,
        kd=bool(cfg.recipe.kd.teacher),
        eval_patch=eval_patch,
    )


def _c2f_phase(cfg: Config, i: int, ph: PhaseConfig, stored: list[float]) -> Phase:
    inner = _single(cfg, ph.recipe, stored)
    r = int(ph.factor)
    p_f, p_t = (int(v) for v in cfg.recipe.patch)
    inner.name = f"phase{i + 1}:{ph.method}x{r}"
    inner.epochs, inner.steps = ph.epochs, ph.steps
    inner.transfer = ph.transfer
    inner.meta = {"method": ph.method, "factor": r}
    if ph.method in ("fshift", "pool") and r > 1:
        inner.max_frames = max(1, length_cap(cfg) // r)
    if ph.method == "fshift":
        shift = float(cfg.data.loader.policy().shift_ms * r)
        if stored and shift not in stored:
            raise ConfigError(
                f"recipe.phases[{i}]: fshift x{r} needs frame shift {shift:g} ms in the shards (stored: {stored})"
            )
        inner.resolution = ResolutionPolicy("fixed", shift_ms=shift)
    elif ph.method == "pool":
        base = float(cfg.data.loader.policy().shift_ms)
        inner.resolution = _plain(ResolutionPolicy("pool", shift_ms=base, pool_factors=[r], pool_mode=ph.pool_mode))
    elif ph.method == "patch":
        inner.patches = [(p_f, p_t * r)]
        inner.kernel = (p_f, p_t * r)
        inner.eval_patch = (p_f, p_t * r)
    return inner


def plan_phases(cfg: Config, stored_shifts: list[float]) -> list[Phase]:
    """The phases of ``cfg``'s recipe; ``stored_shifts`` are the frame shifts the shards hold."""
    name = cfg.recipe.name
    if name in ("ast", "flexiast", "elasticast"):
        return [_single(cfg, name, stored_shifts)]
    if name == "coarse_to_fine":
        phases = [_c2f_phase(cfg, i, ph, stored_shifts) for i, ph in enumerate(cfg.recipe.phases)]
        # The final kernel is the recipe patch unless the last phase says otherwise.
        for ph in phases:
            if ph.kernel is None:
                ph.kernel = tuple(int(v) for v in cfg.recipe.patch)
        return phases
    raise ConfigError(f"recipe.name: unknown recipe {name!r}")


# --------------------------------------------------------------------------------------------------
# The model at each phase's geometry


def phase_kernel(cfg: Config, phase=None) -> tuple[int, int]:
    """Native kernel size: the phase's (coarse-to-fine), the fixed patch (ast/elasticast) or the base (flexiast)."""
    if phase is not None and phase.kernel is not None:
        return tuple(phase.kernel)
    kind = phase.kind if phase is not None else cfg.recipe.name
    if kind == "flexiast":
        return tuple(int(v) for v in cfg.model.base_patch)
    return tuple(int(v) for v in cfg.recipe.patch)


def model_config(cfg: Config, n_classes: int, n_mels: int, phase=None) -> ModelConfig:
    """The :class:`ModelConfig` of a run (at a phase's geometry when given)."""
    m = cfg.model
    kernel = phase_kernel(cfg, phase)
    max_frames = cfg.data.loader.target_frames or (phase.max_frames if phase is not None else length_cap(cfg))
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
        "pos_embed": m.pos_embed,
        "pool": m.pool,
        "drop_path": m.drop_path,
        "token_dropout": m.token_dropout,
        "attention": cfg.run.attention,
    }
    if m.preset == "custom":
        return ModelConfig(embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, **over)
    extra = {k: v for k, v in (("embed_dim", m.embed_dim), ("depth", m.depth), ("num_heads", m.num_heads)) if v}
    return ModelConfig.preset(m.preset, **over, **extra)


@torch.no_grad()
def transfer(src: ASTModel, dst: ASTModel, method: str = "pi") -> list[str]:
    """Copy ``src``'s weights into ``dst``, resizing the patch kernel and positional tables to ``dst``'s grid.

    Each layer resizes its own weight (:func:`model.patch_embed.resample_patch_embed`,
    :func:`model.pos_embed.resample_grid_pos_embed`, :func:`model.pos_embed.resize_table`).

    Returns:
        Names of ``dst`` tensors left at their initialisation (no counterpart of a relatable shape).
    """
    src_state = src.state_dict()
    out = dst.state_dict()
    skipped = []
    for name, value in out.items():
        old = src_state.get(name)
        if old is None:
            skipped.append(name)
        elif old.shape == value.shape:
            out[name] = old.clone()
        elif name == "patch_embed.proj.weight":
            out[name] = resample_patch_embed(src.patch_embed, tuple(value.shape[-2:]), method)  # (D, 1, p_f, p_t)
        elif name == "pos_embed.weight":
            out[name] = resample_grid_pos_embed(src.pos_embed, dst.pos_embed)  # (1, P + H'·W', D)
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


def move_to_phase(model: ASTModel, phase, cfg: Config) -> ASTModel:
    """``model`` rebuilt at ``phase``'s kernel and grid (the same object when nothing changes)."""
    c = model.config
    new = model_config(cfg, c.num_classes, c.n_mels, phase)
    if (new.base_patch, new.max_frames, new.fstride, new.tstride) == (c.base_patch, c.max_frames, c.fstride, c.tstride):
        return model
    dst = ASTModel(new).to(next(model.parameters()).device)
    transfer(model, dst, phase.transfer)
    return dst
