"""Kill-and-resume equals an uninterrupted run; checkpoints are atomic; weight averaging and EMA are exact."""

from __future__ import annotations

import json

import pytest
import torch

from flexast.model.averaging import EMA, average_checkpoints
from flexast.model.checkpoint import load_checkpoint, load_state_dict, save_checkpoint
from flexast.model.errors import CheckpointError
from flexast.model.evaluate import evaluate_phase
from flexast.model.run_dir import RunDir
from flexast.model.train import Trainer
from tests.factories import synthetic_clipset
from tests.model.model_helpers import tiny_config
from tests.model.train_helpers import tiny_run_config

PHASES = [
    {"method": "pool", "factor": 2, "steps": 5},
    {"method": "none", "factor": 1, "steps": 7, "recipe": "flexiast"},
]


def make_cfg(out):
    return tiny_run_config(
        out,
        {"name": "coarse_to_fine", "patch": [8, 8], "patch_sizes": [8, 16], "phases": PHASES},
        run={"ckpt_every": 2, "keep_last": 2},
        data={"loader": {"freq_mask": 4, "time_mask": 8}},
        model={"token_dropout": 0.2, "drop_path": 0.1},
        optim={"ema": 0.9, "schedule": "step", "steps_per_epoch": 3, "decay_start_epoch": 1},
    )


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    data = synthetic_clipset(n_clips=24, seed=3)
    full = Trainer(make_cfg(tmp_path / "full"), train_data=data)
    full.setup()
    full.train()
    full.cleanup()

    # A run killed after 8 updates (inside phase 2; last checkpoint at step 8) ...
    part = Trainer(make_cfg(tmp_path / "part"), train_data=data)
    part.setup()
    assert part.train(stop_after=9) == {"stopped_at": 9}  # step 9 is lost with the kill
    part.cleanup()
    ckpt = RunDir(tmp_path / "part").latest_step()
    assert ckpt.name == "step_00000008"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["phase"] == 1 and state["phase_step"] == 3
    # ... resumed from its checkpoint, finishes exactly like the uninterrupted run.
    resumed = Trainer(make_cfg(tmp_path / "part"), resume=True, train_data=data)
    resumed.setup()
    resumed.train()
    resumed.cleanup()
    assert resumed.state.step == full.state.step == 12
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in full.ema.shadow:
        torch.testing.assert_close(full.ema.shadow[k], resumed.ema.shadow[k], rtol=1e-5, atol=1e-6)
    # keep_last: only the two newest step checkpoints remain, and no temporary folder.
    names = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert [n for n in names if n.startswith("step_")] == ["step_00000010", "step_00000012"]
    assert not [n for n in names if n.startswith(".tmp")]


def test_checkpoint_files_load_without_pickle(tmp_path):
    data = synthetic_clipset(n_clips=12, seed=1)
    cfg = tiny_run_config(tmp_path, {"name": "ast", "patch": [8, 8]}, steps=2, run={"ckpt_every": 2})
    tr = Trainer(cfg, train_data=data)
    tr.setup()
    tr.train()
    tr.cleanup()
    ckpt = RunDir(tmp_path).latest_step()
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert {"optimizer", "torch_rng"} <= set(state)
    model = load_checkpoint(ckpt)
    assert (ckpt / "config.yaml").exists() and (ckpt / "labels.json").exists()
    torch.testing.assert_close(model.state_dict(), tr.model.state_dict())


def test_weight_averaging_and_ema_math(tmp_path):
    from flexast.model.ast import ASTModel

    def make(seed):
        torch.manual_seed(seed)
        return ASTModel(tiny_config(num_classes=3, n_mels=16, max_frames=32, embed_dim=8, depth=1, pool="mean"))

    models = [make(s) for s in range(3)]
    for i, m in enumerate(models):
        save_checkpoint(m, tmp_path / f"epoch_{i}" / "model.safetensors")
    target = make(9)
    average_checkpoints(target, [tmp_path / f"epoch_{i}" for i in range(3)])
    for k, v in target.state_dict().items():
        expected = sum(m.state_dict()[k].double() for m in models) / 3
        torch.testing.assert_close(v.double(), expected, rtol=1e-6, atol=1e-7)
    ema = EMA(models[0], decay=0.75)
    ema.update(models[1])
    k = "head.fc.weight"
    expected = 0.75 * models[0].state_dict()[k] + 0.25 * models[1].state_dict()[k]
    torch.testing.assert_close(ema.shadow[k], expected)
    with pytest.raises(CheckpointError, match="cannot average"):
        small = dict(num_classes=3, n_mels=16, max_frames=32, embed_dim=8, depth=1, pool="mean")
        other = ASTModel(tiny_config(**small, base_patch=(8, 16), tstride=16))
        save_checkpoint(other, tmp_path / "odd" / "model.safetensors")
        average_checkpoints(target, [tmp_path / "epoch_0", tmp_path / "odd"])


def test_epoch_checkpoints_are_averaged_at_the_end(tmp_path):
    data = synthetic_clipset(n_clips=12, seed=1)
    cfg = tiny_run_config(tmp_path, {"name": "ast", "patch": [8, 8]}, steps=0, optim={"epochs": 3, "average": [2, 3]})
    tr = Trainer(cfg, train_data=data, valid_data=synthetic_clipset(n_clips=6, seed=2))
    tr.setup()
    result = tr.train()
    tr.cleanup()
    epochs = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("epoch_"))
    assert epochs == ["epoch_0001", "epoch_0002", "epoch_0003"]
    assert "valid_averaged" in result and (tmp_path / "averaged" / "model.safetensors").exists()
    # the averaged weights' own held-out metrics, not the training weights' (evaluated here from the folder)
    valid = synthetic_clipset(n_clips=6, seed=2)
    for folder, key in (("averaged", "valid_averaged"), ("final", "valid")):
        again = evaluate_phase(load_checkpoint(tmp_path / folder), valid, data, cfg, tr.phases[-1], "cpu")
        for metric in ("mAP", "AUC", "top1"):
            assert again[metric] == pytest.approx(result[key][metric], rel=1e-5), (folder, metric)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows if r.get("split", "train") != "train"][-2:] == ["valid", "valid_averaged"]
    expected = {
        k: (
            load_state_dict(tmp_path / "checkpoints" / "epoch_0002")[k].double()
            + load_state_dict(tmp_path / "checkpoints" / "epoch_0003")[k].double()
        )
        / 2
        for k in ("head.fc.weight", "patch_embed.proj.weight")
    }
    averaged = load_state_dict(tmp_path / "averaged")
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k].double(), v, rtol=1e-6, atol=1e-7)
