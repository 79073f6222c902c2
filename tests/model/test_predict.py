"""``model predict`` on a mix of good and bad files: the good ones are labelled, the bad ones reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flexast.model.ast import ASTModel
from flexast.model.cli import main
from flexast.model.predict import Predictor, format_table
from tests.factories import write_audio, write_model_folder
from tests.model.model_helpers import tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = ASTModel(tiny_config(num_classes=3, n_mels=32, max_frames=128, embed_dim=16, depth=1, pool="mean"))
    folder = root / "final"
    return write_model_folder(folder, model, ["/m/a", "/m/b", "/m/c"], ["Alpha", "Beta", "Gamma"])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    good = [
        write_audio(d / "a.wav", seconds=1.0),
        write_audio(d / "b.flac", seconds=2.5, sr=22050, channels=2, freq=880.0),
        write_audio(d / "short.ogg", seconds=0.06, freq=300.0),  # fewer frames than one patch
    ]
    (d / "noise.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    (d / "text.wav").write_text("not audio")
    return good, [str(d / "noise.wav"), str(d / "text.wav"), str(d / "missing.wav")]


def test_mixed_good_and_bad_files(checkpoint, files, tmp_path):
    good, bad = files
    order = [good[0], bad[0], good[1], bad[1], bad[2], good[2]]
    emb = tmp_path / "emb.npy"
    results = Predictor(checkpoint, "cpu").predict(order, top_k=2, embeddings_out=emb)
    assert [r.path for r in results] == [str(p) for p in order]
    ok = [r for r in results if r.error is None]
    assert [r.path for r in ok] == [str(p) for p in good]
    for r in ok:
        assert len(r.labels) == 2 and r.labels[0][2] >= r.labels[1][2]
        assert {d for _, d, _ in r.labels} <= {"Alpha", "Beta", "Gamma"}
        assert r.tokens > 0
    assert sum(s for _, _, s in ok[0].labels) <= 1.0 + 1e-6  # softmax scores for a single-label model
    for r in results:
        if r.error is not None:
            assert r.error and r.path in map(str, bad)
    assert np.load(emb, allow_pickle=False).shape == (3, 16)
    table = format_table(results)
    assert "ERROR" in table and ("Alpha" in table or "Beta" in table or "Gamma" in table)


def test_patch_and_shift_change_the_token_count(checkpoint, files):
    p = Predictor(checkpoint, "cpu")
    base = p.predict([files[0][1]])[0]
    coarse = p.predict([files[0][1]], patch=(16, 16), shift_ms=20.0)[0]
    assert coarse.tokens < base.tokens / 4


def test_predict_cli_json(checkpoint, files, capsys):
    good, bad = files
    code = main(["predict", "--checkpoint", str(checkpoint), good[0], bad[2], "--json", "--top-k", "3"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out) == 2
    assert out[0]["top"][0]["display_name"] in {"Alpha", "Beta", "Gamma"} and "error" in out[1]
    assert main(["predict", "--checkpoint", str(checkpoint), bad[0]]) == 1  # nothing readable: failure status
