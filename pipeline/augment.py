"""Feature augmentation and the one AST normalisation.

Notation: ``x`` is one clip's ``(T, F)`` log-mel fbank (``T`` frames at the clip's own frame shift,
``F`` mel bins). A clip's compression ``C`` is its frame shift over 10 ms times any pooling factor
(ElasticAST: a 20 ms clip has C = 2), so one frame covers ``C`` base frames.

Order in the stream (as in the AST repository, where masks are applied before normalising):
crop → mixup (within a packed batch) → SpecAugment → :func:`normalise`.
Every function returns a new tensor and leaves its inputs alone, unless asked to work in place
(``out=``, ``inplace=True``), which the stream does on its own buffers.
"""

from __future__ import annotations

import numpy as np
import torch

from flexast.pipeline.errors import BatchError


def normalise(x, mean: float, std: float, out: torch.Tensor | None = None):
    """AST normalisation ``(x − mean) / (2·std)``; the only copy of it (the model's predict uses it too).

    Works on numpy arrays and tensors; ``out`` (a tensor, may be ``x`` itself) receives the result in place.
    """
    if out is not None:
        return torch.sub(x, mean, out=out).div_(2.0 * std)
    return (x - mean) / (2.0 * std)


def spec_augment(
    x: torch.Tensor,
    freq_mask: int,
    time_mask: int,
    rng: np.random.Generator,
    compression: float = 1.0,
    n_freq_masks: int = 1,
    n_time_masks: int = 1,
    inplace: bool = False,
) -> torch.Tensor:
    """SpecAugment masks set to 0 (raw log-mel space, as the AST repository does).

    Each mask's width is drawn uniformly from ``[0, max)``; the time mask's maximum is
    ``time_mask / compression`` frames, so it covers the same duration at every resolution
    (ElasticAST). Widths are clipped to the clip.

    Args:
        x: ``(T, F)`` features.
        freq_mask: maximum frequency-mask width in bins (AudioSet: 48); 0 disables.
        time_mask: maximum time-mask width in 10 ms frames (AudioSet: 192); 0 disables.
        rng: the clip's generator.
        compression: the clip's compression ``C``.
        inplace: mask ``x`` itself (the stream does, on its own buffer) instead of a copy.
    """
    out = x if inplace else x.clone()
    t, f = out.shape
    t_max = int(time_mask / compression)
    for _ in range(n_freq_masks if freq_mask > 0 else 0):
        w = int(rng.integers(0, min(freq_mask, f) + 1)) if freq_mask else 0
        s = int(rng.integers(0, f - w + 1))
        out[:, s : s + w] = 0
    for _ in range(n_time_masks if t_max > 0 else 0):
        w = int(rng.integers(0, min(t_max, t) + 1))
        s = int(rng.integers(0, t - w + 1))
        out[s : s + w, :] = 0
    return out


def _fit_length(x: torch.Tensor, t: int) -> torch.Tensor:
    """``x`` tiled (if shorter) or cut from its start (if longer) to ``t`` frames: ``(t, F)``."""
    if x.shape[0] >= t:
        return x[:t]
    reps = -(-t // x.shape[0])
    return x.repeat(reps, 1)[:t]  # (reps·T, F) → (t, F)


def mixup(
    clips: list[torch.Tensor],
    labels: torch.Tensor,
    alpha: float,
    prob: float,
    rng: np.random.Generator,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Mixup within one packed batch; clip lengths never change.

    With probability ``prob`` clip ``i`` is mixed with a partner ``j ≠ i`` drawn uniformly from the
    batch: ``x_i ← λ x_i + (1 − λ) x̃_j`` and ``y_i ← λ y_i + (1 − λ) y_j`` with ``λ ~ Beta(α, α)``
    drawn per clip. Clips of different lengths mix by fitting the partner to ``T_i``: a longer partner
    is cut to its first ``T_i`` frames, a shorter one is tiled (repeated) until it covers ``T_i``.
    The partner's frames are the unmixed originals.

    Args:
        clips: N ``(T_i, F)`` tensors.
        labels: ``(N, C)`` float targets (multi-hot or one-hot).
        alpha: Beta parameter (AST: 10).
        prob: chance that a clip is mixed (AST: 0.5).
        rng: the batch's generator.
    """
    n = len(clips)
    if labels.dim() != 2 or not labels.is_floating_point():
        raise BatchError(f"mixup needs (N, C) float labels, got {tuple(labels.shape)} {labels.dtype}")
    out_x = list(clips)
    if n < 2 or prob <= 0:
        return out_x, labels.clone()
    pairs = []  # (i, j, λ)
    for i in range(n):
        if rng.random() >= prob:
            continue
        j = int(rng.integers(n - 1))
        j += j >= i
        pairs.append((i, j, float(rng.beta(alpha, alpha))))
    for i, j, lam in pairs:
        out_x[i] = torch.lerp(_fit_length(clips[j], clips[i].shape[0]), clips[i], lam)  # λ x_i + (1 − λ) x̃_j
    out_y = labels.clone()
    if pairs:
        idx_i = [i for i, _, _ in pairs]
        idx_j = [j for _, j, _ in pairs]
        lam = torch.tensor([p[2] for p in pairs], dtype=labels.dtype)[:, None]  # (M, 1)
        out_y[idx_i] = lam * labels[idx_i] + (1 - lam) * labels[idx_j]  # (M, C)
    return out_x, out_y
