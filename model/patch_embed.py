"""Patch embedding with one base kernel, usable at any patch size (FlexiViT / FlexiAST).

Notation:
    F        mel bins, T frames (at the clip's own frame shift)
    (p_f, p_t)   patch size in (mel bins, frames); (p0_f, p0_t) the stored base kernel's size
    Hf = F // p_f frequency patches, Wt time patches, D width

The stored kernel ``proj.weight`` is ``(D, 1, p0_f, p0_t)`` (timm/AST name ``patch_embed.proj``). At another
patch size it is resized by:

* ``pi``: PI-resize, ŵ = pinv(Bᵀ)·vec(w), where ``B`` (``p_f·p_t × p0_f·p0_t``) is the bilinear resize
  (``align_corners=False``, no antialias) of a patch, built by resizing one-hot basis patches. For
  upsampling, ⟨x, w⟩ = ⟨B x, ŵ⟩ exactly. The ``pinv(Bᵀ)`` matrix is computed in float64 and cached per
  (base, target, device, dtype) in a plain dict: never in the state dict, and cleared by ``.to()`` (``_apply``).
  The kernel resize (``w @ pinvᵀ``) runs with autocast off, in the weight's dtype (float32 in mixed precision);
  only the patch projection itself runs in autocast's dtype.
* ``bilinear``: the kernel itself is resized bilinearly (FlexiViT's "vanilla" resize).
* ``none``: no resize; only the base size is accepted.

``resize_axes="time"`` allows only time to change (``p_f == p0_f``), as FlexiAST did for speaker tasks.
A patch *size* ``p`` names a time width; :func:`patch_of` gives its ``(p_f, p_t)``: the base kernel's shape
scaled to width ``p`` (``p × p`` for a square base), or ``(p0_f, p)`` with ``resize_axes="time"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexast.model.errors import ModelConfigError, ShapeError

RESIZE_MODES = ("pi", "bilinear", "none")


def resize_matrix(old: tuple[int, int], new: tuple[int, int], dtype=torch.float64, device=None) -> torch.Tensor:
    """Bilinear resize of an ``old`` patch to ``new`` as a matrix ``B``: ``(new_f·new_t, old_f·old_t)``."""
    n_old = old[0] * old[1]
    basis = torch.eye(n_old, dtype=dtype, device=device).view(n_old, 1, *old)  # (n_old, 1, old_f, old_t)
    resized = F.interpolate(basis, size=new, mode="bilinear", align_corners=False, antialias=False)
    return resized.view(n_old, new[0] * new[1]).T  # (n_new, n_old)


def _resize_matrix_1d(old: int, new: int, device=None) -> torch.Tensor:
    """1-D linear resize (align_corners=False, as the 2-D bilinear one per axis) as a ``(new, old)`` float64 matrix."""
    return resize_matrix((1, old), (1, new), torch.float64, device)  # (new, old)


def pi_resize_matrix(old: tuple[int, int], new: tuple[int, int], device=None) -> torch.Tensor:
    """``pinv(Bᵀ)`` in float64: ``(n_new, n_old)``, so that ``vec(ŵ) = pinv(Bᵀ) · vec(w)``.

    Bilinear resizing is separable, ``B = B_f ⊗ B_t`` (row-major ``(p_f, p_t)`` flattening), and the
    pseudo-inverse of a Kronecker product is the product of the pseudo-inverses, so
    ``pinv(Bᵀ) = pinv(B_fᵀ) ⊗ pinv(B_tᵀ)``: two tiny SVDs instead of one ``p²×p0²`` SVD (seconds at p = 48).
    """
    pinv_f = torch.linalg.pinv(_resize_matrix_1d(old[0], new[0], device).T)  # (new_f, old_f)
    pinv_t = torch.linalg.pinv(_resize_matrix_1d(old[1], new[1], device).T)  # (new_t, old_t)
    return torch.kron(pinv_f, pinv_t)  # (new_f·new_t, old_f·old_t)


def patch_of(base_patch: tuple[int, int], resize_axes: str, p: int) -> tuple[int, int]:
    """``(p_f, p_t)`` of patch size ``p`` (a time width) for a kernel stored at ``base_patch``.

    ``time``: ``(p0_f, p)``; ``both``: the base shape scaled to width ``p``, ``(round(p · p0_f / p0_t), p)``,
    which is ``(p, p)`` for a square base (FlexiAST's sizes).
    """
    if resize_axes not in ("both", "time"):
        raise ModelConfigError(f"resize_axes must be 'both' or 'time', got {resize_axes!r}")
    p0_f, p0_t = int(base_patch[0]), int(base_patch[1])
    if resize_axes == "time":
        return (p0_f, int(p))
    return (max(1, round(int(p) * p0_f / p0_t)), int(p))


class FlexiPatchEmbed(nn.Module):
    """Linear patch embedding whose base kernel is resized to the patch size of each call.

    Args:
        dim: output width ``D``.
        base_patch: ``(p0_f, p0_t)`` size of the stored kernel.
        resize: ``pi``, ``bilinear`` or ``none``.
        resize_axes: ``both`` or ``time`` (frequency size pinned to ``p0_f``).
    """

    def __init__(self, dim: int, base_patch: tuple[int, int] = (16, 16), resize: str = "pi", resize_axes: str = "both"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ModelConfigError(f"patch resize must be one of {RESIZE_MODES}, got {resize!r}")
        if resize_axes not in ("both", "time"):
            raise ModelConfigError(f"resize_axes must be 'both' or 'time', got {resize_axes!r}")
        self.base_patch = (int(base_patch[0]), int(base_patch[1]))
        self.resize = resize
        self.resize_axes = resize_axes
        self.proj = nn.Conv2d(1, dim, kernel_size=self.base_patch, stride=self.base_patch)
        # Counters of cache hits would be module state mutated in forward: torch.compile guards on such ints and
        # recompiles every step (issue 16). The cache's keys are the only record: one entry per patch size.
        self._pinv: dict[tuple, torch.Tensor] = {}

    def _apply(self, fn, *args, **kwargs):
        self._pinv.clear()  # device or dtype may change: cached matrices are stale
        return super()._apply(fn, *args, **kwargs)

    def _pinv_matrix(self, patch: tuple[int, int], device, dtype) -> torch.Tensor:
        key = (self.base_patch, patch, torch.device(device), dtype)
        if key not in self._pinv:
            self._pinv[key] = pi_resize_matrix(self.base_patch, patch, device).to(dtype)
        return self._pinv[key]

    def kernel(self, patch: tuple[int, int]) -> torch.Tensor:
        """The ``(D, 1, p_f, p_t)`` kernel for ``patch`` (differentiable in the base kernel)."""
        patch = (int(patch[0]), int(patch[1]))
        w = self.proj.weight  # (D, 1, p0_f, p0_t)
        if patch == self.base_patch:
            return w
        if self.resize_axes == "time" and patch[0] != self.base_patch[0]:
            raise ShapeError(
                f"resize_axes='time' pins the frequency patch size to {self.base_patch[0]}, got patch {patch}"
            )
        if self.resize == "none":
            raise ShapeError(f"patch resize 'none' only runs at the base patch {self.base_patch}, got {patch}")
        if self.resize == "bilinear":
            return F.interpolate(w, size=patch, mode="bilinear", align_corners=False, antialias=False)
        m = self._pinv_matrix(patch, w.device, w.dtype)  # (n_new, n_old)
        with torch.autocast(w.device.type, enabled=False):  # the resize in the weight's dtype, never bf16/fp16
            flat = w.reshape(w.shape[0], -1) @ m.T  # (D, n_new)
        return flat.view(w.shape[0], 1, *patch)  # (D, 1, p_f, p_t)

    def forward_packed(self, frames: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
        """Embed packed frames with non-overlapping patches, one reshape for the whole batch.

        Args:
            frames: ``(ΣT, F)``; every clip's frame count is a multiple of ``p_t``.
            patch: ``(p_f, p_t)``.

        Returns:
            ``(ΣWt · Hf, D)`` tokens in time-major order: token ``j`` of a clip sits at time patch
            ``j // Hf`` and frequency patch ``j % Hf``.
        """
        p_f, p_t = patch
        total, n_mels = frames.shape
        hf = n_mels // p_f
        if hf == 0 or total % p_t:
            raise ShapeError(f"cannot patchify frames of shape {tuple(frames.shape)} at patch {patch}")
        w = self.kernel(patch)  # (D, 1, p_f, p_t)
        x = frames[:, : hf * p_f].reshape(total // p_t, p_t, hf, p_f)  # (ΣWt, p_t, Hf, p_f)
        x = x.permute(0, 2, 3, 1).reshape(total // p_t * hf, p_f * p_t)  # (ΣWt·Hf, p_f·p_t)
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1), self.proj.bias)  # (ΣWt·Hf, D)

    def forward(self, x: torch.Tensor, patch: tuple[int, int] | None = None, stride=None) -> torch.Tensor:
        """Classic strided (optionally overlapping) patch embedding of a padded batch.

        Args:
            x: ``(B, 1, F, T)`` spectrogram images.
            patch: ``(p_f, p_t)``; None means the base patch.
            stride: ``(s_f, s_t)``; None means non-overlapping (the patch size).

        Returns:
            ``(B, D, Hf, Wt)`` with ``Hf = (F - p_f) // s_f + 1`` and ``Wt = (T - p_t) // s_t + 1``.
        """
        patch = self.base_patch if patch is None else (int(patch[0]), int(patch[1]))
        stride = patch if stride is None else stride
        if x.shape[-2] < patch[0] or x.shape[-1] < patch[1]:
            raise ShapeError(f"input of shape {tuple(x.shape)} is smaller than one patch {patch}")
        w = self.kernel(patch)
        return F.conv2d(x.to(w.dtype), w, self.proj.bias, stride=tuple(stride))


@torch.no_grad()
def resample_patch_embed(embed: FlexiPatchEmbed, patch: tuple[int, int], method: str = "pi") -> torch.Tensor:
    """``embed``'s kernel resized to ``patch`` by ``method`` (``pi`` or ``bilinear``), whatever its own mode.

    The weight of a layer at another native patch size (a coarse-to-fine phase, initialisation from a
    checkpoint of another geometry), as timm's ``resample_patch_embed`` beside its layer.

    Returns:
        A new ``(D, 1, p_f, p_t)`` tensor.
    """
    saved = embed.resize
    embed.resize = method
    try:
        return embed.kernel(tuple(patch)).detach().clone()  # (D, 1, p_f, p_t)
    finally:
        embed.resize = saved
