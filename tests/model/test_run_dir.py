"""The run folder has one owner: every path, and each file written once per checkpoint, atomically."""

from __future__ import annotations

import json

import torch

from flexast.model import ASTModel
from flexast.model import run_dir as run_dir_module
from flexast.model.checkpoint import load_checkpoint, save_checkpoint
from flexast.model.config import from_dict
from flexast.model.run_dir import RunDir, TrainState, load_train_extra, load_train_state, read_labels
from tests.model.model_helpers import tiny_config

LABELS = {"names": ["a", "b", "c", "d", "e"], "display_names": ["A", "B", "C", "D", "E"], "labels": "single"}


def test_a_step_checkpoint_holds_each_file_once(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    cfg = from_dict({"run": {"out_dir": str(run.root)}})
    model = ASTModel(tiny_config())
    written = []
    real = run_dir_module.save_config
    monkeypatch.setattr(run_dir_module, "save_config", lambda c, path: (written.append(path.name), real(c, path)))
    opt = torch.optim.Adam(model.parameters())
    state = TrainState(step=7, phase=1, phase_step=3, epoch=2, loader={"pos": 5}, flops=1.5, tokens=99)
    path = run.save_step(state, model, cfg, LABELS, {"optimizer": opt.state_dict()}, torch.device("cpu"))
    assert path == run.checkpoints / "step_00000007" == run.latest_step()
    assert sorted(p.name for p in path.iterdir()) == [
        "config.yaml",
        "labels.json",
        "model.json",
        "model.safetensors",
        "state.json",
        "train_state.pt",
    ]
    assert written == ["config.yaml"]  # once per checkpoint
    assert load_train_state(path) == state
    assert set(load_train_extra(path)) == {"optimizer", "torch_rng"}
    torch.testing.assert_close(load_checkpoint(path).state_dict(), model.state_dict(), rtol=0, atol=0)
    assert read_labels(path) == LABELS


def test_keep_last_and_unfinished_folders(tmp_path):
    run = RunDir(tmp_path)
    cfg, model = from_dict({}), ASTModel(tiny_config())
    extra = {"optimizer": {}}
    for step in (1, 2, 3, 4):
        run.save_step(TrainState(step=step), model, cfg, {}, extra, torch.device("cpu"), keep_last=2)
    (run.checkpoints / ".tmp-step_00000005").mkdir()  # a kill in the middle of writing step 5
    (run.checkpoints / "step_00000006").mkdir()  # a folder without state.json is not complete
    assert [p.name for p in run.step_checkpoints()] == ["step_00000003", "step_00000004", "step_00000006"]
    assert run.latest_step() == run.step(4)


def test_paths_and_labels_beside_or_above_the_weights(tmp_path):
    run = RunDir(tmp_path)
    assert run.epoch(3) == tmp_path / "checkpoints" / "epoch_0003" and run.phase(0) == tmp_path / "phase1"
    model = ASTModel(tiny_config())
    for e in (1, 3):
        run.save_weights(run.epoch(e), model, from_dict({}), LABELS)
    assert run.epochs(1, 4) == [run.epoch(1), run.epoch(3)]
    save_checkpoint(model, tmp_path / "bare" / "model.safetensors")
    assert read_labels(tmp_path / "bare") == {}
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    assert read_labels(tmp_path / "bare" / "model.safetensors")["names"] == LABELS["names"]
    run.remove()
    assert not tmp_path.exists()


def test_a_state_written_with_the_old_stage_names_resumes_as_phases(tmp_path):
    """Checkpoints from before the rename ("stage" → "phase") hold the same counters under the old keys."""
    old = {"step": 9, "stage": 1, "stage_step": 4, "epoch": 3, "loader": {"pos": 2, "stage_first_epoch": 2}}
    (tmp_path / "state.json").write_text(json.dumps({**old, "flops": 2.0, "tokens": 10}))
    want = TrainState(
        step=9, phase=1, phase_step=4, epoch=3, loader={"pos": 2, "phase_first_epoch": 2}, flops=2.0, tokens=10
    )
    assert load_train_state(tmp_path) == want
