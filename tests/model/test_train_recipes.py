"""Every recipe trains a few steps on tiny data and lowers the loss; coarse-to-fine moves shapes; KD runs."""

from __future__ import annotations

import json

import pytest
import torch

from flexast.model.ast import ASTModel
from flexast.model.checkpoint import load_checkpoint
from flexast.model.losses import kd_loss, supervised_loss
from flexast.model.recipes import transfer
from flexast.model.train import Trainer
from tests.factories import synthetic_clipset
from tests.model.model_helpers import tiny_config
from tests.model.train_helpers import mean_loss, tiny_run_config

RECIPES = {
    "ast_packed": ({"name": "ast", "patch": [8, 8]}, {}),
    "ast_padded": (
        {"name": "ast", "patch": [8, 8]},
        {"data": {"loader": {"max_frames": None, "target_frames": 64}}, "model": {"fstride": 4, "tstride": 4}},
    ),
    "flexiast": ({"name": "flexiast", "patch_sizes": [8, 12, 16]}, {}),
    "flexiast_time_only": ({"name": "flexiast", "patch_sizes": [8, 12, 16], "time_only": True}, {}),
    "elasticast_random": (
        {"name": "elasticast", "patch": [8, 8]},
        {
            "data": {"loader": {"resolution": {"kind": "random", "shifts_ms": [10, 20, 40]}}},
            "model": {"pos_embed": "factorized", "pool": "attn", "token_dropout": 0.1},
        },
    ),
    "elasticast_pool": (
        {"name": "elasticast", "patch": [8, 8]},
        {
            "data": {"loader": {"resolution": {"kind": "pool", "pool_factors": [1, 2], "pool_mode": "max"}}},
            "model": {"pos_embed": "factorized"},
        },
    ),
}


@pytest.fixture(scope="module")
def data():
    return synthetic_clipset(n_clips=32, seed=0)


def run(cfg, data, valid=None):
    tr = Trainer(cfg, train_data=data, valid_data=valid)
    tr.setup()
    before = mean_loss(tr.model, data)
    result = tr.train()
    tr.cleanup()
    return tr, before, mean_loss(tr.model, data), result


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_lowers_the_loss(name, data, tmp_path):
    recipe, sections = RECIPES[name]
    cfg = tiny_run_config(tmp_path, recipe, steps=20, **sections)
    tr, before, after, result = run(cfg, data, valid=synthetic_clipset(n_clips=8, seed=5))
    assert after < before - 0.2, (name, before, after)
    assert result["steps"] == 20 and result["flops"] > 0
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "report.md").exists()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("split") == "valid" for r in rows) and any("tokens_per_s" in r for r in rows)
    if name.startswith("flexiast"):
        tr.loader.set_epoch(tr.loader.epoch + 1)  # fresh epochs (the run ended exactly at an epoch's end)
        drawn = {tuple(b.patch) for _ in range(3) for b in tr.loader}  # the loader draws patches per step
        assert len(drawn) >= 2 and {p[1] for p in drawn} <= {8, 12, 16}
        assert tr.model.patch_embed.base_patch == (8, 8)  # base kernel stays; other sizes are PI-resized


def test_coarse_to_fine_moves_kernel_and_positions(data, tmp_path):
    phases = [
        {"method": "patch", "factor": 2, "steps": 6, "transfer": "pi"},
        {"method": "pool", "factor": 2, "steps": 6, "pool_mode": "avg"},
        {"method": "fshift", "factor": 2, "steps": 6, "recipe": "flexiast"},
        {"method": "none", "factor": 1, "steps": 8},
    ]
    cfg = tiny_run_config(
        tmp_path,
        {"name": "coarse_to_fine", "patch": [8, 8], "patch_sizes": [8], "phases": phases},
    )
    tr = Trainer(cfg, train_data=data)
    tr.setup()
    shapes = []
    real_enter = tr._start_phase

    def spy(index, ckpt):
        real_enter(index, ckpt)
        m = tr.model
        shapes.append((tuple(m.patch_embed.proj.weight.shape[-2:]), m.config.max_frames, tuple(m.pos_embed.grid)))

    tr._start_phase = spy
    shapes.append(
        (tuple(tr.model.patch_embed.proj.weight.shape[-2:]), tr.model.config.max_frames, tuple(tr.model.pos_embed.grid))
    )
    before = mean_loss(tr.model, data, patch=(8, 16))
    tr.train()
    tr.cleanup()
    # phase 1: kernel (8, 16), full length; pool/fshift: kernel (8, 8), a grid half as long; last: full grid.
    assert shapes[0] == ((8, 16), 64, (4, 4))
    assert shapes[1] == ((8, 8), 32, (4, 4))
    assert shapes[2] == ((8, 8), 32, (4, 4))
    assert shapes[3] == ((8, 8), 64, (4, 8))
    assert tr.state.step == 26
    assert mean_loss(tr.model, data) < before
    for i in range(1, 5):
        assert (tmp_path / f"phase{i}" / "model.safetensors").exists()


def test_kernel_transfer_is_exact_for_pi_upsampling():
    """Moving the kernel 8×8 → 8×16 with PI-resize keeps ⟨x, w⟩ = ⟨resize(x), ŵ⟩ (FlexiAST identity)."""

    src = ASTModel(tiny_config(num_classes=3, embed_dim=16, depth=1, pool="mean"))
    dst = ASTModel(tiny_config(num_classes=3, embed_dim=16, depth=1, base_patch=(8, 16), tstride=16, pool="mean"))
    transfer(src, dst, "pi")
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    up = torch.nn.functional.interpolate(x, size=(8, 16), mode="bilinear", align_corners=False)
    w0 = src.patch_embed.proj.weight.double()
    w1 = dst.patch_embed.proj.weight.double()
    assert torch.allclose(torch.einsum("nchw,dchw->nd", x, w0), torch.einsum("nchw,dchw->nd", up, w1), atol=1e-5)
    assert torch.equal(src.encoder.blocks[0].attn.qkv.weight, dst.encoder.blocks[0].attn.qkv.weight)


def test_kd_with_a_frozen_teacher(data, tmp_path):
    teacher_cfg = tiny_run_config(tmp_path / "teacher", {"name": "ast", "patch": [8, 8]}, steps=15)
    Trainer_run = run(teacher_cfg, data)
    teacher_dir = tmp_path / "teacher" / "final"
    teacher_before = load_checkpoint(teacher_dir).state_dict()
    cfg = tiny_run_config(
        tmp_path / "student",
        {
            "name": "flexiast",
            "patch_sizes": [8, 12, 16],
            "kd": {"teacher": str(teacher_dir), "temperature": 2.0, "alpha": 0.5, "teacher_patch": [8, 8]},
        },
        steps=20,
    )
    tr, before, after, _ = run(cfg, data)
    assert Trainer_run[0].state.step == 15
    assert after < before
    assert tr.teacher is not None and not any(p.requires_grad for p in tr.teacher.parameters())
    for k, v in tr.teacher.state_dict().items():  # the teacher stayed frozen
        assert torch.equal(v.cpu(), teacher_before[k]), k


def test_loss_identities():
    z = torch.randn(6, 5)
    assert kd_loss(z, z, 2.0, "ce").abs() < 1e-6
    assert kd_loss(z, z, 3.0, "bce").abs() < 1e-6
    t = torch.randn(6, 5)
    p_t = torch.softmax(t / 2, 1)
    ref = (p_t * (torch.log_softmax(t / 2, 1) - torch.log_softmax(z / 2, 1))).sum(1).mean() * 4
    assert torch.allclose(kd_loss(z, t, 2.0, "ce"), ref, atol=1e-6)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    assert torch.allclose(supervised_loss(z, y, "ce"), torch.nn.functional.cross_entropy(z, y))
    onehot = torch.nn.functional.one_hot(y, 5).float()
    assert torch.allclose(supervised_loss(z, onehot, "ce"), torch.nn.functional.cross_entropy(z, y), atol=1e-6)
    assert torch.allclose(supervised_loss(z, y, "bce"), supervised_loss(z, onehot, "bce"))


@pytest.mark.gpu
def test_cuda_bf16_autocast_training(data, tmp_path):
    """On CUDA the loop runs under bf16 autocast (varlen attention when available) and still learns."""
    recipe, sections = RECIPES["elasticast_random"]
    cfg = tiny_run_config(tmp_path, recipe, steps=20, run={"device": "cuda"}, **sections)
    tr = Trainer(cfg, train_data=data)
    tr.setup()
    assert tr.device.type == "cuda"
    before = mean_loss(tr.model.float().cpu(), data)
    tr.model.cuda()
    tr.train()
    tr.cleanup()
    assert mean_loss(tr.model.float().cpu(), data) < before
