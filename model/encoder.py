"""Pre-norm ViT encoder over packed tokens, with parameter names 1:1 with DeiT/ViT/AST.

Notation: ``L`` tokens of all clips concatenated, ``D`` width, ``N`` clips; ``Segments`` says which
tokens belong to which clip (:mod:`model.attention`).

The encoder's own state dict reads ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2`` and ``norm``: exactly the names of a
timm DeiT/ViT and of the official AST (``module.v.``), so their blocks load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from flexast.model.attention import Attention, Segments, host_to_device
from flexast.model.errors import ModelConfigError

# name: (width D, depth, heads)
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


class Mlp(nn.Module):
    """``fc1`` → GELU → dropout → ``fc2`` → dropout, as timm's ViT MLP."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))  # (L, D)


class DropPath(nn.Module):
    """Stochastic depth per clip: a clip's whole residual branch is dropped with probability ``p``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        if not self.training:
            return x
        keep = torch.rand(seg.n, device=x.device) >= self.p  # (N,)
        scale = keep.to(x.dtype)[seg.segment_ids()] / (1.0 - self.p)  # (L,)
        return x * scale[:, None]  # (L, D)


class NoDropPath(nn.Module):
    """Disabled stochastic depth (the branch-free ``nn.Identity`` of :class:`DropPath`)."""

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        return x


class Block(nn.Module):
    """Pre-norm transformer block; sub-layers are arguments, disabled options are identities."""

    def __init__(self, norm1: nn.Module, attn: Attention, norm2: nn.Module, mlp: nn.Module, drop_path: nn.Module):
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.mlp = mlp
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), seg), seg)  # (L, D)
        return x + self.drop_path(self.mlp(self.norm2(x)), seg)  # (L, D)


class Encoder(nn.Module):
    """``depth`` pre-norm blocks and a final LayerNorm over packed ``(L, D)`` tokens."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        hidden = round(dim * mlp_ratio)
        rates = torch.linspace(0, drop_path, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(
            Block(
                nn.LayerNorm(dim, eps=norm_eps),
                Attention(dim, num_heads, qkv_bias, attn_drop, drop),
                nn.LayerNorm(dim, eps=norm_eps),
                Mlp(dim, hidden, drop),
                DropPath(r) if r > 0 else NoDropPath(),
            )
            for r in rates
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def set_backend(self, backend: str) -> None:
        """Use the concrete attention ``backend`` in every block."""
        for block in self.blocks:
            block.attn.backend = backend

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each block (regional compilation: one code object, shared by every block) with
        dynamic token counts. The segment bookkeeping is prepared eagerly in :meth:`forward`, so a block's graph
        depends on the backend and the train/eval mode only: a step at any patch size, clip count or length
        reuses it."""
        for block in self.blocks:
            block.compile(**{"dynamic": True, **options})

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        """``(L, D)`` tokens to normalised ``(L, D)`` tokens; attention stays inside each clip of ``seg``."""
        if self.blocks:
            seg.prepare(self.blocks[0].attn.backend, x.device)
        for block in self.blocks:
            x = block(x, seg)
        return self.norm(x)


class TokenDropout(nn.Module):
    """ElasticAST token dropout: in training, keep a random ``1 - p`` of each clip's patch tokens (at least one).

    Applied to patch tokens after positional embeddings and before [CLS]/[DIST] are added. It needs the
    per-clip lengths on the host once per batch; in eval mode (or ``p == 0``) it returns its inputs.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ModelConfigError(f"token dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor, seg: Segments) -> tuple[torch.Tensor, Segments]:
        if not self.training or self.p == 0.0:
            return x, seg
        if seg.uniform is not None:  # a padded batch: keep the same count in every row, stay uniform
            k = max(1, round(seg.uniform * (1.0 - self.p)))
            keep = torch.rand(seg.n, seg.uniform, device=x.device).argsort(1)[:, :k].sort(1).values  # (N, k)
            idx = (keep + torch.arange(seg.n, device=x.device)[:, None] * seg.uniform).reshape(-1)  # (N·k,)
            return x.index_select(0, idx), Segments.uniform_rows(seg.n, k, x.device)
        kept, keep_idx, offset = [], [], 0
        for n in seg.lengths():
            k = max(1, round(n * (1.0 - self.p)))
            keep_idx.append(torch.randperm(n)[:k].sort().values + offset)
            kept.append(k)
            offset += n
        idx = host_to_device(torch.cat(keep_idx), x.device)  # (L',)
        return x.index_select(0, idx), Segments.from_lengths(kept, x.device)  # (L', D)
