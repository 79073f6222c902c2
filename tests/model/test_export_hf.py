"""``model export --to hf``: transformers loads the folder, its pipeline labels audio files as ``model predict`` does.

Peer: transformers' own ``ASTForAudioClassification`` and ``pipeline("audio-classification")`` (numpy feature
path, no torchaudio). Models are tiny and local; no network.
"""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from flexast.model import from_hf
from flexast.model.ast import ASTModel
from flexast.model.checkpoint import load_checkpoint
from flexast.model.cli import main
from flexast.model.convert import to_hf
from flexast.model.errors import ConversionError
from flexast.model.export_hf import export_hf
from flexast.model.predict import Predictor
from flexast.pipeline.batch import PackedBatch
from tests.factories import broadband_clip, tone_clip, write_model_folder
from tests.model.model_helpers import tiny_config

MAX_FRAMES = 96
SAMPLES = 400 + (MAX_FRAMES - 1) * 160  # exactly MAX_FRAMES 10 ms frames: no padding or cut on either side
DISPLAY = ["Alpha tone", "Beta noise", "Gamma chirp", "Delta hum"]


def _checkpoint(folder, pos="grid", pool="cls_dist", features=None, seed=0):
    torch.manual_seed(seed)
    model = ASTModel(
        tiny_config(num_classes=4, n_mels=32, max_frames=MAX_FRAMES, embed_dim=32, pos_embed=pos, pool=pool)
    )
    with torch.no_grad():
        model.head.fc.weight.mul_(50.0)  # spread the logits: a top-1 decided by more than rounding
    names = ["/m/a", "/m/b", "/m/c", "/m/d"]
    stats = {"10.0": [-6.0, 4.0], "20.0": [-5.0, 3.0]}
    return write_model_folder(folder, model, names, DISPLAY, stats=stats, features=features)


@pytest.fixture(scope="module")
def hf_pipeline(hf_ast):
    """transformers' ``pipeline`` function, imported with torchvision hidden (see ``hf_ast``)."""
    sys.modules["torchvision"] = None
    try:
        from transformers import pipeline
    finally:
        sys.modules.pop("torchvision", None)
    return pipeline


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    """A loud low tone, a faint high tone, white noise and a broadband mix: the tiny model labels them apart."""
    d = tmp_path_factory.mktemp("audio")
    seconds = SAMPLES / 16000
    waves = [
        tone_clip(seconds, 150.0, amplitude=0.8).numpy(),
        tone_clip(seconds, 5000.0, amplitude=0.05).numpy(),
        (0.3 * np.random.default_rng(0).standard_normal(SAMPLES)).astype(np.float32),
        broadband_clip(seconds, seed=1).numpy(),
    ]
    paths = []
    for i, wave in enumerate(waves):
        path = d / f"clip{i}.wav"
        sf.write(path, wave[:SAMPLES], 16000, subtype="FLOAT")
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("pos", ["grid", "factorized"])
@pytest.mark.parametrize("patch", [None, 16, 12])
def test_hf_logits_equal_the_packed_forward_on_the_same_fbank(tmp_path, hf_ast, pos, patch):
    ckpt = _checkpoint(tmp_path / "final", pos)
    files = export_hf(ckpt, tmp_path / "hf", patch)
    assert sorted(f.name for f in files) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    hf = hf_ast.ASTForAudioClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == dict(enumerate(DISPLAY))
    ours = load_checkpoint(ckpt).eval()
    p = (patch, patch) if patch else ours.config.base_patch
    x = torch.randn(3, MAX_FRAMES, 32, generator=torch.Generator().manual_seed(1))  # (B, T, F) normalised fbank
    batch = PackedBatch.from_clips(list(x), torch.zeros(3, 4), ["a", "b", "c"], p)
    with torch.no_grad():
        want = ours(batch)  # what `model predict` runs: packed, own length, patch p
        got = hf(input_values=x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("patch", [None, 16])
def test_hf_pipeline_top1_equals_model_predict_on_audio_files(tmp_path, hf_pipeline, audio_files, patch):
    ckpt = _checkpoint(tmp_path / "final", "factorized")
    main(
        ["export", "--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]
        + (["--patch", str(patch)] if patch else [])
    )
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert (pre["mean"], pre["std"], pre["max_length"], pre["num_mel_bins"]) == (-6.0, 4.0, MAX_FRAMES, 32)
    clf = hf_pipeline("audio-classification", model=str(tmp_path / "hf"), device="cpu")
    ours = Predictor(ckpt, "cpu").predict(audio_files, patch=(patch, patch) if patch else None, top_k=4)
    tops = []
    for path, mine in zip(audio_files, ours, strict=True):
        wave, sr = sf.read(path, dtype="float32")
        theirs = clf({"raw": wave, "sampling_rate": sr}, top_k=4)
        assert theirs[0]["label"] == mine.labels[0][1], (path, theirs, mine.labels)
        assert [t["label"] for t in theirs] == [d for _, d, _ in mine.labels]
        np.testing.assert_allclose([t["score"] for t in theirs], [s for _, _, s in mine.labels], atol=1e-3)
        tops.append(mine.labels[0][1])
    assert len(set(tops)) > 1, f"every file got the same top label {tops}: the comparison would not discriminate"


@pytest.mark.parametrize(("pool", "word"), [("attn", "attention"), ("mean", "mean"), ("cls", "one [CLS]")])
def test_pooling_hf_cannot_represent_is_refused_and_points_to_onnx(tmp_path, pool, word):
    ckpt = _checkpoint(tmp_path / "final", pool=pool)
    with pytest.raises(ConversionError, match=rf"pool='{pool}'.*{re.escape(word)}.*--to onnx") as err:
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists(), str(err.value)
    assert main(["export", "--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2


def test_fbank_options_hf_cannot_compute_are_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "final", features={"window_type": "povey", "low_freq": 0.0})
    with pytest.raises(ConversionError, match=r"window_type='povey'.*low_freq=0.0"):
        export_hf(ckpt, tmp_path / "hf")


def test_to_hf_and_from_hf_round_trip():
    torch.manual_seed(0)
    model = ASTModel(tiny_config(fstride=6, tstride=5, norm_eps=1e-12))
    back = from_hf(to_hf(model), model.config)
    want = model.state_dict()
    assert set(back.state_dict()) == set(want)
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k
