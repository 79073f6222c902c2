"""Audio decoding: formats, mono mixdown, resampling, segments, and every rejection reason."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr

from flexast.pipeline.audio import decode, load_audio, probe_seconds, subtract_mean
from flexast.pipeline.errors import AudioError
from tests.factories import tone_array, write_audio, write_bad_inputs


def test_wav_and_flac_decode_to_the_written_samples(tmp_path):
    expected = tone_array(0.5, 16000, 440.0)
    for ext in ("wav", "flac"):
        path = write_audio(tmp_path / f"x.{ext}", 0.5, 16000, 440.0)
        audio = load_audio(path)
        assert audio.sample_rate == 16000 and audio.source_channels == 1
        np.testing.assert_allclose(audio.waveform, expected, atol=1 / 32768)  # 16-bit quantisation


@pytest.mark.parametrize(("ext", "subtype"), [("wav", "PCM_16"), ("flac", "PCM_16"), ("wav", "PCM_24"),
                                             ("flac", "PCM_24"), ("wav", "FLOAT")])  # fmt: skip
def test_decoded_samples_are_libsndfiles_float_values_bit_for_bit(tmp_path, ext, subtype):
    """16-bit files take an int16 read scaled by 2^-15; every subtype must equal soundfile's own float32 read."""
    rng = np.random.default_rng(5)
    x = np.clip(rng.normal(0, 0.4, size=(7001, 2)), -1, 1).astype(np.float32)  # (S, 2), full-scale samples
    x[:4] = [[-1.0, 1.0], [0.0, -0.0], [1 / 32768, -1 / 32768], [0.99997, -0.99997]]
    path = str(tmp_path / f"x.{ext}")
    sf.write(path, x, 16000, subtype=subtype)
    expected, _ = sf.read(path, dtype="float32", always_2d=True)
    got, sr = decode(path)
    assert sr == 16000 and got.dtype == np.float32 and np.array_equal(got, expected)
    part, _ = decode(path, 0.1, 0.2)  # a segment: seek, then the same path
    assert np.array_equal(part, expected[1600:3200])


@pytest.mark.parametrize("ext", ["ogg", "mp3"])
def test_lossy_formats_keep_the_tone(tmp_path, ext):
    path = write_audio(tmp_path / f"x.{ext}", 1.0, 16000, 1000.0)
    audio = load_audio(path)
    assert abs(audio.duration_s - 1.0) < 0.1  # mp3 adds encoder delay/padding
    spectrum = np.abs(np.fft.rfft(audio.waveform))
    peak_hz = np.argmax(spectrum) * 16000 / audio.waveform.shape[0]
    assert abs(peak_hz - 1000.0) < 5.0


def test_stereo_is_averaged_and_22k_is_resampled_with_soxr(tmp_path):
    path = write_audio(tmp_path / "s.wav", 0.5, 22050, 440.0, channels=2, subtype="FLOAT")
    raw, _ = sf.read(path, dtype="float32")
    audio = load_audio(path, sample_rate=16000)
    assert audio.source_sample_rate == 22050 and audio.source_channels == 2
    expected = soxr.resample(raw.mean(axis=1), 22050, 16000, quality="HQ")
    np.testing.assert_allclose(audio.waveform, expected, atol=1e-6)
    assert audio.waveform.shape[0] == round(raw.shape[0] * 16000 / 22050)


def test_segment_reads_exact_samples(tmp_path):
    path = write_audio(tmp_path / "x.flac", 2.0, 16000, 300.0)
    full = load_audio(path).waveform
    seg = load_audio(path, start_s=0.5, end_s=1.25).waveform
    np.testing.assert_array_equal(seg, full[8000:20000])
    assert abs(probe_seconds(path) - 2.0) < 1e-9


def test_subtract_mean_removes_dc():
    x = np.full(1000, 0.25, np.float32) + tone_array(1000 / 16000)
    y = subtract_mean(x)
    assert abs(float(y.mean(dtype=np.float64))) < 1e-7 and y.dtype == np.float32 and x[0] != y[0]


def test_every_bad_input_raises_its_reason(tmp_path):
    bad = write_bad_inputs(tmp_path)
    for name, row in bad.items():
        if name in ("unknown_label", "duplicate_key"):
            continue  # decided by the build driver, not by decoding
        with pytest.raises(AudioError) as info:
            load_audio(str(tmp_path / row["path"]))
        assert info.value.reason == name.split("_")[0], (name, info.value)
        assert str(tmp_path / row["path"]) in str(info.value)
    with pytest.raises(AudioError) as info:
        load_audio(str(tmp_path / "bad/good.wav"), min_seconds=1.0)
    assert info.value.reason == "too_short" and "min_seconds=1.0" in info.value.detail
    with pytest.raises(AudioError) as info:
        load_audio(str(tmp_path / "bad/good.wav"), start_s=5.0)
    assert info.value.reason == "bad_segment"
    assert probe_seconds(str(tmp_path / "bad/text.wav")) is None
