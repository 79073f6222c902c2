"""HF ``ASTFeatureExtractor`` (its numpy path, no torchaudio) as a peer of flexast's fbank + AST normalisation.

What the comparisons show (docs/interop.md, "Features"):
* Same algorithm: given the same mel filters, HF's float64 numpy path and flexast's fbank in float64 agree to
  float32 rounding of HF's output.
* As shipped: HF builds its mel filters in float64, flexast in float32 as Kaldi/torchaudio do, and flexast
  runs its FFT in float32; the normalised features differ by float32 rounding of those two steps only.
* Where they differ by design: HF pads short clips with log-mel 0 before normalising and cuts long ones to
  their first ``max_length`` frames; it does not remove the waveform's mean (Kaldi's per-frame DC removal
  makes that a rounding-level difference).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexast.pipeline.audio import subtract_mean
from flexast.pipeline.augment import normalise
from flexast.pipeline.build_config import AST_FBANK
from flexast.pipeline.fbank import fbank
from flexast.pipeline.fbank_options import FbankOptions, mel_banks
from tests.factories import broadband_clip
from tests.tolerances import EPS32, assert_close_ulps

MEAN, STD = -4.2677393, 4.5689974  # AST's AudioSet statistics, HF's defaults
FRAMES = 98  # 1 s at 16 kHz, 25 ms windows, 10 ms shift
# HF warns that 128 filters over 257 FFT bins leave one empty: the lowest filter, empty in Kaldi too (bin 3 is
# constant: pipeline/fbank_options.py).
pytestmark = pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")


@pytest.fixture
def extractor(hf_ast, monkeypatch):
    """A factory of ``ASTFeatureExtractor`` forced onto its numpy path (as without torchaudio)."""
    from transformers.models.audio_spectrogram_transformer import (
        feature_extraction_audio_spectrogram_transformer as module,
    )

    monkeypatch.setattr(module, "is_speech_available", lambda: False)

    def make(max_length: int = FRAMES):
        return module.ASTFeatureExtractor(num_mel_bins=128, max_length=max_length, mean=MEAN, std=STD)

    return make


def _hf(ext, wave: np.ndarray) -> np.ndarray:
    return ext(wave, sampling_rate=16000, return_tensors="np")["input_values"][0]  # (max_length, F)


def _ours(wave: np.ndarray, dtype=torch.float32, mean_removed: bool = False) -> np.ndarray:
    """flexast's recipe (``model predict``): optional waveform mean removal, AST fbank, AST normalisation."""
    w = subtract_mean(wave) if mean_removed else wave
    feats = fbank(torch.from_numpy(w).to(dtype), shifts_ms=[10.0], **AST_FBANK)[10.0][0]  # (T, F)
    return normalise(feats.numpy(), MEAN, STD)


def _with_flexast_filters(ext):
    banks = mel_banks(FbankOptions.from_kwargs(**AST_FBANK), torch.float64).numpy()  # (F, 256), built in float32
    ext.mel_filters = np.concatenate([banks.T, np.zeros((1, banks.shape[0]))], 0)  # (257, F): zero Nyquist row
    return ext


@pytest.mark.parametrize("seed", [0, 1])
def test_same_algorithm_given_the_same_mel_filters(extractor, seed):
    wave = broadband_clip(1.0, seed=seed).numpy()
    assert_close_ulps(_hf(_with_flexast_filters(extractor()), wave), _ours(wave, torch.float64), ulps=4)


@pytest.mark.parametrize(("seed", "dc", "mean_removed"), [(0, 0.0, False), (4, 0.01, True), (3, 0.01, False)])
def test_as_shipped_the_features_agree_to_float32_rounding(extractor, seed, dc, mean_removed):
    """HF keeps a DC offset and flexast's predict removes the mean: Kaldi's per-frame DC removal evens that out."""
    wave = broadband_clip(1.0, seed=seed).numpy() + np.float32(dc)
    ours = _ours(wave, mean_removed=mean_removed)
    assert ours.shape == (FRAMES, 128)
    hf = _hf(extractor(), wave)
    assert np.abs(hf - ours).max() > 16 * EPS32  # not identical: the tolerance below is needed
    # Two float32 steps differ from HF's float64 ones: the FFT (flexast runs it in float32) and the mel filters.
    # A filter weight is a position inside its triangle, (mel - left) / delta, with mels up to 2840 and delta
    # about 22 mel, so float32 mels (Kaldi's construction) move a weight by up to 2840/22 ≈ 130 eps32 from HF's.
    # Both weigh most in the lower filters, a few FFT bins wide and low in energy: up to about 800 ulps of the
    # normalised value there (1e-4, or 0.004 dB), measured over six seeds with and without a DC offset.
    banks = mel_banks(FbankOptions.from_kwargs(**AST_FBANK), torch.float64).numpy().T  # (256, F)
    assert np.abs(banks - extractor().mel_filters[:256]).max() < 130 * EPS32
    assert_close_ulps(hf, ours, ulps=1024)


def test_padding_and_cutting_differ_by_design(extractor):
    wave = broadband_clip(1.0, seed=3).numpy()
    ours = _ours(wave)
    padded = _hf(extractor(FRAMES + 30), wave)
    assert_close_ulps(padded[:FRAMES], ours, ulps=1024)
    # HF pads the log-mel with 0 before normalising: rows of -mean / (2 std) = +0.467; flexast's padded AST
    # batches (data.loader.target_frames) pad after normalising, with 0 (the mean); predict and eval never pad.
    np.testing.assert_array_equal(padded[FRAMES:], np.float32(normalise(0.0, MEAN, STD)))
    # HF keeps the first max_length frames; flexast's evaluation cuts the centre, predict runs the whole clip.
    cut = _hf(extractor(40), wave)
    assert_close_ulps(cut, ours[:40], ulps=1024)
