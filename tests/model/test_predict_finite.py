"""Issue 12 item 3: ``model predict --json`` never writes a bare NaN; non-finite scores become error entries."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf
import torch

from flexast.model.ast import ASTModel
from flexast.model.checkpoint import save_checkpoint
from flexast.model.cli import main
from tests.factories import tone_array, write_audio
from tests.model.model_helpers import tiny_config


def refuse(name):
    raise ValueError(f"bare {name} in JSON")


def save(model, folder):
    save_checkpoint(model, folder / "model.safetensors")
    info = {"names": ["a", "b"], "display_names": ["A", "B"], "labels": "single", "stats": {"10.0": [-6.0, 4.0]}}
    (folder / "labels.json").write_text(json.dumps({**info, "norm": [], "features": {}, "sample_rate": 16000}))
    return folder


def test_predict_json_has_no_bare_nan(tmp_path, capsys):
    torch.manual_seed(0)
    model = ASTModel(tiny_config(num_classes=2, n_mels=32, max_frames=128, embed_dim=16, depth=1, pool="mean"))
    good = save(model, tmp_path / "good")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    poisoned = save(model, tmp_path / "nan")
    clip = write_audio(tmp_path / "a.wav", seconds=0.5)
    loud = tone_array(0.5)
    loud[100] = 1e30
    sf.write(tmp_path / "loud.wav", loud, 16000, subtype="FLOAT")

    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(good), "--json", clip, str(tmp_path / "loud.wav")]) == 0
    ok, loud_result = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert "error" not in ok and all(np.isfinite(t["score"]) for t in ok["top"])
    assert "NaN/Inf" in loud_result["error"] and "top" not in loud_result

    assert main(["predict", "--checkpoint", str(poisoned), "--json", clip]) == 1  # nothing could be labelled
    captured = capsys.readouterr()
    (result,) = json.loads(captured.out, parse_constant=refuse)
    assert result["path"] == clip and "NaN/Inf scores" in result["error"]
    assert "1 of 1 files" in captured.err
