"""Optional fbank backends behind :func:`pipeline.fbank.fbank` (``backend=...``); ours stays the default.

Notation as in :mod:`pipeline.fbank`: ``N`` clips, ``T`` frames, ``F`` features, shifts in ms.

- ``"kaldi-native"``: kaldi-native-fbank, CPU, one call per clip and shift. A Kaldi fbank like ours, but it
  refuses settings with an empty mel filter (128 bins at 16 kHz with a 25 ms frame, i.e. the AST preset)
  and it was 2-4x slower than the torchaudio reference here. Its float32 rounding differs from the
  reference in near-silent bins (see :mod:`pipeline.fbank`), so compare it with a tolerance (2e-3).
- ``"torchaudio"``: ``torchaudio.compliance.kaldi.fbank``, one call per clip and shift, where it imports
  (its registry wheel fails to import on CPU-only machines here).
- ``"nnaudio-mel"``: nnAudio's ``MelSpectrogram`` on the input's device. **Not a Kaldi fbank and not
  AST-compatible**: no DC removal or pre-emphasis, a Hann window centred in ``n_fft = P`` samples, triangles
  laid out in Hz (librosa style) with slaney normalisation off, and ``1 + (S - P) // hop`` frames instead
  of ``1 + (S - W) // hop``. Log-mels differ from Kaldi's by up to ~14 nats. Use it only as a fast GPU mel
  frontend for models trained on it.

Every backend returns the same ragged structure as ours: ``{shift_ms: [(T_i, F) per clip]}``.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch

from flexast.pipeline.errors import FeatureError
from flexast.pipeline.fbank_options import FLT_EPSILON, FbankOptions


def run_backend(name: str, wave: torch.Tensor, lens: list[int], shifts: tuple[float, ...], opts: FbankOptions):
    """Dispatch to one backend; ``wave`` is a padded (N, S_max) batch with valid ``lens``."""
    runners = {"kaldi-native": _kaldi_native, "torchaudio": _torchaudio, "nnaudio-mel": _nnaudio_mel}
    if name not in runners:
        raise FeatureError(f"unknown fbank backend {name!r}; choose from {['flexast', *runners]}")
    out = {s: [] for s in shifts}
    min_samples = max(opts.window_size, opts.min_duration * opts.sample_frequency)
    for s in shifts:
        for i, n in enumerate(lens):
            if n < min_samples:
                out[s].append(torch.zeros(0, opts.num_features, dtype=wave.dtype, device=wave.device))
                continue
            feats = runners[name](wave[i, :n], s, opts)
            if opts.subtract_mean and name != "torchaudio":
                feats = feats - feats.mean(dim=0).unsqueeze(0)
            out[s].append(feats)
    return out


def _kaldi_native(clip: torch.Tensor, shift: float, opts: FbankOptions) -> torch.Tensor:
    try:
        import kaldi_native_fbank as knf
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise FeatureError("backend 'kaldi-native' needs the kaldi-native-fbank package") from exc
    k = knf.FbankOptions()
    fo, mo = k.frame_opts, k.mel_opts
    fo.samp_freq, fo.frame_shift_ms, fo.frame_length_ms = opts.sample_frequency, shift, opts.frame_length
    fo.dither, fo.preemph_coeff, fo.remove_dc_offset = opts.dither, opts.preemphasis_coefficient, opts.remove_dc_offset
    fo.window_type, fo.blackman_coeff = opts.window_type, opts.blackman_coeff
    fo.round_to_power_of_two, fo.snip_edges = opts.round_to_power_of_two, opts.snip_edges
    mo.num_bins, mo.low_freq, mo.high_freq = opts.num_mel_bins, opts.low_freq, opts.high_freq
    mo.vtln_low, mo.vtln_high = opts.vtln_low, opts.vtln_high
    k.use_energy, k.raw_energy, k.energy_floor, k.htk_compat = (
        opts.use_energy,
        opts.raw_energy,
        opts.energy_floor,
        opts.htk_compat,
    )
    k.use_log_fbank, k.use_power = opts.use_log_fbank, opts.use_power
    try:
        online = knf.OnlineFbank(k)
    except (ValueError, RuntimeError) as exc:
        raise FeatureError(
            f"kaldi-native-fbank refuses these options ({exc}); e.g. it rejects num_mel_bins={opts.num_mel_bins} "
            f"when a mel filter is empty (the AST preset): use backend='flexast'"
        ) from exc
    online.accept_waveform(opts.sample_frequency, clip.detach().cpu().float().numpy())
    online.input_finished()
    rows = [online.get_frame(t) for t in range(online.num_frames_ready)]
    feats = np.asarray(rows, dtype=np.float32).reshape(len(rows), opts.num_features)  # (T, F)
    return torch.from_numpy(feats).to(dtype=clip.dtype, device=clip.device)


def _torchaudio(clip: torch.Tensor, shift: float, opts: FbankOptions) -> torch.Tensor:
    try:
        from torchaudio.compliance import kaldi
    except Exception as exc:  # its wheel can fail with OSError/ImportError/RuntimeError on CPU machines
        raise FeatureError(f"backend 'torchaudio' is not importable here ({type(exc).__name__}: {exc})") from exc
    kwargs = {k: v for k, v in vars(opts).items() if k != "frame_shift"}
    return kaldi.fbank(clip.unsqueeze(0), frame_shift=shift, **kwargs)  # (T, F)


@lru_cache(maxsize=32)
def _nnaudio_layer(opts: FbankOptions, hop: int, device: str):
    from nnAudio.features import MelSpectrogram

    nyquist = 0.5 * opts.sample_frequency
    high = opts.high_freq + nyquist if opts.high_freq <= 0 else opts.high_freq
    with warnings.catch_warnings():  # its empty-filter warning: the same empty bin as Kaldi's, expected
        warnings.simplefilter("ignore", UserWarning)
        layer = _build_mel(MelSpectrogram, opts, hop, high)
    return layer.to(device)


def _build_mel(cls, opts: FbankOptions, hop: int, high: float):
    return cls(
        sr=int(opts.sample_frequency),
        n_fft=opts.padded_size,
        win_length=opts.window_size,
        hop_length=hop,
        n_mels=opts.num_mel_bins,
        window="hann",
        center=False,
        power=2.0 if opts.use_power else 1.0,
        htk=True,
        fmin=opts.low_freq,
        fmax=high,
        norm=None,
        verbose=False,
    )


def _nnaudio_mel(clip: torch.Tensor, shift: float, opts: FbankOptions) -> torch.Tensor:
    if opts.use_energy:
        raise FeatureError("backend 'nnaudio-mel' has no energy feature: set use_energy=False")
    if clip.numel() < opts.padded_size:
        return torch.zeros(0, opts.num_mel_bins, dtype=clip.dtype, device=clip.device)
    layer = _nnaudio_layer(opts, opts.hop(shift), str(clip.device))
    with torch.no_grad():
        mel = layer(clip.float().unsqueeze(0))[0].T  # (F, T) -> (T, F)
    if opts.use_log_fbank:
        mel = mel.clamp_min(FLT_EPSILON).log()
    return mel.to(clip.dtype)
