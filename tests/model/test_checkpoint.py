"""Our checkpoint format: safetensors + JSON config, round trip, no pickle anywhere on the load path."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch

from flexast.model import ASTModel, load_checkpoint, load_state_dict, read_config, save_checkpoint
from flexast.model.errors import CheckpointError
from tests.model.model_helpers import packed, tiny_config


def test_round_trip_without_pickle(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = tiny_config(pool="attn", pos_embed="factorized", base_patch=(8, 4))
    model = ASTModel(cfg).eval()
    path = save_checkpoint(model, tmp_path / "ckpt", extra={"step": 7})
    assert path.name == "ckpt.safetensors"
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])  # safetensors: u64 length + JSON header
    assert json.loads(header["__metadata__"]["model_config"]) == cfg.to_dict()
    assert json.loads(path.with_suffix(".json").read_text())["step"] == "7"

    def no_pickle(*a, **k):
        raise AssertionError("the checkpoint load path must not unpickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    back = load_checkpoint(path)
    assert read_config(path) == cfg
    batch = packed([torch.randn(16, 32), torch.randn(40, 32)], (8, 8))
    torch.testing.assert_close(back.eval()(batch), model(batch), atol=0, rtol=0)


def test_not_ours_and_missing(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a flexast checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_foreign_torch_files_use_weights_only(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.pth")
    assert torch.equal(load_state_dict(tmp_path / "ok.pth")["w"], torch.ones(2))
    torch.save({"w": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict(tmp_path / "evil.pth")
