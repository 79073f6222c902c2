"""One config schema for every training recipe: dataclasses loaded from YAML, validated all at once.

Sections: ``run`` (where and how), ``data`` (shards, and the loader's own config: resolution, length,
augmentation, token budget),
``model`` (size, patch, positions, pooling), ``recipe`` (ast | flexiast | elasticast | coarse_to_fine),
``optim`` (optimizer, schedule, steps) and ``eval`` (what to measure while training).

Loading (through :mod:`pipeline.config_schema`, the engine every config uses) collects every problem
(unknown keys, wrong types, bad values) with its dotted key path and raises one :class:`ConfigError`
listing them all. ``--set a.b=value`` overrides are coerced to the field's declared type (``optim.lr=1e-4``
becomes a float even though YAML 1.1 reads it as a string).

Units: lengths in frames, frame shifts in milliseconds, learning rates per optimizer step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from flexast.pipeline.config_schema import apply_override, build, parse_overrides, raise_all, revalidate
from flexast.pipeline.errors import ConfigError
from flexast.pipeline.stream_config import StreamConfig


@dataclass
class RunConfig:
    """Where outputs go and how the run is executed."""

    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False
    threads: int = 0  # torch intra-op threads (0: torch's default); 1 is fastest for tiny models on few cores
    log_every: int = 10
    ckpt_every: int = 0  # steps between checkpoints; 0: only at the end of each epoch/phase
    keep_last: int = 3  # step checkpoints kept (epoch checkpoints are kept for weight averaging)
    progress: bool = True
    tensorboard: bool = True
    attention: str = "auto"  # backend override passed to the model
    find_unused: bool = False  # DDP find_unused_parameters (needed only if some parameters get no gradient)


def _run_loader_defaults() -> StreamConfig:
    """The loader options a run starts from (the rest are :class:`StreamConfig`'s own defaults)."""
    return StreamConfig(pack_buffer=64, shuffle_buffer=256, max_frames=1024)


@dataclass
class DataConfig:
    """Where the shards are, and the loader's options by the loader's own names.

    ``loader`` is :class:`pipeline.stream_config.StreamConfig` (see docs/streaming.md): ``budget_tokens``,
    ``mode``/``row_len``, ``label_mode`` (``multi_hot`` → BCE, ``index`` → CE), ``resolution`` (a
    :class:`pipeline.resolution.ResolutionPolicy` as a mapping: ``kind`` fixed/random/pool, ``shift_ms``,
    ``shifts_ms``, ``pool_factors``, ``pool_mode``), ``max_frames`` or ``target_frames`` (the classic fixed-length
    AST input), ``freq_mask``/``time_mask``, ``mixup_prob``/``mixup_alpha``, ``balanced``,
    ``norm_mean``/``norm_std``, ``pack_buffer``, ``shuffle_buffer``, ``num_workers``, ... Each phase of a recipe
    sets ``patches``, ``seed``, and (coarse-to-fine) its own ``resolution`` and length cap on a copy.
    """

    train: str = ""  # index.json, folder, glob, brace pattern or URL of training shards
    valid: str = ""  # same for the held-out set ('' = no evaluation during training)
    source: Literal["memory", "stream"] = "memory"  # memory: read once (small sets); stream: read on the fly
    eval_max_frames: int = 0  # cap for held-out clips (0: the training cap); cut only, never padded
    loader: StreamConfig = field(default_factory=_run_loader_defaults)


@dataclass
class ModelSection:
    """The ``model`` section: a preset plus the :class:`model.ast.ModelConfig` fields a run chooses, by their names.

    The other ModelConfig fields follow from the rest of the run: ``num_classes`` and ``n_mels`` from the
    training data, ``max_frames`` from ``data``, the kernel from the recipe (``base_patch`` for flexiast,
    ``recipe.patch`` otherwise), ``patch_resize`` / ``resize_axes`` from ``recipe``, ``attention`` from ``run``.
    """

    preset: str = "tiny"  # tiny | small | base | custom (then embed_dim/depth/num_heads are used)
    embed_dim: int = 0  # 0 = preset value
    depth: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0
    n_mels: int = 128
    base_patch: list[int] = field(default_factory=lambda: [16, 16])  # (p_f, p_t) of the stored kernel
    pos_embed: Literal["grid", "factorized"] = "grid"  # AST 2D table, or ElasticAST's freq + time tables
    pool: Literal["cls", "cls_dist", "attn", "mean"] = "cls"  # attn: ElasticAST's attention pooling
    token_dropout: float = 0.0  # fraction of tokens dropped per clip in training (ElasticAST: 0.1)
    drop_path: float = 0.0
    fstride: int = 0  # padded AST input: overlap strides (0 = patch size, no overlap; AST: 10)
    tstride: int = 0
    init: str = ""  # checkpoint to start from ('' = random)
    init_format: Literal["flexast", "official", "hf"] = "flexast"


@dataclass
class KDConfig:
    teacher: str = ""  # flexast checkpoint directory of a frozen teacher ('' = supervised)
    temperature: float = 1.0
    alpha: float = 1.0  # weight of the KL term; the label loss gets 1 - alpha
    teacher_patch: list[int] = field(default_factory=list)  # [] = the teacher's own base patch


@dataclass
class PhaseConfig:
    """One coarse-to-fine phase: a temporal compression by ``factor`` and how long to train."""

    method: Literal["fshift", "pool", "patch", "none"] = "none"
    factor: int = 1  # R
    pool_mode: Literal["avg", "max"] = "avg"
    transfer: Literal["pi", "bilinear"] = "pi"  # Patch method: how weights move to the next phase's kernel
    epochs: float = 0.0
    steps: int = 0  # used when epochs == 0
    recipe: Literal["ast", "flexiast", "elasticast"] = "ast"  # what trains inside the phase


@dataclass
class RecipeConfig:
    name: Literal["ast", "flexiast", "elasticast", "coarse_to_fine"] = "ast"
    patch: list[int] = field(default_factory=lambda: [16, 16])  # fixed patch (ast, elasticast)
    patch_sizes: list[int] = field(default_factory=lambda: [8, 10, 12, 16, 20, 24, 30, 32, 40, 48])
    time_only: bool = False  # flexiast: patches (p_f_fixed, p) (VoxCeleb); else the base's shape at width p
    resize: Literal["pi", "bilinear"] = "pi"
    kd: KDConfig = field(default_factory=KDConfig)
    phases: list[PhaseConfig] = field(default_factory=list)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    weight_decay: float = 5e-7
    loss: Literal["auto", "bce", "ce"] = "auto"  # auto: bce for multi labels, ce for single
    schedule: Literal["step", "cosine", "constant"] = "step"
    warmup_steps: int = 1000
    decay_start_epoch: int = 2  # step schedule: first epoch (0-based) at the decayed lr
    decay_every: int = 1
    decay_factor: float = 0.5
    min_lr: float = 0.0
    epochs: float = 5.0
    steps: int = 0  # >0 overrides epochs
    steps_per_epoch: int = 0  # 0 = measured by one pass over the loader plan / index counts
    grad_accum_tokens: int = 0  # accumulate micro-steps until this many tokens (0 = one micro-step)
    grad_clip: float = 0.0
    ema: float = 0.0  # >0: keep an EMA of the weights with this decay
    average: list[int] = field(default_factory=list)  # [a, b]: average epoch checkpoints a..b at the end


@dataclass
class EvalConfig:
    every: int = 0  # steps between held-out evaluations (0 = end of each epoch)
    patch_sizes: list[int] = field(default_factory=list)  # [] = the training patch only
    max_clips: int = 0  # 0 = the whole held-out set


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------------
# Loading: the one config engine (:mod:`pipeline.config_schema`) plus the run config's cross-field checks


def _validate(cfg: Config, errors: list[str]) -> None:
    """Cross-field checks; every failure is appended, none raised early."""

    def positive(path: str, value, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            errors.append(f"{path}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

    positive("optim.lr", cfg.optim.lr)
    if cfg.data.loader.max_frames is not None:
        positive("data.loader.max_frames", cfg.data.loader.max_frames)
    positive("optim.warmup_steps", cfg.optim.warmup_steps, allow_zero=True)
    positive("optim.steps", cfg.optim.steps, allow_zero=True)
    positive("optim.epochs", cfg.optim.epochs, allow_zero=True)
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        errors.append(f"optim.betas: expected two numbers in [0, 1), got {cfg.optim.betas!r}")
    if cfg.optim.average and (len(cfg.optim.average) != 2 or cfg.optim.average[0] > cfg.optim.average[1]):
        errors.append(f"optim.average: expected [first_epoch, last_epoch], got {cfg.optim.average!r}")
    if not 0.0 <= cfg.optim.ema < 1.0:
        errors.append(f"optim.ema: must be in [0, 1), got {cfg.optim.ema!r}")
    if not 0.0 <= cfg.model.token_dropout < 1.0:
        errors.append(f"model.token_dropout: must be in [0, 1), got {cfg.model.token_dropout!r}")
    for key in ("base_patch",):
        value = getattr(cfg.model, key)
        if len(value) != 2 or min(value, default=0) <= 0:
            errors.append(f"model.{key}: expected [p_f, p_t] > 0, got {value!r}")
    if len(cfg.recipe.patch) != 2 or min(cfg.recipe.patch, default=0) <= 0:
        errors.append(f"recipe.patch: expected [p_f, p_t] > 0, got {cfg.recipe.patch!r}")
    if cfg.recipe.name == "flexiast" and not cfg.recipe.patch_sizes:
        errors.append("recipe.patch_sizes: flexiast needs at least one patch size")
    if any(p <= 0 for p in cfg.recipe.patch_sizes):
        errors.append(f"recipe.patch_sizes: sizes must be > 0, got {cfg.recipe.patch_sizes!r}")
    if cfg.recipe.name == "coarse_to_fine":
        if not cfg.recipe.phases:
            errors.append("recipe.phases: coarse_to_fine needs at least one phase")
        for i, ph in enumerate(cfg.recipe.phases):
            if ph.factor < 1:
                errors.append(f"recipe.phases[{i}].factor: must be >= 1, got {ph.factor}")
            if ph.epochs <= 0 and ph.steps <= 0:
                errors.append(f"recipe.phases[{i}]: give epochs > 0 or steps > 0")
    elif cfg.recipe.phases:
        errors.append(f"recipe.phases: only used by coarse_to_fine, but recipe.name is {cfg.recipe.name!r}")
    if cfg.recipe.kd.teacher and cfg.recipe.kd.temperature <= 0:
        errors.append(f"recipe.kd.temperature: must be > 0, got {cfg.recipe.kd.temperature}")


def from_dict(raw: dict | None, overrides: list[str] | None = None, source: str = "<dict>") -> Config:
    """A validated :class:`Config` from a plain mapping plus ``key=value`` overrides.

    Raises:
        ConfigError: listing every unknown key, wrong type and bad value at once, with dotted paths.
    """
    errors: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    cfg = build(Config, raw, "", errors)
    for path, text in parse_overrides(overrides or []):
        apply_override(cfg, path, text, errors)
    revalidate(cfg, "", errors)
    checks: list[str] = []
    _validate(cfg, checks)
    bad_keys = {e.split(":", 1)[0].removeprefix("--set ") for e in errors}  # a value already refused: say it once
    errors += [e for e in checks if e.split(":", 1)[0] not in bad_keys]
    raise_all(errors, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (safe loader only) and validate it; see :func:`from_dict`.

    ``path`` is a file, or the name of a built-in recipe (``demo``): see :mod:`model.recipes_registry`.
    """
    from flexast.model.recipes_registry import resolve_config

    path = resolve_config(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return from_dict(raw, overrides, source=str(path))


def to_dict(cfg: Config) -> dict:
    """The config as plain data (what is saved next to checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
