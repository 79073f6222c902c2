"""The model: packing invariance under every CPU backend and pool, FlexiAST identity at the base patch, entry points."""

from __future__ import annotations

import pytest
import torch

from flexast.model import ASTModel, ModelConfig
from flexast.model.errors import ModelConfigError, ShapeError
from flexast.model.patch_embed import pi_resize_matrix
from tests.model.model_helpers import packed, tiny_config

# 8..96 frames at 32 bins: 4 to 48 tokens; 96 frames exceed max_frames=64, exercising table interpolation.
FRAMES = [8, 24, 64, 40, 96]


def _clips(frames=FRAMES, n_mels=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, n_mels, generator=g) for t in frames]


@pytest.mark.parametrize("backend", ["sdpa_loop", "padded"])
@pytest.mark.parametrize(
    "variant",
    [
        dict(pool="cls_dist", pos_embed="grid"),
        dict(pool="attn", pos_embed="factorized"),
        dict(pool="mean", pos_embed="grid"),
        dict(pool="cls", pos_embed="factorized", patch_resize="bilinear"),
    ],
    ids=["ast", "elasticast", "mean", "cls-bilinear"],
)
@pytest.mark.parametrize("patch", [(8, 8), (16, 8)])
def test_packing_invariance(backend, variant, patch):
    """A clip's logits are the same alone or packed with others (fp32, 1e-5)."""
    torch.manual_seed(0)
    model = ASTModel(tiny_config(attention=backend, **variant)).eval()
    clips = _clips()
    together = model(packed(clips, patch))
    for i, clip in enumerate(clips):
        alone = model(packed([clip], patch))
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)


def test_backends_agree_on_a_packed_batch():
    torch.manual_seed(0)
    model = ASTModel(tiny_config(pool="attn")).eval()
    batch = packed(_clips(), (8, 8))
    ref = model(batch)
    model.set_attention_backend("padded")
    torch.testing.assert_close(model(batch), ref, atol=1e-5, rtol=1e-5)


def test_pi_resize_at_base_patch_equals_unresized():
    """FlexiAST at patch 16 with PI-resize from base 16 equals the unresized model; the pinv there is I."""
    torch.testing.assert_close(pi_resize_matrix((16, 16), (16, 16)), torch.eye(256, dtype=torch.float64))
    torch.manual_seed(0)
    cfg = tiny_config(n_mels=32, max_frames=64, base_patch=(16, 16), fstride=16, tstride=16)
    flexi = ASTModel(cfg).eval()
    plain = ASTModel(ModelConfig.from_dict({**cfg.to_dict(), "patch_resize": "none"})).eval()
    plain.load_state_dict(flexi.state_dict())
    batch = packed(_clips([16, 48, 64]), (16, 16))
    torch.testing.assert_close(flexi(batch), plain(batch), atol=0, rtol=0)


def test_packed_equals_padded_without_overlap():
    """With stride = patch and a full-length input, the packed and classic paths are the same function."""
    torch.manual_seed(0)
    model = ASTModel(tiny_config()).eval()
    x = torch.randn(2, 64, 32)
    torch.testing.assert_close(model(packed(list(x), (8, 8))), model(x), atol=1e-5, rtol=1e-5)


def test_other_patch_sizes_and_embeddings():
    torch.manual_seed(0)
    model = ASTModel(tiny_config()).eval()
    batch = packed(_clips([48, 96]), (12, 12))
    logits, emb = model(batch, return_embeddings=True)
    assert logits.shape == (2, 5) and emb.shape == (2, 32)
    # the same frames re-patchified at (16, 16) through the patch argument (48 and 96 are multiples of 16)
    batch16 = packed(_clips([48, 96]), (16, 16))
    torch.testing.assert_close(model(batch, patch=(16, 16)), model(batch16), atol=1e-6, rtol=1e-6)
    with pytest.raises(ShapeError, match="multiples of p_t=10"):
        model(batch, patch=(10, 10))


def test_time_only_model_and_overlap_padded_path():
    torch.manual_seed(0)
    model = ASTModel(tiny_config(resize_axes="time", fstride=4, tstride=4)).eval()
    assert model(packed(_clips([40, 20]), (8, 20))).shape == (2, 5)
    with pytest.raises(ShapeError, match="pins the frequency"):
        model(packed(_clips([40]), (16, 20)))
    out = model(torch.randn(3, 64, 32))
    assert out.shape == (3, 5)
    assert model.config.grid == (7, 15)


def test_token_dropout_only_in_training_and_gradients_flow():
    torch.manual_seed(0)
    model = ASTModel(tiny_config(token_dropout=0.5, pool="attn", pos_embed="factorized", drop_path=0.1))
    batch = packed(_clips(), (8, 8))
    model.eval()
    a, b = model(batch), model(batch)
    torch.testing.assert_close(a, b)
    model.train()
    loss = model(batch).square().sum() + model(torch.randn(2, 64, 32)).square().sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_config_json_round_trip_and_errors():
    cfg = ModelConfig.preset("small", num_classes=35, base_patch=(16, 8), pool="attn", pos_embed="factorized")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (384, 12, 6)
    back = ModelConfig.from_json(cfg.to_json())
    assert back == cfg and back.base_patch == (16, 8)
    with pytest.raises(ModelConfigError) as err:
        ModelConfig(embed_dim=100, num_heads=3, pool="max", attention="fast")
    assert "embed_dim=100" in str(err.value) and "pool='max'" in str(err.value) and "attention='fast'" in str(err.value)
    with pytest.raises(ModelConfigError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"width": 3, "depht": 2})


def test_wrong_mel_bins_raise():
    model = ASTModel(tiny_config())
    with pytest.raises(ShapeError, match="mel bins"):
        model(packed([torch.randn(16, 40)], (8, 8)))
    with pytest.raises(ShapeError, match="padded input"):
        model(torch.randn(2, 64, 40))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["varlen", "flex", "padded", "sdpa_loop"])
def test_gpu_bf16_packed_matches_fp32_reference(backend):
    """On CUDA under bf16 autocast, every backend's logits and gradients track the fp32 CPU model."""
    if backend == "varlen" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("varlen needs sm80+")
    torch.manual_seed(0)
    cpu = ASTModel(tiny_config(attention="sdpa_loop", pool="attn", pos_embed="factorized"))
    gpu = ASTModel(tiny_config(attention=backend, pool="attn", pos_embed="factorized")).cuda()
    gpu.load_state_dict(cpu.state_dict())
    batch = packed(_clips(), (8, 8))
    ref = cpu(batch)
    ref.square().sum().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(batch.to("cuda"))
    out.float().square().sum().backward()
    torch.testing.assert_close(out.float().cpu(), ref.detach(), atol=5e-2, rtol=5e-2)
    g_ref = cpu.encoder.blocks[0].attn.qkv.weight.grad
    g_gpu = gpu.encoder.blocks[0].attn.qkv.weight.grad.cpu()
    assert torch.nn.functional.cosine_similarity(g_ref.flatten(), g_gpu.flatten(), dim=0) > 0.99


@pytest.mark.gpu
def test_gpu_auto_backend_and_pinv_cache_follow_device():
    torch.manual_seed(0)
    model = ASTModel(tiny_config()).cuda()
    batch = packed(_clips([16, 48, 64, 96]), (16, 16)).to("cuda")  # every clip at least one 16-frame patch
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(batch)
    expect = "varlen" if torch.cuda.get_device_capability()[0] >= 8 else "flex"
    assert model.attention_backend(torch.device("cuda"), torch.bfloat16) == expect
    assert all(k[2].type == "cuda" for k in model.patch_embed._pinv)
