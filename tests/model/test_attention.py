"""Block-diagonal attention backends against a float64 per-clip reference: outputs, gradients, isolation."""

from __future__ import annotations

import pytest
import torch

from flexast.model.attention import Segments, attend, resolve_backend
from flexast.model.errors import BackendError

LENGTHS = [1, 7, 64, 130, 333]
H, DH = 2, 8
CPU_BACKENDS = ["sdpa_loop", "padded"]


def reference(q, k, v, q_lengths, k_lengths):
    """Per-clip softmax(q kᵀ / sqrt(Dh)) v in float64, written out by hand."""
    outs, qo, ko = [], 0, 0
    for lq, lk in zip(q_lengths, k_lengths, strict=True):
        qi, ki, vi = (t.double() for t in (q[qo : qo + lq], k[ko : ko + lk], v[ko : ko + lk]))
        scores = torch.einsum("qhd,khd->hqk", qi, ki) / q.shape[-1] ** 0.5
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vi))
        qo, ko = qo + lq, ko + lk
    return torch.cat(outs, 0)


def _inputs(q_lengths, k_lengths, dtype=torch.float32, device="cpu", seed=0, dh=DH):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lengths), H, dh, generator=g).to(device, dtype)
    k = torch.randn(sum(k_lengths), H, dh, generator=g).to(device, dtype)
    v = torch.randn(sum(k_lengths), H, dh, generator=g).to(device, dtype)
    return q, k, v


def _check(backend, q_lengths, k_lengths, dtype=torch.float32, device="cpu", tol=1e-5, dh=DH):
    q, k, v = _inputs(q_lengths, k_lengths, dtype, device, dh=dh)
    cot = torch.randn(sum(q_lengths), H, dh, generator=torch.Generator().manual_seed(1))
    qs, ks = Segments.from_lengths(q_lengths, device), Segments.from_lengths(k_lengths, device)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = attend(*leaves, qs, ks, backend)
    (out.float() * cot.to(device)).sum().backward()
    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
    ref = reference(*ref_leaves, q_lengths, k_lengths)
    (ref * cot.double()).sum().backward()
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), atol=tol, rtol=tol)
    for mine, theirs, name in zip(leaves, ref_leaves, "qkv", strict=True):
        torch.testing.assert_close(mine.grad.cpu().double(), theirs.grad, atol=tol, rtol=tol, msg=f"grad {name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_self_attention_matches_reference(backend):
    _check(backend, LENGTHS, LENGTHS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cross_attention_one_query_per_clip(backend):
    """Attention pooling's shape: one query per clip against that clip's tokens."""
    _check(backend, [1] * len(LENGTHS), LENGTHS)


def test_uniform_segments_match_reference():
    """Equal-length clips (the classic padded path) go through one batched SDPA."""
    q, k, v = _inputs([50] * 3, [50] * 3)
    seg = Segments.uniform_rows(3, 50)
    torch.testing.assert_close(
        attend(q, k, v, seg, seg, "sdpa_loop").double(), reference(q, k, v, [50] * 3, [50] * 3), atol=1e-5, rtol=1e-5
    )


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
def test_flex_forward_on_cpu_matches_reference():
    """FlexAttention has no CPU backward; its forward (no grad) still follows the document mask."""
    q, k, v = _inputs(LENGTHS, LENGTHS)
    seg = Segments.from_lengths(LENGTHS)
    try:
        with torch.no_grad():
            out = attend(q, k, v, seg, seg, "flex")
    except Exception as exc:  # flex on CPU is best effort
        pytest.skip(f"FlexAttention forward unavailable on CPU here: {exc!r}")
    torch.testing.assert_close(out.double(), reference(q, k, v, LENGTHS, LENGTHS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_isolation_bitwise(backend):
    """Perturbing one clip's keys leaves every other clip's output bitwise unchanged."""
    q, k, v = _inputs(LENGTHS, LENGTHS)
    seg = Segments.from_lengths(LENGTHS)
    base = attend(q, k, v, seg, seg, backend)
    cu = seg.cu.tolist()
    for j in range(len(LENGTHS)):
        k2 = k.clone()
        k2[cu[j] : cu[j + 1]] += torch.randn_like(k2[cu[j] : cu[j + 1]])
        out = attend(q, k2, v, seg, seg, backend)
        for i in range(len(LENGTHS)):
            same = torch.equal(out[cu[i] : cu[i + 1]], base[cu[i] : cu[i + 1]])
            if i != j:
                assert same, f"backend {backend}: clip {i} changed after perturbing clip {j}'s keys"
            elif LENGTHS[j] > 1:  # with one key, softmax is 1 whatever the key: the output cannot change
                assert not same, f"backend {backend}: perturbing clip {j}'s keys did not change its own output"


def test_resolve_backend():
    assert resolve_backend("auto", "cpu", torch.float32) == "sdpa_loop"
    assert resolve_backend("padded", "cpu", torch.float32) == "padded"
    with pytest.raises(BackendError, match="needs a CUDA device"):
        resolve_backend("varlen", "cpu", torch.bfloat16)
    with pytest.raises(BackendError, match="unknown attention backend"):
        resolve_backend("nope", "cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["varlen", "flex", "sdpa_loop", "padded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_backends_match_reference(backend, dtype):
    """GPU numerics in half precision: outputs and gradients within half-precision tolerance.

    Head width 16: Inductor's flex kernels refuse widths below 16 (the models use 64)."""
    _check(backend, LENGTHS, LENGTHS, dtype=dtype, device="cuda", tol=3e-2, dh=16)


@pytest.mark.gpu
def test_gpu_auto_picks_varlen_for_bf16():
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("varlen needs sm80+")
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "varlen"
    assert resolve_backend("auto", "cuda", torch.float32) == "padded"
