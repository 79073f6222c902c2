"""Foreign checkpoints to :class:`model.ast.ASTModel`: HF transformers AST, the official AST, timm DeiT/ViT.

Notation: ``D`` width, ``(H, W)`` positional grid in (frequency, time) patches, ``P`` prefix tokens.

Every converter renames keys, splits or fuses tensors where layouts differ, and checks that every source
key was used and every model key was filled: a leftover or missing key raises :class:`ConversionError`
naming the keys. Loading the files themselves: :func:`model.checkpoint.load_state_dict` (safetensors, or
``torch.load(weights_only=True)``).

* HF ``ASTForAudioClassification`` / ``ASTModel``: transformers 4.x names
  (``audio_spectrogram_transformer.encoder.layer.N.attention.attention.query``, ``...attention.output.dense``,
  ``...intermediate.dense``, ``...output.dense``) and 5.x names (``...layers.N.attention.q_proj``, ``o_proj``,
  ``mlp.fc1``, ``mlp.fc2``). Separate q/k/v become our fused ``qkv``.
* Official AST (YuanGongND/ast): ``module.v.*`` (timm DeiT names) and ``module.mlp_head.{0,1}``.
* timm DeiT/ViT (ImageNet init, as AST): RGB kernels averaged (or summed, as the AST code does) into one
  channel, positional grid adapted by AST's cut-centre-else-interpolate rule, head left freshly initialised.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from flexast.model.ast import ASTModel, ModelConfig
from flexast.model.errors import ConversionError
from flexast.model.patch_embed import pi_resize_matrix
from flexast.model.pos_embed import adapt_grid_ast, adapt_table_ast

_HF_PREFIX = "audio_spectrogram_transformer."

# HF name (after the layer index) -> our name (after ``encoder.blocks.N.``); both transformers layouts.
_HF_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "output.dense": "mlp.fc2",
}
_HF_QKV = {
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed.weight",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "encoder.norm.weight",
    "layernorm.bias": "encoder.norm.bias",
    "classifier.layernorm.weight": "head.norm.weight",
    "classifier.layernorm.bias": "head.norm.bias",
    "classifier.dense.weight": "head.fc.weight",
    "classifier.dense.bias": "head.fc.bias",
}
_HF_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def config_from_hf(hf_config, num_classes: int | None = None) -> ModelConfig:
    """A :class:`ModelConfig` equivalent to an HF ``ASTConfig`` (object or its ``config.json`` dict)."""
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda k, d=None: getattr(hf_config, k, d)
    if get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"HF AST config has hidden_act={get('hidden_act')!r}; only 'gelu' is supported")
    if num_classes is None:
        labels = get("id2label") or {}
        num_classes = len(labels) if labels else int(get("num_labels", 2))
    hidden, patch = int(get("hidden_size", 768)), int(get("patch_size", 16))
    return ModelConfig(
        num_classes=num_classes,
        n_mels=int(get("num_mel_bins", 128)),
        max_frames=int(get("max_length", 1024)),
        embed_dim=hidden,
        depth=int(get("num_hidden_layers", 12)),
        num_heads=int(get("num_attention_heads", 12)),
        mlp_ratio=int(get("intermediate_size", 3072)) / hidden,
        qkv_bias=bool(get("qkv_bias", True)),
        norm_eps=float(get("layer_norm_eps", 1e-12)),
        base_patch=(patch, patch),
        fstride=int(get("frequency_stride", 10)),
        tstride=int(get("time_stride", 10)),
        pool="cls_dist",
    )


def _load_checked(model: ASTModel, state: dict[str, torch.Tensor], source: str, allow_missing=()) -> ASTModel:
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith(tuple(allow_missing)))
    unexpected = sorted(k for k in state if k not in own)
    bad = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or bad:
        first = (
            f"first missing key {missing[0]!r}"
            if missing
            else f"first unexpected key {unexpected[0]!r}"
            if unexpected
            else f"first shape mismatch {bad[0]}"
        )
        raise ConversionError(
            f"{source} state dict does not fit the model: {first}; "
            f"missing={missing}, unexpected={unexpected}, shapes={bad}"
        )
    model.load_state_dict(state, strict=False)
    return model


def _infer_hf_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """An HF AST config guessed from weights alone: HF defaults (128 bins, strides 10, eps 1e-12, D/64 heads)."""
    sd = {(k[len(_HF_PREFIX) :] if k.startswith(_HF_PREFIX) else k): v for k, v in state_dict.items()}
    pos, kernel = sd["embeddings.position_embeddings"], sd["embeddings.patch_embeddings.projection.weight"]
    d, patch = pos.shape[-1], kernel.shape[-1]
    layers = {int(m.group(1)) for k in sd if (m := _HF_LAYER_RE.match(k))}
    fc1 = next(v for k, v in sd.items() if k.endswith(("0.mlp.fc1.weight", "0.intermediate.dense.weight")))
    f_dim = (128 - patch) // 10 + 1
    t_dim = (pos.shape[1] - 2) // f_dim
    n_cls = sd["classifier.dense.weight"].shape[0] if "classifier.dense.weight" in sd else 527
    return config_from_hf(
        {
            "hidden_size": d,
            "num_hidden_layers": max(layers) + 1,
            "num_attention_heads": max(1, d // 64),
            "intermediate_size": fc1.shape[0],
            "patch_size": patch,
            "max_length": (t_dim - 1) * 10 + patch,
            "num_labels": n_cls,
        },
        n_cls,
    )


def from_hf(state_dict: Mapping[str, torch.Tensor], config=None) -> ASTModel:
    """Our model from an HF ``ASTForAudioClassification`` (or bare ``ASTModel``) state dict.

    Args:
        state_dict: transformers 4.x or 5.x key names, with or without the ``audio_spectrogram_transformer.``
            prefix. Without ``classifier.*`` keys (a bare ``ASTModel``) the head stays freshly initialised.
        config: a :class:`ModelConfig`, or the HF ``ASTConfig`` / its ``config.json`` dict. None guesses it from
            the weights with HF's defaults (128 bins, strides 10, ``layer_norm_eps`` 1e-12, ``D // 64`` heads):
            right for the published MIT checkpoints, but pass the downloaded ``config.json`` when you have it.

    Returns:
        An :class:`ASTModel` whose ``forward_padded`` gives the HF logits (``pool="cls_dist"``).
    """
    if config is None:
        config = _infer_hf_config(state_dict)
    elif not isinstance(config, ModelConfig):
        n_cls = state_dict["classifier.dense.weight"].shape[0] if "classifier.dense.weight" in state_dict else None
        config = config_from_hf(config, n_cls)
    state: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], list] = {}
    leftover = []
    for key, value in state_dict.items():
        k = key[len(_HF_PREFIX) :] if key.startswith(_HF_PREFIX) else key
        if k in _HF_TOP:
            state[_HF_TOP[k]] = value
            continue
        m = _HF_LAYER_RE.match(k)
        if m is None:
            leftover.append(key)
            continue
        i, name, kind = int(m.group(1)), m.group(2), m.group(3)
        if name in _HF_QKV:
            qkv.setdefault((i, kind), [None, None, None])[_HF_QKV[name]] = value
        elif name in _HF_LAYER:
            state[f"encoder.blocks.{i}.{_HF_LAYER[name]}.{kind}"] = value
        else:
            leftover.append(key)
    if leftover:
        raise ConversionError(f"HF AST keys not understood (first unexpected key {leftover[0]!r}): {leftover}")
    for (i, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise ConversionError(f"HF AST layer {i}: incomplete q/k/v {kind} (have {[p is not None for p in parts]})")
        state[f"encoder.blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)  # (3D,) or (3D, D)
    model = ASTModel(config)
    return _load_checked(model, state, "HF AST", allow_missing=("head.",) if "head.fc.weight" not in state else ())


def deit_config(state: Mapping[str, torch.Tensor], prefix: str, **fields) -> ModelConfig:
    """A :class:`ModelConfig` with the encoder geometry of a DeiT/ViT state dict whose encoder keys start with
    ``prefix`` (``"v."`` in official AST files, ``""`` in timm's): width, depth, MLP ratio, qkv bias, DeiT's
    LayerNorm eps and ``D // 64`` heads; ``fields`` set the rest (classes, input, patch, strides, pooling)."""
    d = state[f"{prefix}cls_token"].shape[-1]
    depth = 1 + max(int(k[len(prefix) :].split(".")[1]) for k in state if k.startswith(f"{prefix}blocks."))
    geometry = {
        "embed_dim": d,
        "depth": depth,
        "num_heads": max(1, d // 64),
        "mlp_ratio": state[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0] / d,
        "qkv_bias": f"{prefix}blocks.0.attn.qkv.bias" in state,
        "norm_eps": 1e-6,
    }
    return ModelConfig(**{**geometry, **fields})


def _official_grid(n_pos: int, n_mels: int, patch: int, fstride: int) -> tuple[int, int]:
    f_dim = (n_mels - patch) // fstride + 1
    if n_pos % f_dim:
        raise ConversionError(f"official AST pos_embed has {n_pos} grid rows, not a multiple of f_dim={f_dim}")
    return f_dim, n_pos // f_dim


def from_official_ast(
    state_dict: Mapping[str, torch.Tensor],
    fstride: int = 10,
    tstride: int = 10,
    input_tdim: int = 1024,
    n_mels: int = 128,
    num_heads: int | None = None,
    source_fstride: int | None = None,
) -> ASTModel:
    """Our model from an official AST checkpoint (``module.v.*``, ``module.mlp_head.{0,1}``).

    The unused DeiT ImageNet heads the official files carry (``module.v.head*``) are dropped.

    The stored positional grid (``(n_mels - 16) // source_fstride + 1`` rows) is adapted to the grid of
    ``(fstride, tstride, input_tdim)`` by AST's own rule, as the official model does when built with a
    different ``input_tdim``.

    Args:
        state_dict: the ``.pth`` contents (``torch.load(path, weights_only=True)``), with or without ``module.``.
        fstride: frequency stride (AST: 10).
        tstride: time stride (AST: 10).
        input_tdim: input frames (AudioSet 1024, ESC-50 512, Speech Commands 128).
        n_mels: mel bins (128).
        num_heads: heads; None means ``D // 64`` (DeiT tiny/small/base: 3/6/12).
        source_fstride: stride the checkpoint was trained with; None means ``fstride``.
    """
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    if "v.pos_embed" not in sd:
        raise ConversionError(f"not an official AST state dict (no 'module.v.pos_embed'); keys start {list(sd)[:5]}")
    d = sd["v.pos_embed"].shape[-1]
    patch = sd["v.patch_embed.proj.weight"].shape[-1]
    config = deit_config(
        sd,
        "v.",
        num_classes=sd["mlp_head.1.weight"].shape[0],
        n_mels=n_mels,
        max_frames=input_tdim,
        num_heads=num_heads or max(1, d // 64),
        base_patch=(patch, patch),
        fstride=fstride,
        tstride=tstride,
        pool="cls_dist",
    )
    pos = sd.pop("v.pos_embed")[0]  # (2 + H·W, D)
    h, w = _official_grid(pos.shape[0] - 2, n_mels, patch, source_fstride or fstride)
    grid = pos[2:].T.reshape(d, h, w)  # (D, H, W)
    grid = adapt_grid_ast(grid, config.grid).flatten(1).T  # (H'·W', D)
    state = {"pos_embed.weight": torch.cat([pos[:2], grid], 0)[None]}  # (1, 2 + H'·W', D)
    for k, v in sd.items():
        if k.startswith(("v.head.", "v.head_dist.")):
            continue  # timm DeiT's ImageNet heads: kept in the official checkpoints, unused by AST's forward
        if k.startswith("v.blocks.") or k.startswith("v.norm."):
            state["encoder." + k[2:]] = v
        elif k.startswith("v."):
            state[k[2:]] = v
        elif k.startswith("mlp_head.0."):
            state["head.norm." + k.split(".")[-1]] = v
        elif k.startswith("mlp_head.1."):
            state["head.fc." + k.split(".")[-1]] = v
        else:
            state[k] = v  # reported as unexpected below
    return _load_checked(ASTModel(config), state, "official AST")


def to_official_ast(model: ASTModel) -> dict[str, torch.Tensor]:
    """The official AST layout (``module.v.*``, ``module.mlp_head.*``) of a grid/``cls_dist`` model."""
    c = model.config
    if c.pos_embed != "grid" or c.pool != "cls_dist":
        raise ConversionError(
            f"official AST layout needs pos_embed='grid', pool='cls_dist'; got {c.pos_embed!r}, {c.pool!r}"
        )
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            out["module.v." + k[len("encoder.") :]] = v
        elif k == "pos_embed.weight":
            out["module.v.pos_embed"] = v
        elif k.startswith("head.norm."):
            out["module.mlp_head.0." + k.split(".")[-1]] = v
        elif k.startswith("head.fc."):
            out["module.mlp_head.1." + k.split(".")[-1]] = v
        else:
            out["module.v." + k] = v
    return out


_HF4_LAYER = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense"}
_HF4_LAYER.update({"mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"})
_HF4_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_HF_TOP_INV = {ours: theirs for theirs, ours in _HF_TOP.items()}
_BLOCK_RE = re.compile(r"^encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$")


def to_hf(model: ASTModel) -> dict[str, torch.Tensor]:
    """The HF ``ASTForAudioClassification`` state dict (transformers 4.x names) of a grid/``cls_dist`` model.

    The 4.x names load in transformers 4.x and 5.x alike (5.x renames them on load); :func:`from_hf` reads
    both back. The fused ``qkv`` is split into query/key/value. The model's own patch and strides become the
    HF ``patch_size``/``frequency_stride``/``time_stride``: a square base patch is required.
    """
    c = model.config
    if c.pos_embed != "grid" or c.pool != "cls_dist" or c.base_patch[0] != c.base_patch[1]:
        raise ConversionError(
            "HF AST layout needs pos_embed='grid', pool='cls_dist' and a square patch; "
            f"got {c.pos_embed!r}, {c.pool!r}, {c.base_patch}"
        )
    out = {}
    for k, v in model.state_dict().items():
        if k in _HF_TOP_INV:
            name = _HF_TOP_INV[k]
            out[name if name.startswith("classifier.") else _HF_PREFIX + name] = v
            continue
        m = _BLOCK_RE.match(k)
        if m is None:
            raise ConversionError(f"no HF AST name for parameter {k!r}")
        i, name, kind = m.groups()
        layer = f"{_HF_PREFIX}encoder.layer.{i}."
        if name == "attn.qkv":
            for part, hf_name in zip(v.chunk(3, 0), _HF4_QKV, strict=True):  # 3 × (D,) or (D, D)
                out[f"{layer}{hf_name}.{kind}"] = part.contiguous()
        elif name in _HF4_LAYER:
            out[f"{layer}{_HF4_LAYER[name]}.{kind}"] = v
        else:
            raise ConversionError(f"no HF AST name for parameter {k!r}")
    return out


def from_timm(state_dict: Mapping[str, torch.Tensor], config: ModelConfig, rgb: str = "mean") -> ASTModel:
    """AST's ImageNet initialisation from a timm DeiT/ViT state dict (encoder, tokens, positions, kernel).

    Args:
        state_dict: timm names (``patch_embed.proj.weight`` ``(D, 3, p, p)``, ``cls_token``, optional
            ``dist_token``, ``pos_embed`` ``(1, P + G·G, D)``, ``blocks.*``, ``norm.*``); heads are ignored.
        config: the target model; its width, depth and MLP ratio must match the checkpoint.
        rgb: ``mean`` (average the RGB kernels) or ``sum`` (what the official AST code does).

    Returns:
        The model with a fresh classifier head (and fresh attention pooling, if ``pool="attn"``). A missing
        [DIST] token (plain ViT) is copied from [CLS]. The grid is adapted to ``config.grid`` (``grid``) or
        averaged along each axis into freq/time tables (``factorized``, as ElasticAST), cut-centre-else-
        interpolate either way. A kernel of another size is PI-resized to ``config.base_patch``.
    """
    if rgb not in ("mean", "sum"):
        raise ConversionError(f"rgb must be 'mean' or 'sum', got {rgb!r}")
    d = config.embed_dim
    kernel = state_dict["patch_embed.proj.weight"]  # (D, 3, p, p)
    kernel = kernel.mean(1, keepdim=True) if rgb == "mean" else kernel.sum(1, keepdim=True)  # (D, 1, p, p)
    if tuple(kernel.shape[-2:]) != config.base_patch:
        m = pi_resize_matrix(tuple(kernel.shape[-2:]), config.base_patch).to(kernel.dtype)  # (n_new, n_old)
        kernel = (kernel.reshape(d, -1) @ m.T).reshape(d, 1, *config.base_patch)
    state = {"patch_embed.proj.weight": kernel, "patch_embed.proj.bias": state_dict["patch_embed.proj.bias"]}
    cls = state_dict["cls_token"]  # (1, 1, D)
    dist = state_dict.get("dist_token", cls)
    tokens = [cls, dist][: config.n_prefix]
    for name, t in zip(("cls_token", "dist_token"), tokens, strict=False):
        state[name] = t
    pos = state_dict["pos_embed"][0]  # (P_src + G·G, D)
    n_src = 1 + ("dist_token" in state_dict)
    if math.isqrt(pos.shape[0] - n_src) ** 2 != pos.shape[0] - n_src:
        n_src = 0 if math.isqrt(pos.shape[0]) ** 2 == pos.shape[0] else n_src
    g = math.isqrt(pos.shape[0] - n_src)
    if g * g != pos.shape[0] - n_src:
        raise ConversionError(f"timm pos_embed with {pos.shape[0]} rows is not prefix + square grid")
    prefix_src = pos[:n_src] if n_src else pos.new_zeros(1, d)
    prefix = (
        torch.stack([prefix_src[min(i, len(prefix_src) - 1)] for i in range(config.n_prefix)])
        if config.n_prefix
        else None
    )
    grid = pos[n_src:].T.reshape(d, g, g)  # (D, G, G)
    if config.pos_embed == "grid":
        grid = adapt_grid_ast(grid, config.grid).flatten(1).T  # (H·W, D)
        state["pos_embed.weight"] = (grid if prefix is None else torch.cat([prefix, grid], 0))[None]
    else:
        state["pos_embed.freq"] = adapt_table_ast(grid.mean(2).T, config.grid[0])  # (H, D)
        state["pos_embed.time"] = adapt_table_ast(grid.mean(1).T, config.grid[1])  # (W, D)
        if prefix is not None:
            state["pos_embed.prefix_pos"] = prefix
    for k, v in state_dict.items():
        if k.startswith("blocks.") or k.startswith("norm."):
            state["encoder." + k] = v
    model = ASTModel(config)
    return _load_checked(model, state, "timm", allow_missing=("head.",))
