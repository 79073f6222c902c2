"""Training losses: BCE (multi-label), CE (single-label), and knowledge distillation at temperature T.

Notation: ``N`` clips, ``C`` classes; ``logits (N, C)``; ``labels`` are ``(N, C)`` float targets
(multi-hot, or mixed) or ``(N,)`` int64 class indices.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from flexast.model.data import model_input, padded_view
from flexast.pipeline.batch import PackedBatch
from flexast.pipeline.errors import ConfigError


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean BCE-with-logits over clips and classes (``bce``), or mean cross-entropy over clips (``ce``)."""
    if kind == "bce":
        if labels.dim() == 1:
            labels = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    if kind == "ce":
        if labels.dim() == 2:  # soft or multi-hot targets: normalise to a distribution
            target = labels.to(logits.dtype)
            target = target / target.sum(1, keepdim=True).clamp_min(1e-12)
            return torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
        return F.cross_entropy(logits, labels)
    raise ConfigError(f"unknown loss {kind!r} (expected bce or ce)")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature ``T``, scaled by ``T²`` (Hinton et al.), mean over clips.

    Single-label (``ce``): KL between the softmax distributions over classes. Multi-label (``bce``):
    the sum over classes of the KL between per-class Bernoulli distributions ``sigmoid(z / T)``,
    divided by ``C`` (the same scale as BCE).
    """
    t = float(temperature)
    if kind == "ce":
        log_p_s = F.log_softmax(student / t, dim=1)
        log_p_t = F.log_softmax(teacher / t, dim=1)
        return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t
    s, z = student / t, teacher / t
    p_t = torch.sigmoid(z)
    # KL(Bern(p_t) || Bern(p_s)) with log-sigmoids for stability.
    kl = p_t * (F.logsigmoid(z) - F.logsigmoid(s)) + (1 - p_t) * (F.logsigmoid(-z) - F.logsigmoid(-s))
    return kl.mean() * t * t


def teacher_logits(teacher: torch.nn.Module, batch: PackedBatch, patch: tuple[int, int], padded: bool) -> torch.Tensor:
    """``(N, C)`` logits of the frozen KD teacher on the batch's clips, re-cut at the teacher's ``patch``
    (``recipe.kd.teacher_patch`` or its own kernel) when the batch's differs; the padded view as it is."""
    if padded:
        return teacher(padded_view(batch))
    if tuple(patch) == batch.patch:
        return teacher(batch)
    return teacher(
        PackedBatch.from_clips(
            batch.clip_frames(), batch.labels, batch.keys, patch, frame_shift_ms=batch.frame_shift_ms.cpu()
        )
    )


def train_loss(logits: torch.Tensor, batch, cfg, teacher: torch.nn.Module | None, padded: bool) -> torch.Tensor:
    """The training loss of ``(N, C)`` ``logits``: ``optim.loss`` (``auto``: ``ce`` for single labels, else
    ``bce``), mixed with ``recipe.kd``'s distillation loss against ``teacher`` when one is given."""
    name = cfg.optim.loss
    if name == "auto":
        name = "ce" if cfg.data.loader.label_mode == "index" else "bce"
    loss = supervised_loss(logits.float(), batch.labels, name)
    if teacher is None:
        return loss
    kd = cfg.recipe.kd
    with torch.no_grad():
        patch = tuple(kd.teacher_patch) or teacher.config.base_patch
        t_logits = teacher_logits(teacher, batch, patch, padded)
    return (1 - kd.alpha) * loss + kd.alpha * kd_loss(logits.float(), t_logits.float(), kd.temperature, name)


def batch_loss(model, batch: PackedBatch, cfg, teacher: torch.nn.Module | None, device: torch.device):
    """``model``'s forward on ``batch`` (bf16 autocast on CUDA) and its :func:`train_loss`: ``(loss, (N, C) logits)``.

    The classic padded AST (``data.loader.target_frames``) takes the batch's ``(B, T, F)`` view."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    padded = bool(cfg.data.loader.target_frames)
    with autocast:
        logits = model(model_input(batch, padded))
        return train_loss(logits, batch, cfg, teacher, padded), logits
