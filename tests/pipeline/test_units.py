"""Time-unit conversions: the reference's own expressions, frame counts by enumeration."""

import pytest

from flexast.pipeline.errors import ConfigError
from flexast.pipeline.units import (
    ELASTICAST_SHIFTS_MS,
    ms_to_samples,
    num_frames,
    parse_shift_name,
    seconds_to_samples,
    shift_name,
)


def test_ms_to_samples_matches_reference_expression():
    # torchaudio.compliance.kaldi computes int(sample_frequency * ms * 0.001).
    for ms in (*ELASTICAST_SHIFTS_MS, 12.5, 25.0, 7.3):
        assert ms_to_samples(ms, 16000) == int(16000 * ms * 0.001)
    assert ms_to_samples(12.5, 16000) == 200


def test_num_frames_by_enumeration():
    # Count frame starts 0, hop, 2*hop, ... whose window still fits inside the clip.
    for n in (0, 1, 399, 400, 401, 560, 16000, 160000):
        for shift in (10.0, 12.5, 40.0):
            win, hop = ms_to_samples(25, 16000), ms_to_samples(shift, 16000)
            expected = sum(1 for start in range(0, max(n, 1), hop) if start + win <= n)
            assert num_frames(n, 25, shift, 16000) == expected


def test_elasticast_frame_total_for_10s():
    # DESIGN.md: 7562 frames across the 16 shifts for a 10 s clip at 16 kHz.
    assert sum(num_frames(160000, 25, s, 16000) for s in ELASTICAST_SHIFTS_MS) == 7562


def test_shift_names_round_trip():
    assert shift_name(10) == "s10" and shift_name(12.5) == "s12p5"
    for s in (*ELASTICAST_SHIFTS_MS, 12.5, 7.25):
        assert parse_shift_name(shift_name(s)) == s
    with pytest.raises(ConfigError, match="-1"):
        shift_name(-1)
    with pytest.raises(ConfigError, match="x10"):
        parse_shift_name("x10")


def test_seconds_to_samples_rounds_to_nearest():
    assert seconds_to_samples(1.0, 16000) == 16000
    assert seconds_to_samples(0.5 / 16000 + 1e-12, 16000) == 1
