"""Block-diagonal multi-head attention over packed clips, with interchangeable backends.

Notation:
    N   clips (segments) in the batch
    L   total tokens of all clips, concatenated; clip i owns rows ``cu[i]:cu[i+1]``
    H   heads, ``Dh`` head width, ``D = H * Dh``

A token attends only to the tokens of its own clip. Queries and keys may be segmented differently
(attention pooling has one query per clip and that clip's tokens as keys), so every backend takes a
query :class:`Segments` and a key :class:`Segments`.

Backends (see DESIGN.md, "Attention backends"):
    ``varlen``     ``torch.nn.attention.varlen.varlen_attn`` (flash, CUDA sm80+, bf16/fp16), called positionally.
    ``sdpa_loop``  one SDPA call per clip; the fastest exact CPU path for forward and backward.
    ``padded``     clips padded to the longest, one SDPA call with a key mask; good for many tiny clips.
    ``flex``       FlexAttention with a document BlockMask built once per batch; GPU only (no CPU backward).
    ``auto``       resolved once per run and activation dtype by :func:`resolve_backend`.

``varlen``'s input rules (bf16/fp16 q, k, v of one dtype; contiguous; int32 ``cu`` on the tokens' device whose
last entries are the token totals; ``max_len`` at least the longest segment) are checked on the CPU in CI by a
stand-in op, ``tests/model/varlen_standin.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flexast.model.errors import BackendError, ModelConfigError

BACKENDS = ("varlen", "sdpa_loop", "padded", "flex")


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` without a host↔device sync: pinned and ``non_blocking`` for CUDA.

    A plain ``.to("cuda")`` of pageable memory waits for the stream (every queued kernel) before copying: a sync
    per call. The pinned buffer stays valid until the copy ran (torch's caching host allocator records it).
    """
    device = torch.device(device) if device is not None else t.device
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass(eq=False)
class Segments:
    """Where each clip's tokens lie in a flat token tensor.

    Attributes:
        cu: ``(N+1,)`` int32 cumulative offsets, on the tokens' device.
        max_len: longest segment, a Python int (no device sync per layer).
        total: total tokens ``L``, a Python int.
        uniform: every segment has this length (a padded batch reshaped flat), or None.
    """

    cu: torch.Tensor
    max_len: int
    total: int
    uniform: int | None = None
    _lengths: list[int] | None = None
    cache: dict = field(default_factory=dict)

    @classmethod
    def from_lengths(cls, lengths, device=None) -> Segments:
        """Segments from per-clip token counts (a list or a CPU tensor)."""
        lengths = [int(x) for x in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
        return cls(host_to_device(cu, device), max(lengths, default=0), sum(lengths), None, lengths)

    @classmethod
    def uniform_rows(cls, n: int, length: int, device=None) -> Segments:
        """``n`` segments of ``length`` tokens each (a ``(n, length)`` batch viewed flat)."""
        cu = torch.arange(n + 1, dtype=torch.int32, device=device) * length
        return cls(cu, length, n * length, length, [length] * n)

    @property
    def n(self) -> int:
        return int(self.cu.shape[0]) - 1

    def lengths(self) -> list[int]:
        """Per-segment lengths as Python ints (one host copy the first time, if built from a device ``cu``)."""
        if self._lengths is None:
            cu = self.cu.detach().to("cpu", torch.int64)
            self._lengths = (cu[1:] - cu[:-1]).tolist()
        return self._lengths

    def segment_ids(self) -> torch.Tensor:
        """``(L,)`` int64 clip index of every token, on ``cu``'s device (cached)."""
        if "ids" not in self.cache:
            lengths = (self.cu[1:] - self.cu[:-1]).long()
            ids = torch.arange(self.n, device=self.cu.device)
            self.cache["ids"] = torch.repeat_interleave(ids, lengths, output_size=self.total)
        return self.cache["ids"]

    def positions(self) -> torch.Tensor:
        """``(L,)`` int64 index of every token inside its own clip (cached)."""
        if "pos" not in self.cache:
            ids = self.segment_ids()
            self.cache["pos"] = torch.arange(self.total, device=self.cu.device) - self.cu.long()[ids]
        return self.cache["pos"]

    def prepare(self, backend: str, device: torch.device) -> None:
        """Build, outside any compiled region, everything ``backend`` derives from these segments (self-attention).

        The encoder calls it once per batch before its blocks, so that a compiled block only reads ``cu``,
        ``max_len``, ``total`` and a cache whose keys are always the same: no guard on host lists, no
        recompilation per batch.
        """
        if self.uniform is not None:
            return
        if backend == "padded":
            _pad_index(self)
        elif backend == "flex":
            _flex_mask(self, self, device)
        elif backend == "sdpa_loop":
            self.lengths()

    def with_prefix(self, n_prefix: int) -> Segments:
        """The segments after ``n_prefix`` tokens ([CLS], [DIST]) are put in front of every clip."""
        if n_prefix == 0:
            return self
        shift = torch.arange(self.n + 1, dtype=torch.int32, device=self.cu.device) * n_prefix
        lengths = None if self._lengths is None else [x + n_prefix for x in self._lengths]
        uniform = None if self.uniform is None else self.uniform + n_prefix
        return Segments(self.cu + shift, self.max_len + n_prefix, self.total + self.n * n_prefix, uniform, lengths)


def resolve_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The concrete backend for ``name`` on this device and activation dtype; ``auto`` picks the fastest exact one.

    ``auto``: ``varlen`` on CUDA sm80+ with bf16/fp16 activations where torch has it, ``flex`` on older CUDA
    in bf16/fp16, else ``padded`` on CUDA (float32: one SDPA call, no compile per process) and ``sdpa_loop`` on
    the CPU. ``varlen`` asked for float32 activations (evaluation or prediction without autocast) runs
    ``padded``: flash attention has no float32 kernel, and the model resolves per dtype, so the bf16
    training passes still use ``varlen``.
    """
    device = torch.device(device)
    half = dtype in (torch.bfloat16, torch.float16)
    if name == "auto":
        if device.type == "cuda" and half:
            return "varlen" if _has_varlen() and _sm80(device) else "flex"
        return "padded" if device.type == "cuda" else "sdpa_loop"
    if name not in BACKENDS:
        raise BackendError(f"unknown attention backend {name!r}; choose one of {('auto', *BACKENDS)}")
    if (name == "varlen" and device.type not in VARLEN_DEVICES) or (name == "flex" and device.type != "cuda"):
        raise BackendError(f"attention backend {name!r} needs a CUDA device, got {device}")
    if name == "varlen" and not _has_varlen():
        raise BackendError(f"attention backend 'varlen' needs torch>=2.10, this is torch {torch.__version__}")
    if name == "varlen" and not half:
        return "padded"
    return name


# Devices whose varlen kernel exists; tests add "cpu" with a CPU stand-in that enforces flash's input rules
# (tests/model/varlen_standin.py), which they install by replacing :func:`_varlen_op`.
VARLEN_DEVICES = ("cuda",)


def _varlen_op():
    """The varlen attention function, called positionally (argument names changed across torch versions)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _has_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _sm80(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_seg: Segments,
    k_seg: Segments,
    backend: str,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Block-diagonal softmax attention, scale ``1/sqrt(Dh)``.

    Args:
        q: ``(Lq, H, Dh)`` queries, clip i at ``q_seg.cu[i]:q_seg.cu[i+1]``.
        k: ``(Lk, H, Dh)`` keys, clip i at ``k_seg.cu[i]:k_seg.cu[i+1]``.
        v: ``(Lk, H, Dh)`` values.
        q_seg: query segments.
        k_seg: key segments, same clip count as ``q_seg``; every key segment must be non-empty.
        backend: a concrete backend name (see :func:`resolve_backend`).
        dropout_p: attention-probability dropout (training only; ``varlen`` has none and refuses it).

    Returns:
        ``(Lq, H, Dh)`` attention output.
    """
    if q_seg.uniform is not None and k_seg.uniform is not None:
        return _uniform(q, k, v, q_seg, k_seg, dropout_p)
    if backend == "sdpa_loop":
        return _sdpa_loop(q, k, v, q_seg, k_seg, dropout_p)
    if backend == "padded":
        return _padded(q, k, v, q_seg, k_seg, dropout_p)
    if backend == "varlen":
        return _varlen(q, k, v, q_seg, k_seg, dropout_p)
    if backend == "flex":
        return _flex(q, k, v, q_seg, k_seg, dropout_p)
    raise BackendError(f"unknown attention backend {backend!r}; resolve it with resolve_backend() first")


def _uniform(q, k, v, q_seg, k_seg, dropout_p):
    """Equal-length clips: a plain batched SDPA, whatever the backend."""
    n, h, dh = q_seg.n, q.shape[1], q.shape[2]
    qb = q.view(n, q_seg.uniform, h, dh).transpose(1, 2)  # (N, H, Lq_i, Dh)
    kb = k.view(n, k_seg.uniform, h, dh).transpose(1, 2)  # (N, H, Lk_i, Dh)
    vb = v.view(n, k_seg.uniform, h, dh).transpose(1, 2)  # (N, H, Lk_i, Dh)
    out = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p)  # (N, H, Lq_i, Dh)
    return out.transpose(1, 2).reshape(q.shape)  # (Lq, H, Dh)


@torch.compiler.disable  # splits by host lengths: run eagerly inside a compiled block instead of guarding on them
def _sdpa_loop(q, k, v, q_seg, k_seg, dropout_p):
    """One SDPA per clip on views of the flat tensors; exact and isolated by construction.

    Clips are split along the token axis of head-major views, so each clip's output is a contiguous
    ``(H, L_i, Dh)`` block: the concatenation (and, in backward, the split's gradient) copies whole blocks.
    The 4D SDPA call reaches the fused CPU flash kernel for forward and backward; 3D inputs fall back to the
    unfused math path, measured 2-3x slower for fwd+bwd at 200-2000 tokens.
    """
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, L, Dh) views
    qs = torch.split(qh, q_seg.lengths(), 1)
    ks = torch.split(kh, k_seg.lengths(), 1)
    vs = torch.split(vh, k_seg.lengths(), 1)
    outs = [
        F.scaled_dot_product_attention(qi[None], ki[None], vi[None], dropout_p=dropout_p)[0]  # (H, Lq_i, Dh)
        for qi, ki, vi in zip(qs, ks, vs, strict=True)
    ]
    return torch.cat(outs, 1).transpose(0, 1)  # (Lq, H, Dh)


def _pad_index(seg: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat-to-padded scatter index ``(L,)`` into ``N * max_len`` slots, and the ``(N, max_len)`` validity mask."""
    if "pad" not in seg.cache:
        ids, pos = seg.segment_ids(), seg.positions()
        dest = ids * seg.max_len + pos  # (L,)
        lengths = (seg.cu[1:] - seg.cu[:-1]).long()
        valid = torch.arange(seg.max_len, device=seg.cu.device)[None, :] < lengths[:, None]  # (N, max_len)
        seg.cache["pad"] = (dest, valid)
    return seg.cache["pad"]


def _to_padded(x: torch.Tensor, seg: Segments) -> torch.Tensor:
    dest, _ = _pad_index(seg)
    out = x.new_zeros(seg.n * seg.max_len, *x.shape[1:]).index_copy(0, dest, x)  # (N*max_len, H, Dh)
    return out.view(seg.n, seg.max_len, *x.shape[1:]).transpose(1, 2)  # (N, H, max_len, Dh)


def _padded(q, k, v, q_seg, k_seg, dropout_p):
    """Pad every clip to the longest and run one SDPA with a boolean key mask."""
    qb, kb, vb = _to_padded(q, q_seg), _to_padded(k, k_seg), _to_padded(v, k_seg)
    _, key_valid = _pad_index(k_seg)
    mask = key_valid[:, None, None, :]  # (N, 1, 1, max_k)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)  # (N, H, max_q, Dh)
    out = out.transpose(1, 2).reshape(q_seg.n * q_seg.max_len, *q.shape[1:])  # (N*max_q, H, Dh)
    dest, _ = _pad_index(q_seg)
    return out.index_select(0, dest)  # (Lq, H, Dh)


def _varlen(q, k, v, q_seg, k_seg, dropout_p):
    """Flash varlen attention on flat ``(L, H, Dh)`` tokens; arguments positional (names changed across torch)."""
    if dropout_p > 0:
        raise BackendError(f"attention backend 'varlen' has no attention dropout (got attn_drop={dropout_p})")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise BackendError(f"attention backend 'varlen' needs bf16/fp16 activations, got {q.dtype}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # views of the fused qkv have a token stride of 3·D
    return _varlen_op()(q, k, v, q_seg.cu, k_seg.cu, q_seg.max_len, k_seg.max_len)


_FLEX_COMPILED = None


def _flex_fn():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else flex_attention
    return _FLEX_COMPILED


def _flex_mask(q_seg: Segments, k_seg: Segments, device: torch.device):
    """The document BlockMask of ``q_seg`` against ``k_seg``, built once per batch and cached on ``q_seg``."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = ("flex", id(k_seg))
    if key not in q_seg.cache:
        q_doc, k_doc = q_seg.segment_ids(), k_seg.segment_ids()

        def same_clip(b, h, qi, ki):
            return q_doc[qi] == k_doc[ki]

        q_seg.cache[key] = create_block_mask(same_clip, None, None, q_seg.total, k_seg.total, device=device)
    return q_seg.cache[key]


def _flex(q, k, v, q_seg, k_seg, dropout_p):
    """FlexAttention with a document mask (see :func:`_flex_mask`)."""
    if dropout_p > 0:
        raise BackendError(f"attention backend 'flex' has no attention dropout (got attn_drop={dropout_p})")
    mask = _flex_mask(q_seg, k_seg, q.device)
    out = _flex_fn()(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask)
    return out[0].transpose(0, 1)  # (Lq, H, Dh)


class Attention(nn.Module):
    """Multi-head self-attention over packed clips, parameter names as timm/DeiT (``qkv``, ``proj``).

    The backend is a plain attribute (not a parameter) that the model sets once per run.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ModelConfigError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.backend = "sdpa_loop"

    def forward(self, x: torch.Tensor, seg: Segments) -> torch.Tensor:
        """``(L, D)`` tokens to ``(L, D)``, attention restricted to each clip of ``seg``."""
        length, dim = x.shape
        qkv = self.qkv(x).view(length, 3, self.num_heads, dim // self.num_heads)  # (L, 3, H, Dh)
        q, k, v = qkv.unbind(1)  # each (L, H, Dh)
        out = attend(q, k, v, seg, seg, self.backend, self.attn_drop if self.training else 0.0)  # (L, H, Dh)
        return self.proj_drop(self.proj(out.reshape(length, dim)))  # (L, D)
