"""Analytic FLOPs against a hand count and against torch.utils.flop_counter on the real model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flexast.model import ASTModel, batch_flops, model_flops, padded_flops
from tests.model.model_helpers import packed, tiny_config


def test_hand_count_tiny_config():
    """D=32, depth 2, MLP 128, C=5, [CLS]+[DIST]; clips of 4 and 10 patch tokens at patch 8×8 (n = 6 and 12)."""
    f = model_flops(tiny_config(pool="cls_dist"), [4, 10], (8, 8), backward=True)
    assert f.patch_embed == 2 * 14 * 64 * 32
    assert f.qkv_proj == 2 * (2 * 18 * 32 * 96 + 2 * 18 * 32 * 32)
    assert f.attention == 2 * 4 * (6**2 + 12**2) * 32  # per-clip quadratic, not (6 + 12)²
    assert f.mlp == 2 * 2 * (2 * 18 * 32 * 128)
    assert f.head == 2 * (2 * 32 * 5)
    assert f.forward == 57344 + 294912 + 46080 + 589824 + 640
    assert f.backward == 2 * (f.forward - f.patch_embed) + f.patch_embed


def _dense_and_attention(fc: FlopCounterMode) -> tuple[int, int]:
    """torch's counts split into attention ops and everything else.

    On CPU a 4D SDPA dispatches to the fused flash kernel, which torch's counter may not know (it then counts
    0 for it); the dense parts (patch embedding, projections, MLP, head) must match exactly either way.
    """
    counts = fc.get_flop_counts()["Global"]
    fused = sum(v for op, v in counts.items() if "attention" in str(op))
    return fc.get_total_flops() - fused, fused


@pytest.mark.parametrize("pool", ["cls_dist", "attn", "mean"])
def test_matches_torch_flop_counter(pool):
    """Forward and forward+backward FLOPs equal what torch counts while running the model (sdpa_loop)."""
    torch.manual_seed(0)
    cfg = tiny_config(pool=pool, attention="sdpa_loop")
    model = ASTModel(cfg)
    batch = packed([torch.randn(t, 32) for t in (8, 24, 64)], (8, 8))
    with FlopCounterMode(display=False) as fc:
        model(batch).sum().backward()
    expect = batch_flops(cfg, batch)
    # attention pooling's own q·k and a·v (one query per clip) also run through SDPA
    pool_att = 4 * batch.total_tokens * cfg.embed_dim if pool == "attn" else 0
    att = expect.attention + pool_att
    dense, fused = _dense_and_attention(fc)
    assert dense == expect.total - 3 * att  # backward of attention is 2x its forward
    assert fused in (0, 3 * att)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(batch)
    expect = batch_flops(cfg, batch, backward=False)
    dense, fused = _dense_and_attention(fc)
    assert dense == expect.forward - att
    assert fused in (0, att)


def test_attention_count_matches_the_two_attention_matmuls():
    """The quadratic term against torch's count of attention written out as its two matmuls, clip by clip.

    softmax(q kᵀ / √Dh) v is what every SDPA kernel computes; written as ``bmm`` calls it is counted the same
    way by every torch version (how ``FlopCounterMode`` counts a fused or math SDPA call changed in 2.14).
    """
    cfg = tiny_config(pool="mean", depth=1)
    lengths = [4, 12, 32]
    head_dim = cfg.embed_dim // cfg.num_heads
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        for n in lengths:
            q = torch.randn(cfg.num_heads, n, head_dim)  # (H, n, Dh)
            scores = torch.bmm(q, q.transpose(1, 2)) / head_dim**0.5  # (H, n, n)
            torch.bmm(scores.softmax(-1), q)  # (H, n, Dh)
    assert fc.get_total_flops() == model_flops(cfg, lengths, (8, 8), backward=False).attention


def test_padded_flops_overlapping_grid():
    torch.manual_seed(0)
    cfg = tiny_config(fstride=4, tstride=4)
    model = ASTModel(cfg).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randn(2, 64, 32))
    expect = padded_flops(cfg, 2, 64, backward=False)
    dense, fused = _dense_and_attention(fc)
    assert dense == expect.forward - expect.attention
    assert fused in (0, expect.attention)
