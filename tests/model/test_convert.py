"""Converters: HF transformers AST (both key layouts), the official AST layout, timm DeiT/ViT ImageNet init."""

from __future__ import annotations

import re

import pytest
import torch

from flexast.model import ModelConfig, from_hf, from_official_ast, from_timm, to_official_ast
from flexast.model.ast import ASTModel
from flexast.model.errors import ConversionError
from tests.model.model_helpers import tiny_hf_ast

_V5_TO_V4 = [
    (r"\.layers\.(\d+)\.", r".encoder.layer.\1."),
    (r"attention\.q_proj", "attention.attention.query"),
    (r"attention\.k_proj", "attention.attention.key"),
    (r"attention\.v_proj", "attention.attention.value"),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
]
_V4_TO_V5 = [
    (r"\.encoder\.layer\.(\d+)\.", r".layers.\1."),
    (r"attention\.attention\.query", "attention.q_proj"),
    (r"attention\.attention\.key", "attention.k_proj"),
    (r"attention\.attention\.value", "attention.v_proj"),
    (r"attention\.output\.dense", "attention.o_proj"),
    (r"intermediate\.dense", "mlp.fc1"),
    (r"(layer\.\d+|layers\.\d+)\.output\.dense", r"\1.mlp.fc2"),
]


def _rename(sd, rules):
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


@pytest.fixture(scope="module")
def hf_model(hf_ast):
    """A randomly initialised small ASTForAudioClassification (every parameter random, tokens included)."""
    model = tiny_hf_ast(hf_ast, frequency_stride=6, time_stride=5, max_length=60)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and "layernorm" in str(p.shape) else 0.0))
    return model


def _hf_logits(model, x):
    with torch.no_grad():
        return model(input_values=x).logits


def test_from_hf_current_layout_equal_logits(hf_model):
    x = torch.randn(3, 60, 32)
    ours = from_hf(hf_model.state_dict(), hf_model.config).eval()
    assert ours.config.norm_eps == hf_model.config.layer_norm_eps
    torch.testing.assert_close(ours(x), _hf_logits(hf_model, x), atol=1e-5, rtol=1e-5)


def test_from_hf_other_layout_equal_logits(hf_model):
    """The key layout the installed transformers lacks (4.x hub names if 5.x is installed, or vice versa)."""
    sd = hf_model.state_dict()
    v5 = any(".layers.0." in k for k in sd)
    other = _rename(sd, _V5_TO_V4 if v5 else _V4_TO_V5)
    assert any(("encoder.layer.0.attention.attention.query" if v5 else "layers.0.attention.q_proj") in k for k in other)
    x = torch.randn(2, 60, 32)
    ours = from_hf(other, hf_model.config).eval()
    torch.testing.assert_close(ours(x), _hf_logits(hf_model, x), atol=1e-5, rtol=1e-5)


def test_from_hf_reports_unknown_keys(hf_model):
    sd = dict(hf_model.state_dict())
    sd["audio_spectrogram_transformer.something.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="something"):
        from_hf(sd, hf_model.config)


def _official_config(**kw):
    base = dict(num_classes=4, n_mels=32, max_frames=60, embed_dim=32, depth=2, num_heads=2)
    base.update(base_patch=(8, 8), fstride=6, tstride=5)
    return ModelConfig(**{**base, **kw})


def test_official_ast_round_trip():
    torch.manual_seed(1)
    model = ASTModel(_official_config()).eval()
    sd = to_official_ast(model)
    assert "module.v.pos_embed" in sd and "module.mlp_head.1.weight" in sd and "module.v.blocks.1.attn.qkv.weight" in sd
    # the official files also carry timm DeiT's unused ImageNet heads
    sd.update({"module.v.head.weight": torch.zeros(1000, 32), "module.v.head_dist.bias": torch.zeros(1000)})
    back = from_official_ast(sd, fstride=6, tstride=5, input_tdim=60, n_mels=32, num_heads=2).eval()
    x = torch.randn(2, 60, 32)
    torch.testing.assert_close(back(x), model(x), atol=0, rtol=0)


def test_official_ast_shorter_input_cuts_time_centre():
    """Loading at a shorter input_tdim cuts the centre of the time grid (AST's rule), by hand."""
    torch.manual_seed(2)
    model = ASTModel(_official_config()).eval()  # grid (5, 11)
    short = from_official_ast(to_official_ast(model), fstride=6, tstride=5, input_tdim=40, n_mels=32, num_heads=2)
    assert short.config.grid == (5, 7)
    grid = model.pos_embed.weight[0, 2:].reshape(5, 11, 32)  # (H, W, D)
    start = int(11 / 2) - int(7 / 2)
    expect = grid[:, start : start + 7].reshape(35, 32)
    torch.testing.assert_close(short.pos_embed.weight[0, 2:], expect)
    # and the long model run on a short input applies the same rule on the fly
    x = torch.randn(2, 40, 32)
    torch.testing.assert_close(short.eval()(x), model(x), atol=1e-6, rtol=1e-6)


def _lin_interp_rows(t, n):
    """Hand-written linear resize (align_corners=False) along dim 0 of ``t``."""
    m = t.shape[0]
    rows = []
    for i in range(n):
        src = max((i + 0.5) * m / n - 0.5, 0.0)
        lo = min(int(src), m - 1)
        hi = min(lo + 1, m - 1)
        w = src - lo
        rows.append((1 - w) * t[lo] + w * t[hi])
    return torch.stack(rows)


def _deit_state_dict(d=32, depth=2, g=10, dist=True, seed=3):
    torch.manual_seed(seed)
    donor = ASTModel(_official_config(embed_dim=d, depth=depth)).encoder.state_dict()
    sd = {f"{k}": torch.randn_like(v) for k, v in donor.items()}
    sd["patch_embed.proj.weight"] = torch.randn(d, 3, 8, 8)
    sd["patch_embed.proj.bias"] = torch.randn(d)
    sd["cls_token"] = torch.randn(1, 1, d)
    n_prefix = 1
    if dist:
        sd["dist_token"] = torch.randn(1, 1, d)
        sd["head_dist.weight"] = torch.randn(10, d)
        n_prefix = 2
    sd["pos_embed"] = torch.randn(1, n_prefix + g * g, d)
    sd["head.weight"], sd["head.bias"] = torch.randn(10, d), torch.randn(10)
    return sd


def test_from_timm_deit_grid_by_hand():
    sd = _deit_state_dict()
    config = _official_config(fstride=4, tstride=4)  # grid (7, 14): freq cut from 10, time interpolated from 10
    assert config.grid == (7, 14)
    model = from_timm(sd, config)
    torch.testing.assert_close(model.patch_embed.proj.weight, sd["patch_embed.proj.weight"].mean(1, keepdim=True))
    torch.testing.assert_close(model.dist_token, sd["dist_token"])
    grid = sd["pos_embed"][0, 2:].reshape(10, 10, 32)  # (H, W, D)
    start = int(10 / 2) - int(7 / 2)
    cut = grid[start : start + 7]  # (7, 10, D)
    expect = torch.stack([_lin_interp_rows(row, 14) for row in cut])  # (7, 14, D)
    torch.testing.assert_close(model.pos_embed.weight[0, 2:], expect.reshape(-1, 32), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.pos_embed.weight[0, :2], sd["pos_embed"][0, :2])
    torch.testing.assert_close(model.encoder.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])
    assert model.head.fc.weight.shape == (4, 32)


def test_from_timm_vit_without_dist_and_sum_kernels():
    sd = _deit_state_dict(dist=False)
    model = from_timm(sd, _official_config(), rgb="sum")
    torch.testing.assert_close(model.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.dist_token, sd["cls_token"])
    torch.testing.assert_close(model.pos_embed.weight[0, 1], sd["pos_embed"][0, 0])


def test_from_timm_factorized_tables_by_hand():
    """ElasticAST: the 2D grid averaged along each axis, then cut (freq) or interpolated (time)."""
    sd = _deit_state_dict()
    config = _official_config(fstride=4, tstride=4, pos_embed="factorized", pool="attn")
    model = from_timm(sd, config)
    grid = sd["pos_embed"][0, 2:].reshape(10, 10, 32)  # (H, W, D)
    freq = grid.mean(1)[2:9]  # centre 7 of 10
    time = _lin_interp_rows(grid.mean(0), 14)
    torch.testing.assert_close(model.pos_embed.freq, freq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.pos_embed.time, time, atol=1e-6, rtol=1e-6)


def test_from_hf_guesses_config_from_weights(hf_ast):
    """With no config, HF's defaults are assumed (128 bins, strides 10, eps 1e-12, D/64 heads)."""
    cfg = hf_ast.ASTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=96, max_length=100, num_labels=3
    )
    torch.manual_seed(4)
    model = hf_ast.ASTForAudioClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = from_hf(model.state_dict()).eval()
    # max_length is only known up to the stride: any length with the same (12, 9) token grid is equivalent
    assert (ours.config.grid, ours.config.fstride, ours.config.num_classes) == ((12, 9), 10, 3)
    x = torch.randn(2, 100, 128)
    torch.testing.assert_close(ours(x), _hf_logits(model, x), atol=1e-5, rtol=1e-5)
