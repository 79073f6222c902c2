"""Units and rounding: the one place where seconds, milliseconds, samples and frames meet.

Every conversion between time units in flexast goes through a function here, so that the
featurizer, the shard writer, the loader and the model can never round differently.

Notation: ``sr`` is a sampling rate in Hz, ``ms`` a duration in milliseconds, ``s`` one in seconds.
"""

from __future__ import annotations

import math

from flexast.pipeline.errors import ConfigError

MS_TO_S = 0.001  # the constant torchaudio.compliance.kaldi uses; kept so int() truncation matches it bit for bit


def ms_to_samples(ms: float, sr: float) -> int:
    """Window length or hop in samples, exactly as ``torchaudio.compliance.kaldi`` computes it.

    The reference evaluates ``int(sample_frequency * ms * 0.001)`` (truncation, in that order of
    operations); we keep the same expression so non-integer shifts such as 12.5 ms agree.
    """
    return int(sr * ms * MS_TO_S)


def seconds_to_samples(s: float, sr: float) -> int:
    """Nearest whole sample for a time in seconds (segment boundaries, length caps)."""
    return math.floor(s * sr + 0.5)


def samples_to_seconds(n: int, sr: float) -> float:
    """Duration in seconds of ``n`` samples."""
    return n / float(sr)


def num_frames(num_samples: int, frame_length_ms: float, frame_shift_ms: float, sr: float) -> int:
    """Kaldi frame count with ``snip_edges=True``: ``1 + (N - win) // hop``, or 0 when ``N < win``.

    A clip shorter than one window yields zero frames; callers decide whether that is an error.
    """
    win = ms_to_samples(frame_length_ms, sr)
    hop = ms_to_samples(frame_shift_ms, sr)
    if num_samples < win:
        return 0
    return 1 + (num_samples - win) // hop


def shift_name(shift_ms: float) -> str:
    """Stable name of a frame shift used in shard member names and index keys: 10 -> 's10', 12.5 -> 's12p5'.

    Dots are avoided because WebDataset splits a member name into key and extension at the first dot.
    """
    value = float(shift_ms)
    if value <= 0 or not math.isfinite(value):
        raise ConfigError(f"frame shift must be a positive number of milliseconds, got {shift_ms!r}")
    text = f"{value:g}"
    return "s" + text.replace(".", "p")


def parse_shift_name(name: str) -> float:
    """Inverse of :func:`shift_name`: 's12p5' -> 12.5."""
    if not name.startswith("s"):
        raise ConfigError(f"not a frame-shift name (expected like 's10' or 's12p5'): {name!r}")
    try:
        return float(name[1:].replace("p", "."))
    except ValueError as exc:
        raise ConfigError(f"not a frame-shift name (expected like 's10' or 's12p5'): {name!r}") from exc


ELASTICAST_SHIFTS_MS: tuple[float, ...] = tuple(float(s) for s in range(10, 41, 2))
"""ElasticAST's 16 frame shifts (10, 12, ..., 40 ms), C = 1.0, 1.2, ..., 4.0 times the 10 ms base."""
