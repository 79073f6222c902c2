"""Positional embeddings: AST's cut-centre rule, packed lookups (start-aligned, interpolated past the table)."""

from __future__ import annotations

import torch

from flexast.model.attention import Segments
from flexast.model.pos_embed import FactorizedPosEmbed, GridPosEmbed, adapt_grid_ast, resize_grid


def test_adapt_grid_ast_cuts_centre_and_interpolates():
    grid = torch.arange(2 * 6 * 10, dtype=torch.float32).reshape(2, 6, 10)
    out = adapt_grid_ast(grid, (4, 7))
    torch.testing.assert_close(out, grid[:, 1:5, 2:9])  # int(6/2)-int(4/2) = 1, int(10/2)-int(7/2) = 2
    up = adapt_grid_ast(grid, (4, 13))
    torch.testing.assert_close(up, resize_grid(grid, (6, 13))[:, 1:5])


def test_grid_packed_lookup_is_start_aligned():
    """A clip of Wt ≤ W_full columns takes the first Wt columns of the table resized to (Hf, W_full)."""
    torch.manual_seed(0)
    pe = GridPosEmbed(4, (3, 8), n_prefix=2)
    hf, w_full = 3, 8
    seg = Segments.from_lengths([hf * 2, hf * 8])
    out = pe.forward_packed(seg, hf, w_full)  # (30, 4)
    table = pe.table()  # (D, H, W)
    first = torch.stack([table[:, j % hf, j // hf] for j in range(6)])  # time-major tokens
    torch.testing.assert_close(out[:6], first)
    assert out.shape == (30, 4)


def test_factorized_lookup_interpolates_long_clips():
    torch.manual_seed(0)
    pe = FactorizedPosEmbed(4, (2, 5), n_prefix=0)
    seg = Segments.from_lengths([2 * 3, 2 * 9])  # the second clip (9 columns) exceeds the 5-column table
    out = pe.forward_packed(seg, 2, 5)
    j = torch.arange(6)
    torch.testing.assert_close(out[:6], pe.freq[j % 2] + pe.time[j // 2])
    time9 = torch.nn.functional.interpolate(pe.time.T[None], size=9, mode="linear", align_corners=False)[0].T
    j = torch.arange(18)
    torch.testing.assert_close(out[6:], pe.freq[j % 2] + time9[j // 2])


def test_resample_grid_pos_embed_keeps_matching_prefix_rows():
    from flexast.model.pos_embed import resample_grid_pos_embed

    torch.manual_seed(0)
    src, same_prefix, other_prefix = GridPosEmbed(4, (3, 5), 2), GridPosEmbed(4, (6, 2), 2), GridPosEmbed(4, (6, 2), 1)
    grid = src.weight[0, 2:].T.reshape(4, 3, 5)  # (D, H, W): frequency-major rows
    expect = torch.nn.functional.interpolate(grid[None], size=(6, 2), mode="bilinear", align_corners=False)[0]
    out = resample_grid_pos_embed(src, same_prefix)
    assert out.shape == same_prefix.weight.shape == (1, 2 + 12, 4)
    torch.testing.assert_close(out[0, 2:], expect.flatten(1).T)
    torch.testing.assert_close(out[0, :2], src.weight[0, :2].detach())
    out = resample_grid_pos_embed(src, other_prefix)  # [CLS] only: the destination keeps its own prefix row
    torch.testing.assert_close(out[0, :1], other_prefix.weight[0, :1].detach())
