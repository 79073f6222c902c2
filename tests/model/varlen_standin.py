"""A CPU stand-in for ``torch.nn.attention.varlen.varlen_attn`` that enforces flash attention's input rules.

No GPU runs in CI, yet the model's ``varlen`` path must be right before one does. This registers a
``torch.library`` custom op, ``flexast_test::varlen_attn``, with a CPU kernel and an autograd formula. Both
check every rule flash-attention's varlen kernel imposes and raise :class:`VarlenRuleError` naming the
offending value; otherwise they compute exact per-clip softmax attention in float32 and return the inputs'
dtype, as flash does.

Rules (forward): q, k, v are 3-D ``(L, H, Dh)``, one dtype in {bf16, fp16}, contiguous, on one device, the
same heads and head width (a multiple of 8, at most 256); ``cu_q``/``cu_k`` are 1-D int32 on that device,
of equal length ``N+1``, start at 0, never decrease, and end at the token totals ``Lq``/``Lk``; ``max_q``/``max_k``
are at least the longest segment. Backward: the incoming gradient has the output's dtype and shape.

Installation (``install(monkeypatch)``): the call site :func:`model.attention._varlen_op` is replaced to return
this op, and ``"cpu"`` is added to :data:`model.attention.VARLEN_DEVICES`, so ``attention="varlen"`` resolves
on the CPU and the model's own ``_varlen`` (its dtype check, its ``.contiguous()`` calls, its segments) runs
unchanged, forward and backward.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

HALF = (torch.bfloat16, torch.float16)


class VarlenRuleError(RuntimeError):
    """An input the flash varlen kernel would refuse (or silently mis-compute)."""


def _check_cu(name: str, cu: torch.Tensor, device: torch.device, total: int, max_len: int) -> list[int]:
    if cu.dtype != torch.int32:
        raise VarlenRuleError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise VarlenRuleError(f"{name} must be 1-D (N+1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise VarlenRuleError(f"{name} is on {cu.device}, the tokens on {device}")
    if not cu.is_contiguous():
        raise VarlenRuleError(f"{name} must be contiguous")
    vals = cu.tolist()
    if vals[0] != 0 or any(b < a for a, b in itertools.pairwise(vals)):
        raise VarlenRuleError(f"{name} must start at 0 and never decrease, got {vals}")
    if vals[-1] != total:
        raise VarlenRuleError(f"{name} ends at {vals[-1]} but there are {total} tokens")
    lengths = [b - a for a, b in itertools.pairwise(vals)]
    if max(lengths) > max_len:
        raise VarlenRuleError(f"max length {max_len} for {name} is below its longest segment {max(lengths)}")
    return lengths


def check_inputs(q, k, v, cu_q, cu_k, max_q: int, max_k: int) -> tuple[list[int], list[int]]:
    """Raise :class:`VarlenRuleError` for anything flash varlen refuses; the query and key segment lengths."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 3:
            raise VarlenRuleError(f"{name} must be (L, H, Dh), got shape {tuple(t.shape)}")
        if t.dtype not in HALF:
            raise VarlenRuleError(f"{name} needs bf16/fp16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise VarlenRuleError(f"{name} is {t.dtype}, query is {q.dtype}")
        if not t.is_contiguous():
            raise VarlenRuleError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
        if t.device != q.device:
            raise VarlenRuleError(f"{name} is on {t.device}, query on {q.device}")
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise VarlenRuleError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    dh = q.shape[2]
    if dh % 8 or dh > 256:
        raise VarlenRuleError(f"head width {dh} must be a multiple of 8 and at most 256")
    if cu_q.shape != cu_k.shape:
        raise VarlenRuleError(f"cu_seqlens disagree on clip count: {tuple(cu_q.shape)} vs {tuple(cu_k.shape)}")
    lq = _check_cu("cu_seq_q", cu_q, q.device, q.shape[0], max_q)
    lk = _check_cu("cu_seq_k", cu_k, q.device, k.shape[0], max_k)
    if any(n == 0 for n in lk):
        raise VarlenRuleError(f"a key segment is empty: lengths {lk}")
    return lq, lk


def _reference(q, k, v, lq: list[int], lk: list[int]) -> torch.Tensor:
    """Per-clip softmax(q kᵀ/√Dh) v in float32: ``(Lq, H, Dh)``."""
    outs = []
    for qi, ki, vi in zip(q.float().split(lq), k.float().split(lk), v.float().split(lk), strict=True):
        o = F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1))  # (H, lq, Dh)
        outs.append(o.transpose(0, 1))  # (lq, H, Dh)
    return torch.cat(outs, 0)


@torch.library.custom_op("flexast_test::varlen_attn", mutates_args=())
def varlen_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int
) -> torch.Tensor:
    lq, lk = check_inputs(q, k, v, cu_q, cu_k, max_q, max_k)
    return _reference(q, k, v, lq, lk).to(q.dtype)


@varlen_attn.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k):
    return torch.empty_like(q)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k)
    ctx.max_q, ctx.max_k = max_q, max_k


def _backward(ctx, grad):
    q, k, v, cu_q, cu_k = ctx.saved_tensors
    if grad.dtype != q.dtype or grad.shape != q.shape:
        raise VarlenRuleError(f"gradient {grad.dtype} {tuple(grad.shape)} for an output {q.dtype} {tuple(q.shape)}")
    lq, lk = check_inputs(q, k, v, cu_q, cu_k, ctx.max_q, ctx.max_k)
    with torch.enable_grad():
        leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
        out = _reference(*leaves, lq, lk)
        gq, gk, gv = torch.autograd.grad(out, leaves, grad.float())
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype), None, None, None, None


varlen_attn.register_autograd(_backward, setup_context=_setup)


class Calls:
    """How often the stand-in ran (the model's ``varlen`` path really went through it)."""

    forward = 0


def _counted(*args):
    Calls.forward += 1
    return torch.ops.flexast_test.varlen_attn(*args)


def install(monkeypatch, count: bool = True) -> type[Calls]:
    """Route the model's ``varlen`` backend to this stand-in on the CPU for one test; returns the call counter.

    ``count=False`` calls the op directly: under ``torch.compile`` the counter would be Python state mutated in
    the graph, which dynamo guards on (a recompile per call).
    """
    from flexast.model import attention

    Calls.forward = 0
    op = _counted if count else torch.ops.flexast_test.varlen_attn
    monkeypatch.setattr(attention, "_varlen_op", lambda: op)
    monkeypatch.setattr(attention, "VARLEN_DEVICES", ("cuda", "cpu"))
    return Calls
