"""The HEAR API: hearvalidator's checks (attributes, shapes, dtypes, constant hop ≤ 50 ms), batch independence,
and the scene embedding equal to ``model predict --embeddings`` on the same file.

hearvalidator 2021.0.2 (the only release) imports tensorflow at module level, which this environment does
not have; its torch checks are restated here from its ``validate.py`` (``check_sample_rate``,
``check_embedding_size``, ``torch_timestamp_embeddings``, ``torch_scene_embeddings``).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from flexast.model import hear
from flexast.model.ast import ASTModel
from flexast.model.checkpoint import save_checkpoint
from flexast.model.errors import ModelConfigError, ShapeError
from flexast.model.predict import Predictor
from flexast.pipeline.audio import load_audio
from tests.factories import write_audio
from tests.model.model_helpers import tiny_config
from tests.tolerances import assert_close_ulps


@pytest.fixture(scope="module", params=[("grid", "cls"), ("factorized", "attn")])
def checkpoint(request, tmp_path_factory):
    pos, pool = request.param
    folder = tmp_path_factory.mktemp("hear") / "final"
    torch.manual_seed(0)
    model = ASTModel(tiny_config(num_classes=3, max_frames=128, pos_embed=pos, pool=pool))
    save_checkpoint(model, folder / "model.safetensors")
    info = {"names": ["a", "b", "c"], "labels": "multi", "stats": {"10.0": [-6.0, 4.0]}, "norm": [], "features": {}}
    (folder / "labels.json").write_text(json.dumps({**info, "sample_rate": 16000}))
    return folder


def _validate_like_hearvalidator(module, model_file_path: str):
    """hearvalidator's torch path, check by check; returns the model and the timestamps it produced."""
    model = module.load_model(model_file_path)
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate in [16000, 22050, 44100, 48000]
    assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)

    num_audio, length = 16, 2.0
    audio_batch = torch.rand((num_audio, int(length * model.sample_rate))) * 2 - 1.0
    embeddings, timestamps = module.get_timestamp_embeddings(audio_batch, model)
    assert embeddings.dtype == torch.float32
    assert embeddings.shape[0] == num_audio
    assert embeddings.shape[:2] == timestamps.shape
    assert embeddings.shape[2] == model.timestamp_embedding_size
    timestamp_diff = torch.diff(timestamps)
    average_diff = torch.mean(timestamp_diff.float())
    assert average_diff <= 50.0, f"hop {average_diff} ms > 50 ms (hearvalidator warns)"
    assert torch.all(torch.abs(timestamp_diff - average_diff) < 1e-3)

    audio_batch = torch.rand((num_audio, int(length * model.sample_rate))) * 2 - 1.0
    scene = module.get_scene_embeddings(audio_batch, model)
    assert scene.dtype == torch.float32
    assert scene.shape == (num_audio, model.scene_embedding_size)
    return model, timestamps


def test_hearvalidator_checks(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # hearvalidator only warns about a hop > 50 ms: make it fail here
        model, timestamps = _validate_like_hearvalidator(hear, str(checkpoint))
    assert model.scene_embedding_size == 32 and model.timestamp_embedding_size == 32
    # timestamps in ms from the start to the end of each 2 s sound, the same for every sound
    assert timestamps[0, 0] == 0.0 and 2000.0 - hear.HOP_MS < timestamps[0, -1] <= 2000.0
    assert torch.equal(timestamps, timestamps[:1].expand_as(timestamps))


def test_embeddings_do_not_depend_on_the_rest_of_the_batch(checkpoint):
    model = hear.load_model(str(checkpoint))
    audio = torch.rand((5, 12345), generator=torch.Generator().manual_seed(0)) * 2 - 1
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    scene = hear.get_scene_embeddings(audio, model)
    for i in (0, 3):
        emb_i, ts_i = hear.get_timestamp_embeddings(audio[i : i + 1], model)
        assert torch.equal(ts_i[0], ts[i])
        assert_close_ulps(emb_i[0], emb[i], ulps=64)  # other GEMM blocking only; a leak would be O(1)
        assert_close_ulps(hear.get_scene_embeddings(audio[i : i + 1], model)[0], scene[i], ulps=64)
    assert not torch.allclose(scene[0], scene[3])  # different sounds, different embeddings


def test_scene_embedding_is_what_model_predict_saves(checkpoint, tmp_path):
    wav = write_audio(tmp_path / "a.wav", seconds=1.7, freq=523.0)
    Predictor(checkpoint, "cpu").predict([wav], embeddings_out=tmp_path / "e.npy")
    audio = torch.from_numpy(load_audio(wav, sample_rate=16000).waveform)[None]  # (1, S)
    scene = hear.get_scene_embeddings(audio, hear.load_model(str(checkpoint)))
    assert_close_ulps(scene.numpy(), np.load(tmp_path / "e.npy"), ulps=64)


def test_timestamp_embeddings_interpolate_the_time_columns(checkpoint):
    """At a timestamp that falls on a column centre, the embedding is that column's frequency-mean token."""
    model = hear.load_model(str(checkpoint), patch=(8, 8), shift_ms=10.0, hop_ms=2.5)
    audio = torch.rand((2, 16000), generator=torch.Generator().manual_seed(1)) * 2 - 1
    _, columns, wt = model(audio)
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    centres = hear.column_times_ms(model, wt)  # 47.5, 127.5, ... ms: on the 2.5 ms grid
    for w in (0, 3, wt - 1):
        k = round(float(centres[w]) / 2.5)
        assert float(ts[0, k]) == pytest.approx(float(centres[w]))
        torch.testing.assert_close(emb[:, k], columns[:, w])
    torch.testing.assert_close(emb[:, 0], columns[:, 0])  # before the first centre: clamped to it


def test_bad_arguments_are_named(checkpoint):
    with pytest.raises(ModelConfigError, match="hop_ms"):
        hear.load_model(str(checkpoint), hop_ms=80)
    with pytest.raises(ShapeError, match=r"\(n_sounds, n_samples\).*\(16000,\)"):
        hear.get_scene_embeddings(torch.zeros(16000), hear.load_model(str(checkpoint)))
