"""PI-resize patch embedding: the FlexiAST identity, agreement with timm, the cache, and the other modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexast.model.errors import ModelConfigError, ShapeError
from flexast.model.patch_embed import FlexiPatchEmbed, patch_of, pi_resize_matrix, resize_matrix


def _embed(base=(8, 8), resize="pi", axes="both", dim=6, seed=0):
    torch.manual_seed(seed)
    return FlexiPatchEmbed(dim, base, resize, axes).double()


@pytest.mark.parametrize("target", [(8, 8), (10, 10), (12, 16), (16, 16), (8, 13)])
def test_pi_resize_identity_for_upsampling(target):
    """⟨x, w⟩ = ⟨resize(x), PI(w)⟩ for every upsampled (possibly rectangular) patch size."""
    pe = _embed()
    x = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    x_up = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=False)
    w = pe.proj.weight  # (D, 1, 8, 8)
    w_hat = pe.kernel(target)  # (D, 1, *target)
    lhs = torch.einsum("nchw,dchw->nd", x, w)
    rhs = torch.einsum("nchw,dchw->nd", x_up, w_hat)
    torch.testing.assert_close(rhs, lhs, atol=1e-5, rtol=0)


def test_resize_matrix_is_bilinear_resize():
    """B·vec(x) equals F.interpolate of x (the matrix is built from one-hot basis patches)."""
    x = torch.randn(3, 1, 6, 5, dtype=torch.float64)
    b = resize_matrix((6, 5), (9, 11))
    ours = (x.reshape(3, -1) @ b.T).reshape(3, 1, 9, 11)
    torch.testing.assert_close(ours, F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=False))


@pytest.mark.parametrize(("old", "new"), [((16, 16), (24, 24)), ((16, 16), (8, 12)), ((8, 8), (30, 10))])
def test_separable_pinv_equals_pinv_of_the_full_resize_matrix(old, new):
    # pinv((B_f ⊗ B_t)ᵀ) = pinv(B_fᵀ) ⊗ pinv(B_tᵀ): checked against one SVD of the full 2-D matrix.
    full = torch.linalg.pinv(resize_matrix(old, new).T)
    assert torch.allclose(pi_resize_matrix(old, new), full, atol=1e-12)


@pytest.mark.parametrize("target", [(12, 12), (16, 16), (4, 4), (6, 10)])
def test_pi_resize_matches_timm(timm_patch_embed, target):
    """Our PI-resized kernel equals timm's ``resample_patch_embed`` with bilinear, no antialias (up and down)."""
    pe = _embed()
    theirs = timm_patch_embed.resample_patch_embed(
        pe.proj.weight.detach(), list(target), interpolation="bilinear", antialias=False
    )
    # timm computes its pinv in float32 (DTYPE_INTERMEDIATE); ours is float64, so agree to float32 precision.
    torch.testing.assert_close(pe.kernel(target).detach(), theirs, atol=1e-6, rtol=0)


def test_pinv_cache_is_hit_and_not_in_state_dict():
    pe = FlexiPatchEmbed(4, (8, 8))
    pe.kernel((12, 12))
    first = next(iter(pe._pinv.values()))
    pe.kernel((12, 12))
    pe.kernel((12, 12))
    assert len(pe._pinv) == 1 and next(iter(pe._pinv.values())) is first  # hit: the same matrix object
    pe.kernel((10, 10))
    assert len(pe._pinv) == 2
    assert set(pe.state_dict()) == {"proj.weight", "proj.bias"}
    key_dtypes = {k[3] for k in pe._pinv}
    assert key_dtypes == {torch.float32}


def test_pinv_cache_invalidated_by_to():
    pe = FlexiPatchEmbed(4, (8, 8))
    pe.kernel((12, 12))
    pe.double()
    assert pe._pinv == {}
    w = pe.kernel((12, 12))
    assert w.dtype == torch.float64
    assert [k[3] for k in pe._pinv] == [torch.float64]


def test_pi_resize_runs_in_the_weight_dtype_under_autocast():
    """Under bf16 autocast the resized kernel is float32 and equals the one computed without autocast."""
    torch.manual_seed(0)
    pe = FlexiPatchEmbed(16, (8, 8))
    ref = pe.kernel((12, 12)).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pe.kernel((12, 12)).detach()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0, rtol=0)


def test_pi_resize_is_differentiable_in_base_kernel():
    pe = _embed()
    pe.kernel((12, 12)).sum().backward()
    assert pe.proj.weight.grad is not None and pe.proj.weight.grad.abs().sum() > 0


def test_bilinear_and_none_modes():
    pe = _embed(resize="bilinear")
    w = pe.kernel((16, 16))
    torch.testing.assert_close(w, F.interpolate(pe.proj.weight, size=(16, 16), mode="bilinear", align_corners=False))
    none = _embed(resize="none")
    assert none.kernel((8, 8)) is none.proj.weight
    with pytest.raises(ShapeError, match="only runs at the base patch"):
        none.kernel((16, 16))


def test_time_only_resize():
    """resize_axes='time' (FlexiAST speaker setting): time may change, frequency may not; the identity holds."""
    pe = _embed(axes="time")
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    x_up = F.interpolate(x, size=(8, 20), mode="bilinear", align_corners=False)
    lhs = torch.einsum("nchw,dchw->nd", x, pe.proj.weight)
    rhs = torch.einsum("nchw,dchw->nd", x_up, pe.kernel((8, 20)))
    torch.testing.assert_close(rhs, lhs, atol=1e-5, rtol=0)
    with pytest.raises(ShapeError, match="pins the frequency"):
        pe.kernel((10, 20))


def test_patch_of_keeps_the_base_shape():
    """A patch size is a time width: square bases give p×p, others keep their shape, ``time`` pins frequency."""
    assert [patch_of((16, 16), "both", p) for p in (8, 24)] == [(8, 8), (24, 24)]
    assert [patch_of((32, 16), "both", p) for p in (8, 12, 24)] == [(16, 8), (24, 12), (48, 24)]
    assert patch_of((32, 16), "time", 24) == (32, 24)
    with pytest.raises(ModelConfigError, match="'freq'"):
        patch_of((32, 16), "freq", 24)
    # the identity ⟨x, w⟩ = ⟨resize(x), PI-resize(w)⟩ holds at a shape-keeping upsampled size too
    pe = FlexiPatchEmbed(4, (4, 2), "pi").double()
    x = torch.randn(3, 1, 4, 2, dtype=torch.float64)
    size = patch_of((4, 2), "both", 5)  # (10, 5)
    x_up = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    lhs = torch.einsum("nchw,dchw->nd", x, pe.proj.weight)
    torch.testing.assert_close(torch.einsum("nchw,dchw->nd", x_up, pe.kernel(size)), lhs, atol=1e-8, rtol=0)


def test_packed_patchify_equals_strided_conv():
    """The single-reshape packed patchify equals a strided conv, token j at (w = j // Hf, h = j % Hf)."""
    pe = _embed()
    frames = torch.randn(48, 30, dtype=torch.float64)  # (ΣT, F): one 48-frame clip, 30 bins (remainder dropped)
    packed = pe.forward_packed(frames, (12, 16))  # (Wt·Hf, D)
    conv = pe(frames.T[None, None], (12, 16))  # (1, D, Hf, Wt)
    expect = conv[0].permute(2, 1, 0).reshape(-1, conv.shape[1])  # (Wt·Hf, D) time-major
    torch.testing.assert_close(packed, expect)


def test_overlapping_stride_shape():
    pe = _embed(base=(16, 16))
    out = pe(torch.randn(2, 1, 128, 1024, dtype=torch.float64), stride=(10, 10))
    assert out.shape == (2, 6, 12, 101)


def test_resample_patch_embed_uses_the_asked_method_and_keeps_the_layer_mode():
    from flexast.model.patch_embed import resample_patch_embed

    pe = _embed(base=(8, 8), resize="none")
    w = pe.proj.weight.detach().clone()  # (D, 1, 8, 8)
    bil = resample_patch_embed(pe, (12, 4), "bilinear")
    torch.testing.assert_close(bil, F.interpolate(w, size=(12, 4), mode="bilinear", align_corners=False))
    pi = resample_patch_embed(pe, (16, 16), "pi")
    expect = (w.reshape(w.shape[0], -1) @ pi_resize_matrix((8, 8), (16, 16)).T.to(w.dtype)).view(-1, 1, 16, 16)
    torch.testing.assert_close(pi, expect)
    assert pe.resize == "none" and not pi.requires_grad
