"""The optional backends of pipeline.fbank: kaldi-native-fbank as a live peer, torchaudio, nnAudio's mel."""

from __future__ import annotations

import pytest
import torch

from flexast.pipeline.errors import FeatureError
from flexast.pipeline.fbank import fbank
from flexast.pipeline.fbank_options import AST_FBANK
from tests.factories import random_clips

AST = {k: v for k, v in AST_FBANK.items() if k != "frame_shift"}

KNF_CASES = {
    "kaldi80_povey": {"num_mel_bins": 80},
    "hamming64_energy": {"num_mel_bins": 64, "window_type": "hamming", "use_energy": True},
    "hanning64_htk": {"num_mel_bins": 64, "window_type": "hanning", "htk_compat": True, "use_energy": True},
    "blackman40_band": {"num_mel_bins": 40, "window_type": "blackman", "low_freq": 60.0, "high_freq": -300.0},
    "rect_windowed_energy": {"num_mel_bins": 40, "window_type": "rectangular", "use_energy": True, "raw_energy": False},
    "magnitude_no_preemph": {"num_mel_bins": 30, "use_power": False, "preemphasis_coefficient": 0.0},
    "linear_no_dc_cms": {"num_mel_bins": 30, "use_log_fbank": False, "remove_dc_offset": False, "subtract_mean": True},
}


@pytest.mark.parametrize("name", sorted(KNF_CASES))
def test_kaldi_native_fbank_is_a_live_peer(name):
    opts = KNF_CASES[name]
    clips = random_clips(3, 0.2, 1.5, seed=11)
    shifts = [10.0, 12.5, 20.0]
    ours = fbank(clips, shifts_ms=shifts, **opts)
    peer = fbank(clips, shifts_ms=shifts, backend="kaldi-native", **opts)
    for s in shifts:
        for a, b in zip(ours[s], peer[s], strict=True):
            assert a.shape == b.shape
            scale = 1.0 if opts.get("use_log_fbank", True) else b.abs().max().item()
            assert (a - b).abs().max().item() <= 2e-3 * scale, (name, s)


def test_kaldi_native_refuses_the_ast_preset_with_a_clear_error():
    with pytest.raises(FeatureError, match=r"num_mel_bins=128.*flexast"):
        fbank(random_clips(1, 0.5, 0.5), backend="kaldi-native", **AST)


def test_torchaudio_backend_matches_ours_or_says_why_it_cannot_run():
    clips = random_clips(2, 0.3, 0.8, seed=2)
    try:
        peer = fbank(clips, shifts_ms=[10.0, 12.0], backend="torchaudio", **AST)
    except FeatureError as exc:
        assert "not importable" in str(exc)
        return
    ours = fbank(clips, shifts_ms=[10.0, 12.0], **AST)
    for s in (10.0, 12.0):
        for a, b in zip(ours[s], peer[s], strict=True):
            assert torch.allclose(a, b, atol=2e-3, rtol=0)


def test_nnaudio_mel_is_a_different_frontend_with_its_own_frame_count():
    clips = random_clips(2, 0.5, 1.0, seed=4)
    mel = fbank(clips, backend="nnaudio-mel", **AST)[10.0]
    kaldi = fbank(clips, **AST)[10.0]
    for clip, m, k in zip(clips, mel, kaldi, strict=True):
        assert m.shape == (1 + (clip.numel() - 512) // 160, 128)
        assert k.shape[0] == 1 + (clip.numel() - 400) // 160 > m.shape[0]
        assert torch.isfinite(m).all()
        assert (m - k[: m.shape[0]]).abs().max() > 1.0  # not a Kaldi fbank: never a drop-in for AST features


def test_unknown_backend_lists_the_choices():
    with pytest.raises(FeatureError, match=r"unknown fbank backend 'librosa'.*kaldi-native"):
        fbank(random_clips(1, 0.1, 0.1), backend="librosa")
