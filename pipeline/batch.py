"""The seam between ``pipeline`` and ``model``: one packed batch type and the one token-count function.

Notation (used by both halves):
    N   clips in the batch
    T_i frames of clip i (at that clip's own frame shift), a multiple of the patch's time size p_t
    ΣT  total frames, sum of T_i
    F   mel bins
    C   classes
    L_i tokens of clip i = (F // p_f) * (T_i // p_t)

``frames`` holds every clip's fbank frames concatenated along time. Because every clip is trimmed
to a multiple of ``p_t``, no patch crosses two clips and the whole batch patchifies with a single
reshape. ``cu_seqlens`` and ``max_tokens`` are derived once, on the CPU, when the batch is built, so
that the model never needs a device sync per layer.

Row mode (ElasticAST's fixed rows of ``row_len`` tokens): ``rows[i]`` is the row of clip i. Clips of
one row are contiguous and rows are in order, so the flat layout is unchanged; a backend that needs
fixed rows pads each row to ``row_len``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flexast.pipeline.errors import BatchError


def token_count(n_frames, n_mels: int, patch: tuple[int, int], stride: tuple[int, int] | None = None):
    """Tokens a clip of ``n_frames`` frames and ``n_mels`` bins makes at patch ``(p_f, p_t)``.

    Non-overlapping patches; the frequency remainder ``n_mels % p_f`` and the time remainder are
    dropped, as a strided convolution does. Works on Python ints, numpy arrays and torch tensors.
    This is the only place tokens are counted: the packer and the model both call it.
    ``stride`` ``(s_f, s_t)`` (default: the patch) counts the overlapping patches of the classic
    padded AST, ``(1 + (n_mels − p_f) // s_f) · (1 + (n_frames − p_t) // s_t)``, for clips of at
    least one patch.
    """
    p_f, p_t = patch
    if stride is not None and tuple(stride) != (p_f, p_t):
        s_f, s_t = stride
        return (1 + (n_mels - p_f) // s_f) * (1 + (n_frames - p_t) // s_t)
    return (n_mels // p_f) * (n_frames // p_t)


def trim_frames(n_frames, p_t: int):
    """Largest multiple of ``p_t`` not above ``n_frames`` (the frames a clip keeps at patch time size ``p_t``)."""
    return (n_frames // p_t) * p_t


@dataclass
class PackedBatch:
    """Variable-length clips packed along time, ready for block-diagonal attention.

    Attributes:
        frames: ``(ΣT, F)`` float features, normalised.
        n_frames: ``(N,)`` int64 frames per clip, each a multiple of ``patch[1]``.
        patch: ``(p_f, p_t)`` patch size of this batch.
        labels: ``(N, C)`` float (multi-hot or mixed) or ``(N,)`` int64 class indices.
        keys: N sample keys.
        frame_shift_ms: ``(N,)`` float32 frame shift of each clip (after any pooling: 10 ms pooled by 2 is 20 ms).
        rows: ``(N,)`` int64 row of each clip in row mode, or None in flat mode.
        row_len: tokens per row in row mode, or None.
        tokens: ``(N,)`` int64 tokens per clip (derived).
        cu_seqlens: ``(N+1,)`` int32 cumulative token offsets (derived).
        max_tokens: longest clip in tokens, a Python int (derived).
    """

    frames: torch.Tensor
    n_frames: torch.Tensor
    patch: tuple[int, int]
    labels: torch.Tensor
    keys: list[str]
    frame_shift_ms: torch.Tensor
    rows: torch.Tensor | None = None
    row_len: int | None = None
    tokens: torch.Tensor = field(init=False)
    cu_seqlens: torch.Tensor = field(init=False)
    max_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.patch = (int(self.patch[0]), int(self.patch[1]))
        n = len(self.keys)
        if self.frames.dim() != 2:
            raise BatchError(f"PackedBatch.frames must be (ΣT, F), got shape {tuple(self.frames.shape)}")
        if self.n_frames.shape != (n,) or self.frame_shift_ms.shape != (n,) or self.labels.shape[0] != n:
            raise BatchError(
                f"PackedBatch fields disagree on clip count: keys={n}, n_frames={tuple(self.n_frames.shape)}, "
                f"frame_shift_ms={tuple(self.frame_shift_ms.shape)}, labels={tuple(self.labels.shape)}"
            )
        n_frames_cpu = self.n_frames.detach().to("cpu", torch.int64)
        total = int(n_frames_cpu.sum())
        if total != self.frames.shape[0]:
            raise BatchError(f"PackedBatch: sum(n_frames)={total} but frames has {self.frames.shape[0]} rows")
        bad = n_frames_cpu % self.patch[1]
        if bool((bad != 0).any()):
            i = int(torch.nonzero(bad)[0])
            raise BatchError(
                f"PackedBatch: clip {self.keys[i]!r} has {int(n_frames_cpu[i])} frames, "
                f"not a multiple of p_t={self.patch[1]}; trim with trim_frames() first"
            )
        tokens = token_count(n_frames_cpu, self.n_mels, self.patch)
        self.tokens = tokens.to(self.n_frames.device)
        cu = torch.zeros(n + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(tokens, 0).to(torch.int32)
        self.cu_seqlens = cu.to(self.n_frames.device)
        self.max_tokens = int(tokens.max()) if n else 0
        if self.rows is not None:
            if self.row_len is None:
                raise BatchError("PackedBatch: rows given without row_len")
            per_row = torch.zeros(self.n_rows, dtype=torch.int64).index_add_(0, self.rows.cpu(), tokens)
            if bool((per_row > self.row_len).any()):
                raise BatchError(f"PackedBatch: a row holds {int(per_row.max())} tokens > row_len={self.row_len}")

    @property
    def n_clips(self) -> int:
        return len(self.keys)

    @property
    def n_mels(self) -> int:
        return int(self.frames.shape[1])

    @property
    def total_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def n_rows(self) -> int:
        return 0 if self.rows is None or self.n_clips == 0 else int(self.rows.max()) + 1

    def padding_fraction(self, budget: int | None = None) -> float:
        """Fraction of the step's capacity left empty: ``rows × row_len`` in row mode, else ``budget``."""
        capacity = self.n_rows * self.row_len if self.rows is not None else budget
        if not capacity:
            return 0.0
        return 1.0 - self.total_tokens / capacity

    _TENSOR_FIELDS = ("frames", "n_frames", "labels", "frame_shift_ms", "rows", "tokens", "cu_seqlens")

    def _map_tensors(self, fn) -> PackedBatch:
        """A shallow copy with ``fn`` applied to every tensor field; derived Python ints are kept (no device sync)."""
        out = copy.copy(self)
        for name in self._TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(out, name, fn(value))
        return out

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        """A copy on ``device``."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """Pinned copy for fast host-to-device transfer (DataLoader ``pin_memory=True`` calls this)."""
        return self._map_tensors(lambda t: t.pin_memory())

    def clip_frames(self) -> list[torch.Tensor]:
        """The clips as a list of ``(T_i, F)`` views."""
        return list(torch.split(self.frames, self.n_frames.tolist(), dim=0))

    @classmethod
    def from_clips(
        cls,
        clips: Sequence[torch.Tensor],
        labels: torch.Tensor,
        keys: Sequence[str],
        patch: tuple[int, int],
        frame_shift_ms: Sequence[float] | torch.Tensor | None = None,
        rows: Sequence[int] | None = None,
        row_len: int | None = None,
    ) -> PackedBatch:
        """Build a batch from ``(T_i, F)`` clips, trimming each to a multiple of ``p_t``.

        Clips shorter than one patch (``T_i < p_t``) would contribute zero tokens; they are rejected
        here with the key, because a clip with no tokens has no output.
        """
        p_t = int(patch[1])
        kept = []
        for clip, key in zip(clips, keys, strict=True):
            t = trim_frames(clip.shape[0], p_t)
            if t == 0:
                raise BatchError(f"clip {key!r} has {clip.shape[0]} frames, fewer than one patch (p_t={p_t})")
            kept.append(clip[:t])
        n_frames = torch.tensor([c.shape[0] for c in kept], dtype=torch.int64)
        if frame_shift_ms is None:
            frame_shift_ms = [10.0] * len(kept)
        return cls(
            frames=torch.cat(kept, 0) if kept else torch.zeros(0, 0),
            n_frames=n_frames,
            patch=patch,
            labels=labels,
            keys=list(keys),
            frame_shift_ms=torch.as_tensor(frame_shift_ms, dtype=torch.float32),
            rows=None if rows is None else torch.as_tensor(rows, dtype=torch.int64),
            row_len=row_len,
        )
