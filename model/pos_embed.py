"""Learned positional embeddings: an AST-style 2D grid, or ElasticAST's factorised freq/time tables.

Notation:
    D        width
    (H, W)   stored table size in (frequency, time) patches
    (Hf, Wt) token grid of the current input; ``W_full = max_frames // p_t`` is the time extent the table
             covers at the current patch (the table's own length at the base patch)
    P        prefix tokens ([CLS], [DIST]) whose embeddings sit in front of the grid

Two layouts are produced:

* padded (classic AST): ``(P + Hf·Wt, D)``, grid flattened frequency-major (``h·Wt + w``), as a conv's output.
* packed: one row per patch token, time-major inside a clip (token ``j`` at ``w = j // Hf``, ``h = j % Hf``).
  The table is resized to ``(Hf, W_full)`` and a clip takes its first ``Wt_i`` columns (positions start at
  the clip's start); a clip longer than ``W_full`` gets the table interpolated to its own ``Wt_i``.

Resizing rules: :func:`resize_grid` is bilinear (FlexiAST, any patch size); :func:`adapt_grid_ast` is AST's
"cut the centre, else interpolate", per axis (ImageNet adaptation, shorter inputs of a pretrained AST).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from flexast.model.attention import Segments, host_to_device


def resize_grid(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of a ``(D, H, W)`` grid to ``(D, h, w)``; identity if equal."""
    if statically_known_true(grid.shape[1] == size[0]) and statically_known_true(grid.shape[2] == size[1]):
        return grid  # a size only known when traced (ONNX export, dynamic time) takes the exact identity resize
    return F.interpolate(grid[None], size=tuple(size), mode="bilinear", align_corners=False)[0]  # (D, h, w)


def resize_table(table: torch.Tensor, n: int) -> torch.Tensor:
    """Linear resize (``align_corners=False``) of an ``(M, D)`` table to ``(n, D)``; identity if equal."""
    if statically_known_true(table.shape[0] == n):
        return table
    out = F.interpolate(table.T[None], size=n, mode="linear", align_corners=False)  # (1, D, n)
    return out[0].T  # (n, D)


def _cut_centre(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    start = int(x.shape[dim] / 2) - int(n / 2)
    return x.narrow(dim, start, n)


def adapt_grid_ast(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """AST's rule for a ``(D, H, W)`` grid: per axis, cut the centre if shrinking, else interpolate bilinearly."""
    h, w = size
    grid = _cut_centre(grid, 2, w) if w <= grid.shape[2] else resize_grid(grid, (grid.shape[1], w))  # (D, H, w)
    grid = _cut_centre(grid, 1, h) if h <= grid.shape[1] else resize_grid(grid, (h, grid.shape[2]))  # (D, h, w)
    return grid


def adapt_table_ast(table: torch.Tensor, n: int) -> torch.Tensor:
    """AST's rule for an ``(M, D)`` table: cut the centre if shrinking, else interpolate linearly."""
    return _cut_centre(table, 0, n) if n <= table.shape[0] else resize_table(table, n)


def _packed_lookup(seg: Segments, hf: int, w_full: int, table_at) -> torch.Tensor:
    """Per-token embeddings of packed patch tokens; ``table_at(w)`` gives the ``(Hf, w, D)`` table for width ``w``."""
    full = table_at(w_full)  # (Hf, W_full, D)
    pos = seg.positions()  # (L,)
    w_idx, h_idx = pos // hf, pos % hf  # (L,), (L,)
    if seg.max_len <= hf * w_full:
        return full[h_idx, w_idx]  # (L, D)
    # Some clip is longer than the table: those clips get the table interpolated to their own width.
    widths = [n // hf for n in seg.lengths()]
    tables, offsets, width_of = [full.reshape(-1, full.shape[-1])], {w_full: 0}, []
    base = hf * w_full
    for w in widths:
        if w > w_full and w not in offsets:
            offsets[w] = base
            tables.append(table_at(w).reshape(-1, full.shape[-1]))
            base += hf * w
        width_of.append(w if w > w_full else w_full)
    clip_width = host_to_device(torch.tensor(width_of), pos.device)[seg.segment_ids()]  # (L,)
    clip_off = host_to_device(torch.tensor([offsets[w] for w in width_of]), pos.device)[seg.segment_ids()]  # (L,)
    return torch.cat(tables, 0)[clip_off + h_idx * clip_width + w_idx]  # (L, D)


class GridPosEmbed(nn.Module):
    """AST/DeiT positional table ``weight``: ``(1, P + H·W, D)``, prefix rows then the grid frequency-major."""

    def __init__(self, dim: int, grid: tuple[int, int], n_prefix: int, std: float = 0.02):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.n_prefix = n_prefix
        self.weight = nn.Parameter(torch.randn(1, n_prefix + self.grid[0] * self.grid[1], dim) * std)

    def prefix(self) -> torch.Tensor:
        """``(P, D)`` embeddings of the prefix tokens."""
        return self.weight[0, : self.n_prefix]

    def table(self) -> torch.Tensor:
        """The stored grid as ``(D, H, W)``."""
        return self.weight[0, self.n_prefix :].T.reshape(-1, *self.grid)  # (D, H, W)

    def forward_padded(self, size: tuple[int, int], rule: str = "bilinear") -> torch.Tensor:
        """``(Hf·Wt, D)`` grid embeddings, frequency-major; ``rule`` is ``bilinear`` or ``ast``."""
        fn = adapt_grid_ast if rule == "ast" else resize_grid
        grid = fn(self.table(), size)  # (D, Hf, Wt)
        return grid.flatten(1).T  # (Hf·Wt, D)

    def forward_packed(self, seg: Segments, hf: int, w_full: int) -> torch.Tensor:
        """``(L, D)`` embeddings of packed patch tokens (time-major inside each clip)."""
        table = self.table()

        def table_at(w: int) -> torch.Tensor:
            return resize_grid(table, (hf, w)).permute(1, 2, 0)  # (Hf, w, D)

        return _packed_lookup(seg, hf, w_full, table_at)


class FactorizedPosEmbed(nn.Module):
    """ElasticAST tables ``freq`` ``(H, D)`` and ``time`` ``(W, D)``; a token at ``(h, w)`` gets ``freq[h] + time[w]``.

    Prefix tokens, if any, get their own rows ``prefix``: ``(P, D)``.
    """

    def __init__(self, dim: int, grid: tuple[int, int], n_prefix: int, std: float = 0.02):
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.n_prefix = n_prefix
        self.freq = nn.Parameter(torch.randn(self.grid[0], dim) * std)
        self.time = nn.Parameter(torch.randn(self.grid[1], dim) * std)
        self.prefix_pos = nn.Parameter(torch.randn(n_prefix, dim) * std) if n_prefix else None

    def prefix(self) -> torch.Tensor:
        if self.prefix_pos is None:
            return self.freq.new_zeros(0, self.freq.shape[1])
        return self.prefix_pos

    def forward_padded(self, size: tuple[int, int], rule: str = "bilinear") -> torch.Tensor:
        fn = adapt_table_ast if rule == "ast" else resize_table
        freq, time = fn(self.freq, size[0]), fn(self.time, size[1])  # (Hf, D), (Wt, D)
        return (freq[:, None] + time[None]).flatten(0, 1)  # (Hf·Wt, D)

    def forward_packed(self, seg: Segments, hf: int, w_full: int) -> torch.Tensor:
        freq = resize_table(self.freq, hf)  # (Hf, D)

        def table_at(w: int) -> torch.Tensor:
            return freq[:, None] + resize_table(self.time, w)[None]  # (Hf, w, D)

        return _packed_lookup(seg, hf, w_full, table_at)


@torch.no_grad()
def resample_grid_pos_embed(src: GridPosEmbed, dst: GridPosEmbed) -> torch.Tensor:
    """``src``'s table resized bilinearly to ``dst``'s grid: a new ``weight`` ``(1, P + H'·W', D)`` for ``dst``.

    The prefix rows are ``src``'s when both have the same number of prefix tokens, else ``dst``'s own. (The
    factorised tables resize with :func:`resize_table`.) As timm's ``resample_abs_pos_embed`` beside its layer.
    """
    n_pre = dst.n_prefix
    grid = resize_grid(src.table(), dst.grid).flatten(1).T  # (H'·W', D)
    prefix = src.weight[0, :n_pre] if src.n_prefix == n_pre else dst.weight[0, :n_pre]  # (P, D)
    return torch.cat([prefix, grid], 0)[None]  # (1, P + H'·W', D)
