"""Analytic FLOPs of a training or inference step, from each clip's token count.

Notation: clip ``i`` has ``L_i`` patch tokens and ``n_i = L_i + P`` encoder tokens (``P`` prefix tokens);
``D`` width, ``M`` MLP hidden width, ``C`` classes, ``(p_f, p_t)`` patch. A multiply-add counts 2 FLOPs;
norms, softmax, GELU and residual adds are not counted (as in ``torch.utils.flop_counter``).

Forward, per clip:
    patch embedding   2·L_i·(p_f·p_t)·D
    qkv + out proj    depth · (2·n_i·D·3D + 2·n_i·D·D)
    attention         depth · (2·n_i²·D [QKᵀ] + 2·n_i²·D [AV])     quadratic in the clip's own length only
    MLP               depth · 2·(2·n_i·D·M)
    head              attention pooling (2·L_i·D·2D + 4·L_i·D + 2·D·D, ``pool="attn"``) + classifier 2·D·C

Backward is twice the forward (input and weight gradients), except the patch embedding whose input needs no
gradient (once). Token counts come from :func:`pipeline.batch.token_count`, the one place tokens are counted.
Token dropout (ElasticAST training) is not modelled: pass the kept counts to :func:`model_flops` to include it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flexast.model.ast import ModelConfig
from flexast.pipeline.batch import PackedBatch, token_count


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs by part, and the backward and total (forward + backward if requested)."""

    patch_embed: int
    qkv_proj: int
    attention: int
    mlp: int
    head: int
    backward: int

    @property
    def forward(self) -> int:
        return self.patch_embed + self.qkv_proj + self.attention + self.mlp + self.head

    @property
    def total(self) -> int:
        return self.forward + self.backward


def model_flops(config: ModelConfig, tokens: Sequence[int], patch: tuple[int, int], backward: bool = True) -> FlopCount:
    """FLOPs for clips with ``tokens[i]`` patch tokens each at ``patch``.

    Args:
        config: the model.
        tokens: patch tokens per clip (``token_count`` of each clip; for the classic overlapping path, the
            conv grid size ``Hf·Wt``).
        patch: ``(p_f, p_t)`` kernel size.
        backward: include the backward pass (training step); False for inference.
    """
    d, depth, c = config.embed_dim, config.depth, config.num_classes
    hidden = round(d * config.mlp_ratio)
    p = config.n_prefix
    toks = [int(t) for t in tokens]
    n_sum = sum(t + p for t in toks)
    n_sq = sum((t + p) ** 2 for t in toks)
    patch_embed = 2 * sum(toks) * patch[0] * patch[1] * d
    qkv_proj = depth * (2 * n_sum * d * 3 * d + 2 * n_sum * d * d)
    attention = depth * 4 * n_sq * d
    mlp = depth * 4 * n_sum * d * hidden
    head = len(toks) * 2 * d * c
    if config.pool == "attn":
        head += sum(2 * t * d * 2 * d + 4 * t * d for t in toks) + len(toks) * 2 * d * d
    bwd = 2 * (qkv_proj + attention + mlp + head) + patch_embed if backward else 0
    return FlopCount(patch_embed, qkv_proj, attention, mlp, head, bwd)


def batch_flops(config: ModelConfig, batch: PackedBatch, backward: bool = True) -> FlopCount:
    """FLOPs of one packed step (``batch.tokens``, from the one ``token_count``)."""
    return model_flops(config, batch.tokens.detach().cpu().tolist(), batch.patch, backward)


def padded_flops(
    config: ModelConfig,
    batch_size: int,
    n_frames: int,
    fstride: int | None = None,
    tstride: int | None = None,
    backward: bool = True,
) -> FlopCount:
    """FLOPs of one classic padded step: ``batch_size`` inputs of ``n_frames`` frames, overlapping strides."""
    p_f, p_t = config.base_patch
    stride = (fstride or config.fstride, tstride or config.tstride)
    per_clip = int(token_count(n_frames, config.n_mels, (p_f, p_t), stride=stride))
    return model_flops(config, [per_clip] * batch_size, (p_f, p_t), backward)


def train_flops(config: ModelConfig, batch) -> int:
    """Forward + backward FLOPs of one training step on a :class:`PackedBatch` or a padded batch.

    A padded batch is anything with a ``(B, T, F)`` tensor ``x`` (the classic path, the config's strides).
    """
    if isinstance(batch, PackedBatch):
        return batch_flops(config, batch).total
    b, t, _ = batch.x.shape
    return padded_flops(config, b, t).total
