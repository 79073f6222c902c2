"""Mixed precision on the CPU, standing in for the GPU: bf16 autocast through every pool, position table and
backend, the ``varlen`` path through a stand-in that enforces flash attention's input rules, and a float32
residual stream."""

from __future__ import annotations

import pytest
import torch

from flexast.model import ASTModel
from flexast.model.attention import Segments, attend, resolve_backend
from flexast.model.errors import BackendError
from tests.model import varlen_standin
from tests.model.model_helpers import packed, tiny_config
from tests.model.test_attention import reference
from tests.model.varlen_standin import VarlenRuleError

# 96 frames exceed max_frames=64 (the long-clip position lookup); 8 frames is one patch column
FRAMES = [8, 24, 64, 40, 96]
POOLS = ["cls", "cls_dist", "attn", "mean"]
POS = ["grid", "factorized"]


def _clips(frames=FRAMES, n_mels=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, n_mels, generator=g) for t in frames]


@pytest.fixture
def standin(monkeypatch):
    return varlen_standin.install(monkeypatch)


def _qkv(lengths, dtype=torch.bfloat16, h=2, dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(sum(lengths), h, dh, generator=g).to(dtype) for _ in range(3)]


def test_standin_matches_reference_forward_and_backward():
    """The stand-in itself is exact attention: within bf16 rounding of a float64 per-clip reference."""
    lengths = [1, 7, 64, 130]
    q, k, v = (t.requires_grad_(True) for t in _qkv(lengths, dh=8))  # the reference's scale is 1/sqrt(8)
    cu = Segments.from_lengths(lengths).cu
    out = torch.ops.flexast_test.varlen_attn(q, k, v, cu, cu, 130, 130)
    cot = torch.randn_like(out, dtype=torch.float32)
    (out.float() * cot).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = reference(*ref_leaves, lengths, lengths)
    (ref * cot.double()).sum().backward()
    assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref.detach(), atol=3e-2, rtol=3e-2)
    for mine, theirs in zip((q, k, v), ref_leaves, strict=True):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "breaks, match",
    [
        (lambda a: {**a, "q": a["q"].float(), "k": a["k"].float(), "v": a["v"].float()}, "needs bf16/fp16"),
        (lambda a: {**a, "k": a["k"].half()}, "key is torch.float16, query is torch.bfloat16"),
        (lambda a: {**a, "cu_q": a["cu_q"].long()}, "cu_seq_q must be int32"),
        (lambda a: {**a, "cu_k": a["cu_k"].to("meta")}, "cu_seq_k is on meta"),
        (lambda a: {**a, "q": a["q"].transpose(0, 1).contiguous().transpose(0, 1)}, "query must be contiguous"),
        (lambda a: {**a, "max_q": 63}, "below its longest segment 64"),
        (lambda a: {**a, "q": a["q"][:-1].contiguous()}, "ends at 72 but there are 71 tokens"),
        (lambda a: {**a, "q": a["q"][:, :, :12].contiguous()}, "shapes disagree"),
        (lambda a: {**a, "cu_k": torch.tensor([0, 8, 8, 72], dtype=torch.int32)}, "clip count"),
    ],
    ids=["fp32", "mixed", "int64-cu", "cu-device", "strided", "max-len", "total", "shape", "n-clips"],
)
def test_standin_enforces_flash_input_rules(breaks, match):
    q, k, v = _qkv([8, 64])
    cu = Segments.from_lengths([8, 64]).cu
    args = breaks({"q": q, "k": k, "v": v, "cu_q": cu, "cu_k": cu.clone(), "max_q": 64, "max_k": 64})
    with pytest.raises(VarlenRuleError, match=match):  # the checks the op's forward and backward both run
        varlen_standin.check_inputs(*args.values())
    if args["cu_k"].device.type == "cpu":  # (a meta tensor dispatches the op to its fake kernel)
        with pytest.raises(VarlenRuleError, match=match):
            torch.ops.flexast_test.varlen_attn(*args.values())


def test_varlen_backend_refuses_float32_and_dropout(standin):
    q, k, v = _qkv([8, 64], torch.float32)
    seg = Segments.from_lengths([8, 64])
    with pytest.raises(BackendError, match=r"bf16/fp16 activations, got torch\.float32"):
        attend(q, k, v, seg, seg, "varlen")
    with pytest.raises(BackendError, match="no attention dropout"):
        attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), seg, seg, "varlen", dropout_p=0.1)


def test_float32_never_resolves_to_varlen_or_flex():
    """fp32 evaluation/prediction with ``attention: varlen`` or ``auto`` on CUDA runs ``padded`` (no compile)."""
    assert resolve_backend("varlen", "cuda", torch.float32) == "padded"
    assert resolve_backend("auto", "cuda", torch.float32) == "padded"
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa_loop"


@pytest.mark.parametrize("backend", ["sdpa_loop", "padded", "varlen"])
@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("pool", POOLS)
def test_bf16_autocast_every_pool_and_position(standin, backend, pool, pos):
    """Under CPU bf16 autocast every pool and position table runs forward and backward on every backend
    (``varlen`` through the stand-in), tracks the float32 model, and keeps the residual stream in float32."""
    torch.manual_seed(0)
    cfg = dict(pool=pool, pos_embed=pos, attention=backend, token_dropout=0.25)
    model = ASTModel(tiny_config(**cfg))
    batch = packed(_clips(), (8, 8))
    stream = []
    hooks = [b.register_forward_hook(lambda m, i, o: stream.append(o.dtype)) for b in model.encoder.blocks]
    model.eval()
    ref = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    assert set(stream) == {torch.float32}, stream  # every block's output: the float32 residual stream
    model.train()  # token dropout on: the ragged segments it makes go through the backend too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(batch).float().square().mean()
    loss.backward()
    for h in hooks:
        h.remove()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    if backend == "varlen":  # 2 blocks × (eval, autocast eval, train) and the attention pool
        assert standin.forward >= 4 + 2 * (pool == "attn")


def test_bf16_autocast_padded_entry_point(standin):
    """The classic padded entry point (uniform segments) under autocast, attention pooling included."""
    torch.manual_seed(0)
    model = ASTModel(tiny_config(pool="attn", attention="varlen")).eval()
    x = torch.randn(2, 64, 32)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
