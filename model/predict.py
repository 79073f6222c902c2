"""``model predict``: label audio files of any length, sample rate and format with a trained checkpoint.

Notation: ``S`` samples at 16 kHz (or the run's rate), ``T`` frames at the chosen frame shift, ``F`` mel
bins, ``C`` classes, ``D`` embedding width.

Each file is decoded by :func:`pipeline.audio.load_audio` (mono, resampled), featurised with the same
Kaldi fbank options as the training shards (saved in ``labels.json`` beside the weights) at
``shift_ms``, normalised with the training statistics (as ``model eval`` does), and run whole (no cut,
no padding; the centred whole patches are kept, as ``model eval`` does; a clip shorter than one patch is
padded to one patch) at ``patch``. Unreadable files yield an error entry and
the remaining files still run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flexast.model.checkpoint import load_checkpoint
from flexast.model.data import norm_from_info
from flexast.model.run_dir import read_labels
from flexast.pipeline.augment import normalise
from flexast.pipeline.batch import PackedBatch, trim_frames
from flexast.pipeline.errors import PipelineError


@dataclass
class Prediction:
    """One file's result: top-k ``(name, display name, score)`` or an ``error``; timing in seconds."""

    path: str
    labels: list[tuple[str, str, float]] = field(default_factory=list)
    seconds_audio: float = 0.0
    seconds_compute: float = 0.0
    tokens: int = 0
    error: str | None = None

    def to_json(self) -> dict:
        """Plain JSON data; scores are always finite (:meth:`Predictor.predict` turns others into an error)."""
        out = {
            "path": self.path,
            "seconds_audio": round(self.seconds_audio, 3),
            "seconds_compute": round(self.seconds_compute, 4),
            "tokens": self.tokens,
        }
        if self.error:
            out["error"] = self.error
        else:
            out["top"] = [{"label": n, "display_name": d, "score": round(s, 5)} for n, d, s in self.labels]
        return out


class Predictor:
    """A loaded checkpoint plus the feature recipe of its training data."""

    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = load_checkpoint(checkpoint, self.device).eval()
        self.info = read_labels(checkpoint)
        numbers = [str(i) for i in range(self.model.config.num_classes)]  # a checkpoint saved without labels
        self.names = list(self.info.get("names", numbers))
        self.display = list(self.info.get("display_names", self.names))
        self.single = self.info.get("labels", "multi") == "single"

    def _norm(self, shift_ms: float) -> tuple[float, float]:
        """The training statistics (``model eval`` normalises with the same: :func:`model.data.norm_from_info`)."""
        return norm_from_info(self.info, shift_ms)

    def features(self, path: str, shift_ms: float) -> tuple[np.ndarray, float]:
        """``(T, F)`` normalised fbank of one file and its duration in seconds."""
        from flexast.pipeline.audio import load_audio, subtract_mean
        from flexast.pipeline.build_config import AST_FBANK
        from flexast.pipeline.fbank import fbank

        sr = int(self.info.get("sample_rate", 16000))
        audio = load_audio(path, sample_rate=sr)
        wave = torch.from_numpy(subtract_mean(audio.waveform))
        opts = {**AST_FBANK, **self.info.get("features", {}), "sample_frequency": sr}
        opts["num_mel_bins"] = self.model.config.n_mels
        feats = fbank(wave, shifts_ms=[shift_ms], **opts)[shift_ms][0].numpy()  # (T, F)
        mean, std = self._norm(shift_ms)
        return normalise(feats, mean, std), audio.duration_s

    @torch.no_grad()
    def predict(
        self,
        paths: Sequence[str],
        *,
        patch: tuple[int, int] | None = None,
        shift_ms: float = 10.0,
        top_k: int = 5,
        embeddings_out: str | Path | None = None,
    ) -> list[Prediction]:
        """Top-``k`` labels per file (errors kept per file); optionally save pooled embeddings ``(N_ok, D)``."""
        patch = tuple(patch) if patch else tuple(self.model.config.base_patch)
        results, embs = [], []
        for path in paths:
            t0 = time.perf_counter()
            try:
                x, dur = self.features(str(path), shift_ms)
            except (PipelineError, OSError, RuntimeError, ValueError) as exc:
                results.append(Prediction(str(path), error=f"{type(exc).__name__}: {exc}"))
                continue
            if x.shape[0] == 0:
                results.append(Prediction(str(path), error=f"shorter than one 25 ms window ({dur:.3f} s)"))
                continue
            if not np.isfinite(x).all():  # audio far outside [-1, 1], or non-finite normalisation statistics
                n_bad, norm = int((~np.isfinite(x)).sum()), self._norm(shift_ms)
                error = (
                    f"{n_bad} of {x.size} normalised features are NaN/Inf (samples far outside [-1, 1]? norm {norm})"
                )
                results.append(Prediction(str(path), error=error))
                continue
            keep = max(trim_frames(x.shape[0], patch[1]), patch[1])
            if x.shape[0] < keep:
                x = np.concatenate([x, np.zeros((keep - x.shape[0], x.shape[1]), np.float32)])
            start = (x.shape[0] - keep) // 2  # the centred whole patches, as model eval's loader cuts
            batch = PackedBatch.from_clips(
                [torch.from_numpy(np.ascontiguousarray(x[start : start + keep], dtype=np.float32))],
                torch.zeros(1, len(self.names)),
                [Path(path).name],
                patch,
                frame_shift_ms=[shift_ms],
            ).to(self.device)
            logits, emb = self.model(batch, return_embeddings=True)
            prob = (torch.softmax(logits, 1) if self.single else torch.sigmoid(logits))[0].float().cpu()
            if not torch.isfinite(prob).all():  # never a bare NaN in --json output: an error entry instead
                error = f"the model gave {int((~torch.isfinite(prob)).sum())} NaN/Inf scores (non-finite weights?)"
                results.append(Prediction(str(path), error=error))
                continue
            k = min(top_k, prob.shape[0])
            top = torch.topk(prob, k)
            labels = [
                (self.names[i], self.display[i], float(s))
                for s, i in zip(top.values, top.indices.tolist(), strict=True)
            ]
            results.append(Prediction(str(path), labels, dur, time.perf_counter() - t0, batch.total_tokens))
            embs.append(emb[0].float().cpu().numpy())
        if embeddings_out is not None:
            arr = np.stack(embs) if embs else np.zeros((0, self.model.config.embed_dim), np.float32)
            np.save(embeddings_out, arr, allow_pickle=False)
        return results


def format_table(results: list[Prediction]) -> str:
    """A plain-text table: one block per file, top labels with scores, or the error."""
    lines = []
    for r in results:
        if r.error:
            lines.append(f"{r.path}: ERROR {r.error}")
            continue
        lines.append(f"{r.path}  ({r.seconds_audio:.2f} s audio, {r.tokens} tokens, {1000 * r.seconds_compute:.1f} ms)")
        for name, display, score in r.labels:
            lines.append(f"    {score:6.3f}  {display}" + (f"  [{name}]" if name != display else ""))
    return "\n".join(lines)
