"""pipeline.fbank against the golden torchaudio fixtures, the reference peer, and its own properties."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexast.pipeline.errors import ConfigError, FeatureError
from flexast.pipeline.fbank import fbank, fbank_one, fbank_rows, row_plan
from flexast.pipeline.fbank_options import AST_FBANK, FLT_EPSILON, FbankOptions
from flexast.pipeline.fbank_reference import reference_fbank
from flexast.pipeline.units import ELASTICAST_SHIFTS_MS, num_frames
from tests.factories import broadband_clip, random_clips
from tests.tolerances import EPS16, assert_close_ulps

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "kaldi_fbank_golden.npz"
AST = {k: v for k, v in AST_FBANK.items() if k != "frame_shift"}

# The fixtures were written by torchaudio with MKL's FFT on its reproducible (CBWR=COMPATIBLE) code path.
# Bins ~90 dB below a frame's peak hold float32 FFT rounding noise, so on the default AVX-512 path the
# reference itself differs from its own fixtures by up to 2e-2 there. The comparison therefore runs in a
# child process with MKL_CBWR=COMPATIBLE (set before the first FFT; it slows MKL's GEMM 5x, so never globally).
_GOLDEN_SCRIPT = r"""
import json, sys
import numpy as np, torch
from flexast.pipeline.fbank import fbank
from flexast.pipeline.fbank_reference import reference_fbank
z = np.load(sys.argv[1])
configs = json.loads(z["configs_json"].tobytes().decode())
clips = sorted(k.split("/")[1] for k in z.files if k.startswith("wave/"))
waves = [torch.from_numpy(z["wave/" + c]) for c in clips]
result = {}
for name, cfg in configs.items():
    cfg = dict(cfg)
    shift = float(cfg.pop("frame_shift", 10.0))
    ours = fbank(waves, shifts_ms=[shift], **cfg)[shift]
    for c, w, feats in zip(clips, waves, ours):
        gold = torch.from_numpy(z[f"fbank/{c}/{name}"])
        ref = reference_fbank(w, frame_shift=shift, **cfg)
        result[f"{c}/{name}"] = [list(feats.shape) == list(gold.shape), float((feats - gold).abs().max()),
                                 float((ref - gold).abs().max())]
ast = {k: v for k, v in configs["ast128_shift10"].items() if k != "frame_shift"}
shifts = sorted(float(n.split("shift")[1]) for n in configs if n.startswith("ast128_shift"))
multi = fbank(waves, shifts_ms=shifts, chunk_rows=300, **ast)
for s in shifts:
    for c, feats in zip(clips, multi[s]):
        gold = torch.from_numpy(z[f"fbank/{c}/ast128_shift{s:g}"])
        result[f"{c}/multi{s:g}"] = [list(feats.shape) == list(gold.shape), float((feats - gold).abs().max()), 0.0]
print(json.dumps(result))
"""


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the fixtures' noise-level bins need MKL's FFT")
def test_golden_fixtures_every_config_and_the_multi_shift_call():
    env = dict(os.environ, MKL_CBWR="COMPATIBLE", OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _GOLDEN_SCRIPT, str(GOLDEN)], env=env, cwd=root, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result) == 4 * 8 + 4 * 6
    for key, (shape_ok, ours, peer) in result.items():
        assert shape_ok, key
        assert ours <= 1e-4, (key, ours)
        assert peer <= 1e-4, (key, peer)  # the benchmark's reference peer is itself exact


OPTION_CASES = {
    "ast": AST,
    "kaldi_defaults_80": {"num_mel_bins": 80},
    "hamming_energy": {"num_mel_bins": 64, "window_type": "hamming", "use_energy": True},
    "blackman_htk_energy": {"window_type": "blackman", "use_energy": True, "htk_compat": True, "blackman_coeff": 0.4},
    "rectangular_windowed_energy": {"window_type": "rectangular", "use_energy": True, "raw_energy": False},
    "no_preemph_no_dc": {"preemphasis_coefficient": 0.0, "remove_dc_offset": False, "num_mel_bins": 40},
    "freq_band": {"low_freq": 64.0, "high_freq": -400.0, "num_mel_bins": 48},
    "magnitude_linear": {"use_power": False, "use_log_fbank": False, "num_mel_bins": 30},
    "no_pow2_20ms": {"round_to_power_of_two": False, "frame_length": 20.0, "energy_floor": 0.0, "use_energy": True},
    "cms": {"subtract_mean": True, "num_mel_bins": 32},
    "min_duration_8k": {"sample_frequency": 8000.0, "min_duration": 0.5, "num_mel_bins": 23},
}


@pytest.mark.parametrize("name", sorted(OPTION_CASES))
def test_every_option_matches_the_reference_peer(name):
    opts = OPTION_CASES[name]
    clips = [broadband_clip(s, seed=i) for i, s in enumerate([0.3, 1.0, 0.031])]
    shifts = [10.0, 12.5, 33.0]
    out = fbank(clips, shifts_ms=shifts, **opts)
    o = FbankOptions.from_kwargs(**opts)
    for s in shifts:
        for clip, ours in zip(clips, out[s], strict=True):
            if clip.numel() < max(o.window_size, o.min_duration * o.sample_frequency):
                assert ours.shape[0] == 0
                continue
            ref = reference_fbank(clip, frame_shift=s, **opts)
            assert ours.shape == ref.shape
            scale = 1.0 if opts.get("use_log_fbank", True) else ref.abs().max().item()
            assert (ours - ref).abs().max().item() <= 1e-4 * scale, (name, s)
            # float64: the same definition, independent of float32 rounding noise.
            ours64 = fbank(clip.double(), shifts_ms=[s], **opts)[s][0]
            ref64 = reference_fbank(clip.double(), frame_shift=s, **opts)
            assert ours64.dtype == torch.float64
            assert torch.allclose(ours64, ref64, rtol=1e-9, atol=1e-9 * scale), (name, s)


def test_elasticast_shifts_in_one_call_equal_one_call_per_shift():
    clips = random_clips(3, 0.5, 2.0, seed=3)
    shifts = list(ELASTICAST_SHIFTS_MS)
    together = fbank(clips, shifts_ms=shifts, chunk_rows=777, **AST)
    for s in shifts:
        alone = fbank(clips, shifts_ms=[s], **AST)[s]
        for a, b in zip(together[s], alone, strict=True):
            assert a.shape == b.shape
            assert torch.allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("subtract_mean", [False, True])
def test_float16_output_equals_casting_each_shift_afterwards(subtract_mean):
    clips = random_clips(3, 0.3, 1.5, seed=11)
    shifts = [10.0, 12.0, 25.0]
    opts = {**AST, "subtract_mean": subtract_mean}
    wide = fbank(clips, shifts_ms=shifts, **opts)
    half = fbank(clips, shifts_ms=shifts, out_dtype=torch.float16, chunk_rows=100, **opts)
    for s in shifts:
        for a, b in zip(wide[s], half[s], strict=True):
            # Another chunking may round a float32 value one ulp apart, moving its float16 value one step.
            assert b.dtype == torch.float16
            assert_close_ulps(b, a.to(torch.float16), ulps=1, eps=EPS16)


def test_shared_rows_gather_to_the_per_shift_features_bit_for_bit():
    clips = random_clips(3, 0.2, 1.5, seed=12)
    shifts = list(ELASTICAST_SHIFTS_MS)
    per_shift = fbank(clips, shifts_ms=shifts, **AST)
    rows = fbank_rows(clips, shifts_ms=shifts, **AST)
    for i, clip in enumerate(rows):
        assert clip.values.shape[0] == clip.plan.starts.numel() < sum(x[i].shape[0] for x in per_shift.values())
        for s in shifts:
            assert_close_ulps(clip.at(s), per_shift[s][i], ulps=16)  # other FFT batch shapes: float32 rounding
            assert clip.frames(s) == per_shift[s][i].shape[0]
    with pytest.raises(FeatureError, match="subtract_mean"):
        fbank_rows(clips, shifts_ms=shifts, subtract_mean=True)
    with pytest.raises(FeatureError, match=r"got torch\.int16"):
        fbank(clips, shifts_ms=shifts, out_dtype=torch.int16)


def test_distinct_frames_of_a_10s_clip_at_the_16_shifts():
    plan = row_plan(160000, 400, tuple((s, int(s * 16)) for s in ELASTICAST_SHIFTS_MS))
    assert sum(len(r) for r in plan.rows.values()) == 7562
    assert plan.starts.numel() == 3224
    for s, rows in plan.rows.items():
        assert torch.equal(plan.starts[rows], torch.arange(len(rows)) * int(s * 16))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 3000),
    shift=st.sampled_from([1.0, 7.5, 10.0, 12.5, 33.0]),
    length_ms=st.sampled_from([2.5, 10.0, 25.0, 60.0]),
)
def test_frame_count_formula(n, shift, length_ms):
    x = torch.linspace(-0.5, 0.5, n)
    opts = {"frame_length": length_ms, "num_mel_bins": 5, "round_to_power_of_two": True}
    feats = fbank([x], shifts_ms=[shift], **opts)[shift][0]
    assert feats.shape == (num_frames(n, length_ms, shift, 16000), 5)
    assert torch.isfinite(feats).all()


def test_short_clips_give_zero_frames_and_the_boundaries_are_exact():
    w, hop = 400, 160
    lengths = [0, 1, w - 1, w, w + hop - 1, w + hop]
    clips = [broadband_clip(n / 16000, seed=n)[:n] for n in lengths]
    out = fbank(clips, **AST)[10.0]
    assert [f.shape[0] for f in out] == [0, 0, 0, 1, 1, 2]
    assert all(f.shape[1] == 128 for f in out)
    ref = reference_fbank(clips[-1], **AST)
    assert torch.allclose(out[-1], ref, atol=1e-4, rtol=0)


def test_a_single_clip_that_is_a_view_into_a_larger_tensor():
    """One clip is framed in place (no padding copy), so an offset or strided view must still be read right."""
    big = random_clips(1, 1.0, 1.0, seed=13)[0]
    for view in (big[1234:9000], big[::2]):
        got = fbank([view], shifts_ms=[10.0, 25.0], **AST)
        want = fbank([view.clone()], shifts_ms=[10.0, 25.0], **AST)
        # The view is framed in place, the copy from its own buffer: the FFT may block them differently.
        for s in (10.0, 25.0):
            assert_close_ulps(got[s][0], want[s][0], ulps=16)
        assert_close_ulps(fbank(view, shifts_ms=[10.0], **AST)[10.0][0], want[10.0][0], ulps=16)


def test_padded_batch_with_lengths_equals_the_list_form():
    clips = random_clips(4, 0.05, 0.6, seed=9)
    padded = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
    lengths = torch.tensor([c.numel() for c in clips])
    a = fbank(padded, lengths, shifts_ms=[10.0, 20.0], **AST)
    b = fbank(clips, shifts_ms=[10.0, 20.0], **AST)
    for s in (10.0, 20.0):
        for x, y in zip(a[s], b[s], strict=True):
            assert_close_ulps(x, y, ulps=16)  # other batch shapes: float32 rounding may differ by CPU


def test_ast_preset_bin_3_is_the_constant_log_epsilon():
    feats = fbank(broadband_clip(0.5), **AST)[10.0][0]
    assert torch.all(feats[:, 3] == np.float32(math.log(FLT_EPSILON)))
    assert (feats[:, [2, 4]] > -15).all()


def test_dither_is_seeded_reproducible_and_independent_of_chunking():
    x = torch.zeros(4000)
    opts = {**AST, "dither": 1.0}
    a = fbank([x], shifts_ms=[10.0, 12.0], seed=7, chunk_rows=5, **opts)
    b = fbank([x], shifts_ms=[10.0, 12.0], seed=7, chunk_rows=1000, **opts)
    c = fbank([x], shifts_ms=[10.0, 12.0], seed=8, **opts)
    # The noise is keyed by frame, so chunking cannot change it; the FFT of another chunk size may round one
    # float32 ulp apart (measured on an AMD EPYC), so the features agree to float32 rounding, not bitwise.
    for s in (10.0, 12.0):
        assert_close_ulps(a[s][0], b[s][0], ulps=16)
    assert (a[10.0][0] - c[10.0][0]).abs().max() > 0.1  # another seed is other noise, far above rounding
    again = fbank([x], shifts_ms=[10.0, 12.0], seed=7, chunk_rows=5, **opts)
    assert torch.equal(again[10.0][0], a[10.0][0])  # the same call is bitwise reproducible
    assert a[10.0][0][:, 10].min() > -15.0  # silence is no longer clamped at log(eps)
    assert_close_ulps(a[10.0][0][0], a[12.0][0][0], ulps=16)  # a frame shared by two shifts gets the same noise


def test_drop_in_single_clip_call_matches_the_reference_call():
    x = broadband_clip(0.4, seed=5).unsqueeze(0)  # (1, S)
    ours = fbank_one(x, frame_shift=12.0, **AST)
    assert torch.allclose(ours, reference_fbank(x[0], frame_shift=12.0, **AST), atol=1e-4, rtol=0)


def test_bad_options_and_inputs_raise_typed_errors_with_the_values():
    x = broadband_clip(0.1)
    with pytest.raises(ConfigError, match=r"unknown fbank option.*num_mels"):
        fbank([x], num_mels=128)
    with pytest.raises(ConfigError, match=r"window_type='hann'.*snip_edges=False"):
        fbank([x], window_type="hann", snip_edges=False)
    with pytest.raises(ConfigError, match="hop of 0"):
        fbank([x], shifts_ms=[0.01])
    with pytest.raises(FeatureError, match=r"float32.*torch.int16"):
        fbank([torch.zeros(500, dtype=torch.int16)])
    with pytest.raises(FeatureError, match="float16"):
        fbank(torch.zeros(1, 500, dtype=torch.float16))
    with pytest.raises(FeatureError, match=r"lengths \[500, 900\]"):
        fbank(torch.zeros(2, 800), [500, 900])
    with pytest.raises(FeatureError, match="distinct"):
        fbank([x], shifts_ms=[10.0, 10.0])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    clips = random_clips(3, 0.5, 3.0, seed=1)
    cpu = fbank(clips, shifts_ms=list(ELASTICAST_SHIFTS_MS), **AST)
    gpu = fbank([c.cuda() for c in clips], shifts_ms=list(ELASTICAST_SHIFTS_MS), **AST)
    for s in ELASTICAST_SHIFTS_MS:
        for a, b in zip(cpu[s], gpu[s], strict=True):
            assert b.is_cuda and b.dtype == torch.float32
            assert torch.allclose(a, b.cpu(), atol=2e-3, rtol=0)
