"""The HEAR API (hearbenchmark.com, 2021 rules): ``load_model``, ``get_scene_embeddings``, ``get_timestamp_embeddings``.

Notation: ``N`` sounds, ``S`` samples at ``sample_rate`` (16 kHz for every flexast run), ``T`` fbank frames at
``shift_ms``, ``(p_f, p_t)`` patch, ``Hf = F // p_f`` frequency tokens, ``Wt = T // p_t`` time columns, ``D``
width, ``K`` timestamps. Times are in milliseconds.

Each sound runs whole, as ``model predict`` runs a file: waveform mean removed, the run's Kaldi fbank at
``shift_ms``, AST normalisation, the packed forward at ``patch`` (block-diagonal attention, so a sound's
embeddings never depend on the others in its batch).

* Scene embedding ``(N, D)``: the model's pooled embedding (what ``model predict --embeddings`` saves).
* Timestamp embeddings ``(N, K, D)``: the encoder's output tokens of each time column, averaged over the
  ``Hf`` frequency tokens. Column ``w`` covers frames ``w·p_t … w·p_t + p_t − 1``, so it is centred at
  ``(w·p_t + (p_t − 1)/2)·shift_ms + window_ms/2``. The columns are resampled linearly (clamped at the ends)
  onto the constant grid ``0, hop_ms, 2·hop_ms, …`` up to the sound's duration.

Operating point: by default the model's own kernel ``base_patch`` at 10 ms, the point it was trained at, and
``hop_ms = 25`` (the HEAR baseline's hop). The columns themselves are ``p_t · shift_ms`` apart (160 ms for a
16×16 kernel). A FlexiAST/ElasticAST model can be run finer: ``load_model(path, patch=(16, 8), shift_ms=5)``
gives columns 40 ms apart, at the cost of 4× the tokens and a point further from training; ``model eval``
measures how a checkpoint's accuracy moves across patches and shifts before you pick one.
"""

from __future__ import annotations

import torch
from torch import nn

from flexast.model.ast import ASTModel
from flexast.model.errors import CheckpointError, ModelConfigError, ShapeError
from flexast.pipeline.batch import PackedBatch, trim_frames

HOP_MS = 25.0


class HearModel(nn.Module):
    """A loaded checkpoint with the attributes HEAR asks for, and the feature recipe of its run.

    Attributes:
        sample_rate: input rate in Hz.
        scene_embedding_size: ``D``.
        timestamp_embedding_size: ``D``.
        patch: ``(p_f, p_t)`` the model runs at.
        shift_ms: fbank frame shift.
        hop_ms: spacing of the returned timestamps.
    """

    def __init__(self, model: ASTModel, info: dict, norm: tuple[float, float], patch, shift_ms: float, hop_ms: float):
        super().__init__()
        self.model = model.eval()
        self.info = info
        self.norm = (float(norm[0]), float(norm[1]))
        self.patch = (int(patch[0]), int(patch[1]))
        self.shift_ms = float(shift_ms)
        self.hop_ms = float(hop_ms)
        self.sample_rate = int(info.get("sample_rate", 16000))
        self.scene_embedding_size = int(model.config.embed_dim)
        self.timestamp_embedding_size = int(model.config.embed_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def features(self, audio: torch.Tensor) -> list[torch.Tensor]:
        """``N`` normalised ``(T, F)`` fbanks, each at least one patch long (zero-padded, as ``model predict``)."""
        from flexast.pipeline.augment import normalise
        from flexast.pipeline.build_config import AST_FBANK
        from flexast.pipeline.fbank import fbank

        wave = audio.detach().to(torch.float32)  # (N, S)
        wave = wave - wave.double().mean(1, keepdim=True).float()  # AST's waveform mean removal, per sound
        opts = {**AST_FBANK, **self.info.get("features", {}), "sample_frequency": self.sample_rate}
        opts["num_mel_bins"] = self.model.config.n_mels
        feats = fbank(wave, shifts_ms=[self.shift_ms], **opts)[self.shift_ms]  # N × (T, F)
        out = []
        for x in feats:
            x = normalise(x, *self.norm)
            keep = max(trim_frames(x.shape[0], self.patch[1]), self.patch[1])
            if x.shape[0] < keep:
                x = torch.cat([x, x.new_zeros(keep - x.shape[0], x.shape[1])])  # (keep, F)
            out.append(x[:keep])
        return out

    @torch.no_grad()
    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Pooled ``(N, D)``, per-column ``(N, Wt, D)`` embeddings and ``Wt`` for ``(N, S)`` audio."""
        clips = self.features(audio.cpu())
        n = len(clips)
        batch = PackedBatch.from_clips(clips, torch.zeros(n, 1), [str(i) for i in range(n)], self.patch)
        batch = batch.to(self.device)
        captured = {}
        hook = self.model.encoder.register_forward_hook(lambda mod, args, out: captured.update(out=out))
        try:
            _, pooled = self.model(batch, return_embeddings=True)  # (N, D)
        finally:
            hook.remove()
        tokens = captured["out"]  # (N·(P + Wt·Hf), D): each clip's prefix tokens, then its patches time-major
        p, hf = self.model.config.n_prefix, self.model.config.n_mels // self.patch[0]
        wt = clips[0].shape[0] // self.patch[1]
        per_clip = tokens.view(n, p + wt * hf, -1)[:, p:]  # (N, Wt·Hf, D)
        columns = per_clip.reshape(n, wt, hf, -1).mean(2)  # (N, Wt, D)
        return pooled.float(), columns.float(), wt


def load_model(
    model_file_path: str = "", patch: tuple[int, int] | None = None, shift_ms: float = 10.0, hop_ms: float = HOP_MS
) -> HearModel:
    """Load a flexast checkpoint (a run's ``final/`` folder or its ``model.safetensors``) for HEAR.

    Args:
        model_file_path: the checkpoint; HEAR passes it as a string.
        patch: ``(p_f, p_t)`` to run at; None is the model's own kernel.
        shift_ms: fbank frame shift in ms.
        hop_ms: spacing of the timestamps in ms (HEAR asks for 50 ms or less).
    """
    from flexast.model.predict import Predictor

    if not model_file_path:
        raise CheckpointError("flexast has no built-in weights: pass the checkpoint folder as model_file_path")
    if not 0 < hop_ms <= 50:
        raise ModelConfigError(f"hop_ms must be in (0, 50] for HEAR, got {hop_ms}")
    predictor = Predictor(model_file_path, "cpu")
    patch = tuple(patch) if patch else tuple(predictor.model.config.base_patch)
    return HearModel(predictor.model, predictor.info, predictor._norm(shift_ms), patch, shift_ms, hop_ms)


def _check_audio(audio: torch.Tensor) -> None:
    if not torch.is_tensor(audio) or audio.dim() != 2:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise ShapeError(f"audio must be a (n_sounds, n_samples) tensor, got {shape}")


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """``(N, D)`` float32 embeddings of ``(N, S)`` audio in [-1, 1] at ``model.sample_rate``."""
    _check_audio(audio)
    pooled, _, _ = model(audio)
    return pooled.to(audio.device)


def column_times_ms(model: HearModel, wt: int) -> torch.Tensor:
    """``(Wt,)`` centres of the time columns in ms (frame centres are half a window after their start)."""
    window_ms = float(model.info.get("features", {}).get("frame_length", 25.0))
    w = torch.arange(wt, dtype=torch.float64)
    return (w * model.patch[1] + (model.patch[1] - 1) / 2) * model.shift_ms + window_ms / 2  # (Wt,)


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, K, D)`` float32 embeddings and ``(N, K)`` timestamps in ms, ``K = ⌊duration / hop⌋ + 1``."""
    _check_audio(audio)
    n, samples = audio.shape
    _, columns, wt = model(audio)  # (N, Wt, D)
    centres = column_times_ms(model, wt)  # (Wt,)
    duration_ms = 1000.0 * samples / model.sample_rate
    k = int(duration_ms // model.hop_ms) + 1
    times = torch.arange(k, dtype=torch.float64) * model.hop_ms  # (K,)
    pos = torch.searchsorted(centres, times).clamp(1, max(wt - 1, 1))  # (K,) right neighbour column
    left = (pos - 1).clamp(min=0)
    span = (centres[pos] - centres[left]).clamp(min=1e-9) if wt > 1 else torch.ones(k, dtype=torch.float64)
    frac = ((times - centres[left]) / span).clamp(0.0, 1.0).float() if wt > 1 else torch.zeros(k)  # (K,)
    right = pos if wt > 1 else left
    emb = torch.lerp(columns[:, left], columns[:, right], frac[None, :, None])  # (N, K, D)
    stamps = times.float()[None].expand(n, k).contiguous()  # (N, K)
    return emb.to(audio.device), stamps.to(audio.device)
