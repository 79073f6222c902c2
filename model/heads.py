"""Clip pooling and the classifier: [CLS](+[DIST]), masked attention pooling, mean pooling; LayerNorm + Linear.

Notation: ``L`` encoder tokens of all clips concatenated (each clip's ``P`` prefix tokens first), ``N`` clips,
``D`` width, ``C`` classes, ``H`` heads. Every pool maps ``(L, D)`` + :class:`Segments` to ``(N, D)``.
"""

from __future__ import annotations

import torch
from torch import nn

from flexast.model.attention import Segments, attend

POOLS = ("cls", "cls_dist", "attn", "mean")


def prefix_tokens(pool: str) -> int:
    """How many learned tokens each clip gets in front of its patches for ``pool``."""
    return {"cls": 1, "cls_dist": 2, "attn": 0, "mean": 0}[pool]


class ClsPool(nn.Module):
    """The first ``n`` tokens of each clip, averaged (``n=1``: [CLS]; ``n=2``: AST's ([CLS] + [DIST]) / 2)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        start = seg.cu[:-1].long()  # (N,)
        out = x[start]  # (N, D)
        for i in range(1, self.n):
            out = out + x[start + i]
        return out / self.n  # (N, D)


class MeanPool(nn.Module):
    """Mean of each clip's tokens."""

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        sums = x.new_zeros(seg.n, x.shape[1]).index_add_(0, seg.segment_ids(), x)  # (N, D)
        counts = (seg.cu[1:] - seg.cu[:-1]).to(x.dtype)  # (N,)
        return sums / counts[:, None]  # (N, D)


class AttentionPool(nn.Module):
    """ElasticAST masked attention pooling: one learned query per clip attends to that clip's tokens only.

    It runs through the same block-diagonal primitive as the encoder (query segments of length 1).
    Parameters: ``query`` ``(D,)``, ``kv`` (keys and values), ``proj``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.backend = "sdpa_loop"

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        length, dim = x.shape
        dh = dim // self.num_heads
        kv = self.kv(x).view(length, 2, self.num_heads, dh)  # (L, 2, H, Dh)
        k, v = kv.unbind(1)  # each (L, H, Dh)
        # the query in the keys' dtype: under autocast ``kv`` runs in bf16/fp16 while ``query`` stays float32
        q = self.query.to(k.dtype).view(1, self.num_heads, dh).expand(seg.n, -1, -1)  # (N, H, Dh)
        q_seg = Segments.uniform_rows(seg.n, 1, x.device)
        q_seg.uniform = None  # keys are ragged: not a uniform batch
        out = attend(q, k, v, q_seg, seg, self.backend)  # (N, H, Dh)
        return self.proj(out.reshape(seg.n, dim))  # (N, D)


def build_pool(pool: str, dim: int, num_heads: int) -> nn.Module:
    """The pooling module for ``pool`` (one of :data:`POOLS`)."""
    if pool == "attn":
        return AttentionPool(dim, num_heads)
    if pool == "mean":
        return MeanPool()
    return ClsPool(prefix_tokens(pool))


class ClassifierHead(nn.Module):
    """Pool, then LayerNorm + Linear (AST's ``mlp_head``); ``forward`` returns logits and the pooled embedding."""

    def __init__(self, pool: nn.Module, dim: int, num_classes: int, norm_eps: float = 1e-6):
        super().__init__()
        self.pool = pool
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, seg: Segments) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.pool(x, seg)  # (N, D)
        return self.fc(self.norm(emb)), emb  # (N, C), (N, D)
