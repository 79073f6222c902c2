"""``model export --to onnx``: onnxruntime on CPU gives the logits of the packed forward (``model predict``).

Peer: onnxruntime running the exported graph. Two lengths per model: one shorter than the positional table
and not a multiple of the patch, one longer than the table (the table is then interpolated to the clip).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flexast.model.ast import ASTModel
from flexast.model.checkpoint import load_checkpoint
from flexast.model.cli import main
from flexast.model.export_onnx import export_onnx
from flexast.model.predict import Predictor
from flexast.pipeline.batch import PackedBatch
from tests.factories import write_audio, write_model_folder
from tests.model.model_helpers import tiny_config

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MAX_FRAMES = 64


def _checkpoint(folder, pos, pool, seed=0):
    torch.manual_seed(seed)
    model = ASTModel(tiny_config(num_classes=4, max_frames=MAX_FRAMES, pos_embed=pos, pool=pool))
    return write_model_folder(folder, model, ["a", "b", "c", "d"], ["A", "B", "C", "D"], labels="multi")


def _packed_logits(model, x: torch.Tensor, patch) -> np.ndarray:
    """What ``model predict`` computes for one normalised ``(T, F)`` clip: trimmed to whole patches, packed."""
    keep = x.shape[0] // patch[1] * patch[1]
    batch = PackedBatch.from_clips([x[:keep]], torch.zeros(1, 4), ["clip"], patch)
    with torch.no_grad():
        return model(batch).numpy()


def _check(tmp_path, pos, pool, patch=None):
    ckpt = _checkpoint(tmp_path / "final", pos, pool)
    onnx_path, meta_path = export_onnx(ckpt, tmp_path / "onnx", patch)
    model = load_checkpoint(ckpt).eval()
    patch = patch or model.config.base_patch
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    for t in (MAX_FRAMES - 21, 3 * MAX_FRAMES + 5):  # inside the table and beyond it; neither a multiple of p_t
        x = torch.randn(t, 32, generator=g)  # (T, F)
        got = session.run(["logits"], {"fbank": x[None].numpy()})[0]
        np.testing.assert_allclose(got, _packed_logits(model, x, patch), atol=1e-4, rtol=0)
    return json.loads(meta_path.read_text())


def test_onnx_grid_cls_matches_torch_at_two_lengths(tmp_path):
    meta = _check(tmp_path, "grid", "cls")
    assert meta["norm"] == {"mean": -6.0, "std": 4.0} and meta["display_names"] == ["A", "B", "C", "D"]
    assert meta["fbank"]["num_mel_bins"] == 32 and meta["min_frames"] == 16


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pos", "pool", "patch"),
    [("factorized", "attn", None), ("grid", "mean", None), ("factorized", "cls_dist", None), ("grid", "attn", (8, 12))],
)
def test_onnx_matches_torch_for_every_position_layout_and_pooling(tmp_path, pos, pool, patch):
    _check(tmp_path, pos, pool, patch)


def test_onnx_cli_on_an_audio_file_gives_predicts_scores(tmp_path):
    ckpt = _checkpoint(tmp_path / "final", "factorized", "attn", seed=2)
    assert main(["export", "--checkpoint", str(ckpt), "--to", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    meta = json.loads((tmp_path / "onnx" / "model.json").read_text())
    predictor = Predictor(ckpt, "cpu")
    wav = write_audio(tmp_path / "a.wav", seconds=1.3, freq=660.0)
    x, _ = predictor.features(wav, meta["shift_ms"])  # (T, F): fbank and normalisation outside the graph
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    scores = 1 / (1 + np.exp(-session.run(None, {"fbank": x[None].astype(np.float32)})[0][0]))
    (want,) = predictor.predict([wav], top_k=4)
    order = np.argsort(-scores)
    assert [meta["display_names"][i] for i in order] == [d for _, d, _ in want.labels]
    np.testing.assert_allclose(scores[order], [s for _, _, s in want.labels], atol=1e-5)
