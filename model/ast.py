"""The flexible Audio Spectrogram Transformer: one encoder, two entry points (packed and classic padded).

Notation:
    N clips; T frames (at the clip's frame shift); F mel bins; (p_f, p_t) patch; D width; C classes
    L tokens of all clips, concatenated; P prefix tokens per clip ([CLS], [DIST]: 2 for AST, 0 for ElasticAST)

Entry points (``forward`` dispatches on the input type):

* ``forward_packed(batch: PackedBatch, patch=None)``: variable-length clips, non-overlapping patches at the
  batch's patch size, PI-resized kernel, per-token positions, block-diagonal attention.
* ``forward_padded(x: (B, T, F), fstride=None, tstride=None)``: the classic AST interface with overlapping
  patches (``fstride``/``tstride``), which reproduces AST and HF ``ASTForAudioClassification`` exactly.

Both return logits ``(N, C)``, or ``(logits, embeddings)`` with ``embeddings`` the pooled ``(N, D)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from flexast.model.attention import BACKENDS, Segments, host_to_device, resolve_backend
from flexast.model.encoder import PRESETS, Encoder, TokenDropout
from flexast.model.errors import ModelConfigError, ShapeError
from flexast.model.heads import POOLS, ClassifierHead, build_pool, prefix_tokens
from flexast.model.patch_embed import RESIZE_MODES, FlexiPatchEmbed
from flexast.model.pos_embed import FactorizedPosEmbed, GridPosEmbed
from flexast.pipeline.batch import PackedBatch, token_count
from flexast.pipeline.config_schema import from_mapping


@dataclass
class ModelConfig:
    """Everything needed to rebuild an :class:`ASTModel`; saved as JSON next to every checkpoint.

    Attributes:
        num_classes: output classes ``C``.
        n_mels: mel bins ``F`` the model expects.
        max_frames: frames the positional table covers (AST's ``input_tdim``; 1024 for AudioSet).
        embed_dim: width ``D``.
        depth: encoder blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``D``.
        qkv_bias: bias in the fused ``qkv`` projection.
        norm_eps: LayerNorm epsilon (timm/official AST 1e-6; HF AST 1e-12).
        base_patch: ``(p0_f, p0_t)`` of the stored patch kernel.
        fstride: frequency stride of the classic padded path (AST: 10; non-overlapping: ``p0_f``).
        tstride: time stride of the classic padded path.
        patch_resize: ``pi``, ``bilinear`` or ``none``: how the kernel reaches other patch sizes.
        resize_axes: ``both``, or ``time`` (frequency patch size pinned, FlexiAST's speaker setting).
        pos_embed: ``grid`` (AST 2D table) or ``factorized`` (ElasticAST freq + time tables).
        pool: ``cls``, ``cls_dist`` (AST), ``attn`` (ElasticAST) or ``mean``.
        drop_rate: dropout after positions and inside blocks.
        attn_drop: attention-probability dropout (not available with ``varlen``/``flex``).
        drop_path: stochastic depth rate of the last block (linear in depth).
        token_dropout: fraction of patch tokens dropped per clip in training (ElasticAST: 0.1).
        attention: ``auto`` or one of ``varlen``, ``sdpa_loop``, ``padded``, ``flex``.
    """

    num_classes: int = 527
    n_mels: int = 128
    max_frames: int = 1024
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    base_patch: tuple[int, int] = (16, 16)
    fstride: int = 16
    tstride: int = 16
    patch_resize: str = "pi"
    resize_axes: str = "both"
    pos_embed: str = "grid"
    pool: str = "cls_dist"
    drop_rate: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    token_dropout: float = 0.0
    attention: str = "auto"

    def __post_init__(self) -> None:
        self.base_patch = (int(self.base_patch[0]), int(self.base_patch[1]))
        self.validate()

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """``tiny`` (192/12/3), ``small`` (384/12/6) or ``base`` (768/12/12), with any field overridden."""
        if name not in PRESETS:
            raise ModelConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        dim, depth, heads = PRESETS[name]
        return cls(**{"embed_dim": dim, "depth": depth, "num_heads": heads, **overrides})

    def validate(self) -> None:
        """Raise :class:`ModelConfigError` listing every bad field at once."""
        errs = []
        for name in ("num_classes", "n_mels", "max_frames", "embed_dim", "depth", "num_heads", "fstride", "tstride"):
            if int(getattr(self, name)) <= 0:
                errs.append(f"{name}={getattr(self, name)} must be positive")
        if self.num_heads > 0 and self.embed_dim % self.num_heads:
            errs.append(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if min(self.base_patch) <= 0 or self.base_patch[0] > self.n_mels or self.base_patch[1] > self.max_frames:
            errs.append(f"base_patch={self.base_patch} does not fit n_mels={self.n_mels}, max_frames={self.max_frames}")
        choices = {
            "patch_resize": RESIZE_MODES,
            "resize_axes": ("both", "time"),
            "pos_embed": ("grid", "factorized"),
            "pool": POOLS,
            "attention": ("auto", *BACKENDS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                errs.append(f"{name}={getattr(self, name)!r} not in {allowed}")
        for name in ("drop_rate", "attn_drop", "drop_path", "token_dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                errs.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if errs:
            raise ModelConfigError("bad ModelConfig: " + "; ".join(errs))

    @property
    def n_prefix(self) -> int:
        """Learned tokens in front of each clip (2 for ``cls_dist``, 1 for ``cls``, else 0)."""
        return prefix_tokens(self.pool)

    @property
    def grid(self) -> tuple[int, int]:
        """Stored positional grid ``(H, W)``: the classic path's token grid for ``max_frames`` frames."""
        p_f, p_t = self.base_patch
        return (self.n_mels - p_f) // self.fstride + 1, (self.max_frames - p_t) // self.tstride + 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base_patch"] = list(self.base_patch)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are reported all at once."""
        return from_mapping(cls, d, "ModelConfig keys", ModelConfigError)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


class ASTModel(nn.Module):
    """AST / FlexiAST / ElasticAST in one module; see the module docstring for the two entry points."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, d = config, config.embed_dim
        self.patch_embed = FlexiPatchEmbed(d, c.base_patch, c.patch_resize, c.resize_axes)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if c.n_prefix >= 1 else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if c.n_prefix >= 2 else None
        pos_cls = GridPosEmbed if c.pos_embed == "grid" else FactorizedPosEmbed
        self.pos_embed = pos_cls(d, c.grid, c.n_prefix)
        self.pos_drop = nn.Dropout(c.drop_rate) if c.drop_rate > 0 else nn.Identity()
        self.token_drop = TokenDropout(c.token_dropout)
        self.encoder = Encoder(
            d, c.depth, c.num_heads, c.mlp_ratio, c.qkv_bias, c.norm_eps, c.drop_rate, c.attn_drop, c.drop_path
        )
        self.head = ClassifierHead(build_pool(c.pool, d, c.num_heads), d, c.num_classes, c.norm_eps)
        self._backends: dict[tuple, str] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm ViT init: truncated normal (std 0.02) for linears, tokens and positions; zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.dist_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    # ----------------------------------------------------------------------------------------- backends
    def set_attention_backend(self, name: str) -> None:
        """Override the attention backend (``auto`` re-resolves on the next forward)."""
        self.config.attention = name
        self.config.validate()
        self._backends.clear()

    def attention_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        """The concrete backend for activations on ``device`` in ``dtype``, resolved once and remembered."""
        key = (torch.device(device), dtype)
        if key not in self._backends:
            self._backends[key] = resolve_backend(self.config.attention, device, dtype)
        return self._backends[key]

    def _use_backend(self, x: torch.Tensor) -> None:
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):  # the attention inputs come from a Linear: autocast's dtype
            dtype = torch.get_autocast_dtype(x.device.type)
        backend = self.attention_backend(x.device, dtype)
        self.encoder.set_backend(backend)
        if hasattr(self.head.pool, "backend"):
            self.head.pool.backend = backend

    # ----------------------------------------------------------------------------------------- pieces
    def _residual_dtype(self) -> torch.dtype:
        """The residual stream's dtype: the parameters' (float32 under autocast, where only the branches run in
        bf16/fp16 and each block adds its bf16 branch into the float32 stream)."""
        return self.head.norm.weight.dtype

    def prefix(self) -> torch.Tensor:
        """``(P, D)`` prefix tokens with their positional embeddings."""
        toks = [t[0] for t in (self.cls_token, self.dist_token) if t is not None]
        if not toks:
            return self.pos_embed.prefix()
        return torch.cat(toks, 0) + self.pos_embed.prefix()  # (P, D)

    def _add_prefix(self, x: torch.Tensor, seg: Segments) -> tuple[torch.Tensor, Segments]:
        """Put the ``P`` prefix tokens in front of every clip: ``(L, D)`` → ``(L + N·P, D)``."""
        n_prefix = self.config.n_prefix
        if n_prefix == 0:
            return x, seg
        out_seg = seg.with_prefix(n_prefix)
        ids = seg.segment_ids()  # (L,)
        dest = torch.arange(seg.total, device=x.device) + n_prefix * (ids + 1)  # (L,)
        starts = out_seg.cu[:-1].long()  # (N,)
        dest_prefix = (starts[:, None] + torch.arange(n_prefix, device=x.device)).reshape(-1)  # (N·P,)
        prefix = self.prefix().to(x.dtype).repeat(seg.n, 1)  # (N·P, D)
        out = x.new_zeros(out_seg.total, x.shape[1])
        out = out.index_copy(0, dest, x).index_copy(0, dest_prefix, prefix)  # (L + N·P, D)
        return out, out_seg

    def _encode(self, x: torch.Tensor, seg: Segments, return_embeddings: bool):
        self._use_backend(x)
        x, seg = self.token_drop(x, seg)
        x, seg = self._add_prefix(x, seg)
        x = self.encoder(self.pos_drop(x), seg)  # (L', D)
        logits, emb = self.head(x, seg)  # (N, C), (N, D)
        return (logits, emb) if return_embeddings else logits

    # ----------------------------------------------------------------------------------------- entry points
    def forward(self, x, patch=None, return_embeddings: bool = False, fstride=None, tstride=None):
        """Dispatch: a :class:`PackedBatch` goes to :meth:`forward_packed`, a ``(B, T, F)`` tensor to
        :meth:`forward_padded`."""
        if isinstance(x, PackedBatch):
            return self.forward_packed(x, patch, return_embeddings)
        return self.forward_padded(x, fstride, tstride, patch, return_embeddings)

    def forward_packed(self, batch: PackedBatch, patch=None, return_embeddings: bool = False):
        """Logits ``(N, C)`` for a packed batch (and pooled ``(N, D)`` embeddings if asked).

        Args:
            batch: clips concatenated along time, each a multiple of ``p_t`` frames.
            patch: ``(p_f, p_t)``; None uses ``batch.patch``. Another size is allowed when every clip's frame
                count is a multiple of its ``p_t`` (token counts are then recomputed with ``token_count``).
            return_embeddings: also return the pooled embeddings.
        """
        if batch.n_mels != self.config.n_mels:
            raise ShapeError(f"batch has {batch.n_mels} mel bins, model expects n_mels={self.config.n_mels}")
        frames = batch.frames
        device = frames.device
        if patch is None or tuple(patch) == batch.patch:
            patch = batch.patch
            tok = batch.tokens
            lengths = tok.tolist() if tok.device.type == "cpu" else None
            seg = Segments(host_to_device(batch.cu_seqlens, device), batch.max_tokens, 0, None, lengths)
        else:
            patch = (int(patch[0]), int(patch[1]))
            n_frames = batch.n_frames.detach().cpu()
            if bool((n_frames % patch[1] != 0).any()):
                raise ShapeError(f"batch frame counts {n_frames.tolist()} are not all multiples of p_t={patch[1]}")
            seg = Segments.from_lengths(token_count(n_frames, batch.n_mels, patch), device)
        hf = batch.n_mels // patch[0]
        seg.total = int(token_count(frames.shape[0], batch.n_mels, patch))  # L, every clip's tokens
        x = self.patch_embed.forward_packed(frames, patch).to(self._residual_dtype())  # (L, D)
        x = x + self.pos_embed.forward_packed(seg, hf, self.config.max_frames // patch[1]).to(x.dtype)  # (L, D)
        return self._encode(x, seg, return_embeddings)

    def forward_padded(self, x: torch.Tensor, fstride=None, tstride=None, patch=None, return_embeddings=False):
        """Classic AST forward of a padded ``(B, T, F)`` batch with (possibly overlapping) strided patches.

        With the config's own patch and strides, a ``T`` other than ``max_frames`` adapts the positional grid
        by AST's cut-centre-else-interpolate rule (as AST does for a shorter ``input_tdim``); any other patch or
        stride resizes it bilinearly (FlexiAST).
        """
        c = self.config
        if x.dim() != 3 or x.shape[2] != c.n_mels:
            raise ShapeError(f"padded input must be (B, T, F={c.n_mels}), got {tuple(x.shape)}")
        patch = c.base_patch if patch is None else (int(patch[0]), int(patch[1]))
        stride = (fstride or c.fstride, tstride or c.tstride) if patch == c.base_patch else patch
        stride = (fstride or stride[0], tstride or stride[1])
        img = x.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        tok = self.patch_embed(img, patch, stride).to(self._residual_dtype())  # (B, D, Hf, Wt)
        b, d, hf, wt = tok.shape
        rule = "ast" if patch == c.base_patch and stride == (c.fstride, c.tstride) else "bilinear"
        pos = self.pos_embed.forward_padded((hf, wt), rule)  # (Hf·Wt, D)
        tok = tok.flatten(2).transpose(1, 2) + pos.to(tok.dtype)  # (B, Hf·Wt, D)
        seg = Segments.uniform_rows(b, hf * wt, x.device)
        return self._encode(tok.reshape(b * hf * wt, d), seg, return_embeddings)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
