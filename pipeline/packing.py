"""Token-budget packing: which clips share a training step (and which row, in row mode).

Notation: ``L_i`` tokens of clip i (from :func:`pipeline.batch.token_count`, the one token count),
``B`` the token budget of one step, ``R`` the row length in row mode (ElasticAST's L′ = 2048), so a
row-mode step holds ``B // R`` rows. Frames ``T`` are at the clip's own frame shift.

Two layers:

* :func:`plan_packs` is pure: token counts in, steps out. It is best-fit-decreasing (BFD): clips
  in decreasing size, each placed into the open bin with the least room that still fits it. In flat
  mode a bin is a step of ``B`` tokens; in row mode a bin is a row of ``R`` tokens, and rows are
  grouped ``B // R`` per step, fullest first. A clip is never split across rows or steps.
  :func:`next_fit` is ElasticAST's reference packer (loader order, first come first served), for
  the benchmark.
* :func:`pack_stage` is the streaming packer: it keeps a buffer of ``K`` clips, draws the step's
  patch size, crops clips longer than the budget (and counts the cropped tokens), runs
  :func:`plan_packs` on the buffer and emits the fullest step; the rest wait for the next step, so
  the stream stays shuffled. At the end of the stream every remaining clip is emitted.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from flexast.pipeline.batch import token_count, trim_frames
from flexast.pipeline.errors import PackingError

log = logging.getLogger(__name__)


@dataclass
class PackStep:
    """One step of a plan: indices into the input ``token_counts`` and, in row mode, each clip's row."""

    clips: list[int]
    tokens: int
    rows: list[int] | None = None


def _check(token_counts: Sequence[int], cap: int, what: str) -> list[int]:
    counts = [int(t) for t in token_counts]
    for i, t in enumerate(counts):
        if t <= 0 or t > cap:
            raise PackingError(f"clip {i} has {t} tokens; each clip needs 1..{cap} tokens ({what}); crop first")
    return counts


def _best_fit_decreasing(counts: list[int], cap: int) -> list[list[int]]:
    """BFD bins of capacity ``cap``; bins are returned fullest first (ties: creation order)."""
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    # (remaining room, bin id), kept sorted so the tightest fitting bin is one bisect away.
    open_bins: list[tuple[int, int]] = []
    for i in order:
        t = counts[i]
        j = bisect.bisect_left(open_bins, (t, -1))
        if j < len(open_bins):
            r, b = open_bins.pop(j)
        else:
            r, b = cap, len(bins)
            bins.append([])
            room.append(cap)
        bins[b].append(i)
        room[b] = r - t
        if room[b] > 0:
            bisect.insort(open_bins, (room[b], b))
    rank = sorted(range(len(bins)), key=lambda b: (room[b], b))
    return [sorted(bins[b]) for b in rank]


def plan_packs(
    token_counts: Sequence[int], budget: int, mode: str = "flat", row_len: int | None = None
) -> list[PackStep]:
    """Pack clips into steps of at most ``budget`` tokens with best-fit-decreasing.

    Args:
        token_counts: tokens of each clip (each ``1..budget``, or ``1..row_len`` in row mode).
        budget: tokens per step; in row mode a multiple of ``row_len``.
        mode: ``"flat"`` (one budget per step, for varlen attention) or ``"rows"`` (fixed rows).
        row_len: tokens per row in row mode.

    Returns:
        Steps, fullest first. Every input index appears in exactly one step. In row mode
        ``step.rows[k]`` is the row (0-based within the step) of ``step.clips[k]``, and clips are
        listed row by row.
    """
    if budget <= 0:
        raise PackingError(f"budget must be positive, got {budget}")
    if mode == "flat":
        counts = _check(token_counts, budget, f"budget {budget}")
        return [PackStep(clips=b, tokens=sum(counts[i] for i in b)) for b in _best_fit_decreasing(counts, budget)]
    if mode != "rows":
        raise PackingError(f"mode must be 'flat' or 'rows', got {mode!r}")
    if not row_len or budget % row_len:
        raise PackingError(f"row mode needs budget ({budget}) to be a positive multiple of row_len ({row_len})")
    counts = _check(token_counts, row_len, f"row_len {row_len}")
    rows = _best_fit_decreasing(counts, row_len)
    per_step = budget // row_len
    steps = []
    for s in range(0, len(rows), per_step):
        group = rows[s : s + per_step]
        # Clips of a row are contiguous and rows are in order (the PackedBatch row layout).
        pairs = [(r, i) for r, row in enumerate(group) for i in row]
        steps.append(
            PackStep(clips=[i for _, i in pairs], tokens=sum(counts[i] for _, i in pairs), rows=[r for r, _ in pairs])
        )
    return steps


def next_fit(token_counts: Sequence[int], batch_size: int, row_len: int) -> tuple[list[list[list[int]]], int, int]:
    """ElasticAST's packer: batches of ``batch_size`` clips in loader order, rows filled first come first served.

    A clip that would overflow the current row opens the next row; each batch's rows are padded to
    its longest row (N′ ≤ L′). Clips longer than ``row_len`` are cropped to it.

    Returns:
        ``(batches, tokens, padded_capacity)``: for each batch a list of rows of clip indices, the
        tokens kept, and the tokens allocated (rows × longest row, summed over batches).
    """
    batches = []
    kept = capacity = 0
    counts = [min(int(t), row_len) for t in token_counts]
    for s in range(0, len(counts), batch_size):
        rows: list[list[int]] = [[]]
        fill = [0]
        for i in range(s, min(s + batch_size, len(counts))):
            if fill[-1] + counts[i] > row_len:
                rows.append([])
                fill.append(0)
            rows[-1].append(i)
            fill[-1] += counts[i]
        batches.append(rows)
        kept += sum(fill)
        capacity += len(rows) * max(fill)
    return batches, kept, capacity


@dataclass
class PackStats:
    """Running packing statistics; ``padding`` is the unused fraction of the steps' budgets."""

    steps: int = 0
    clips: int = 0
    tokens: int = 0
    capacity: int = 0
    cropped_clips: int = 0
    cropped_tokens: int = 0
    dropped_short: int = 0
    dropped_keys: list[str] = field(default_factory=list)

    @property
    def fill_ratio(self) -> float:
        return self.tokens / self.capacity if self.capacity else 0.0

    @property
    def padding(self) -> float:
        return 1.0 - self.fill_ratio if self.capacity else 0.0

    @property
    def clips_per_step(self) -> float:
        return self.clips / self.steps if self.steps else 0.0

    def add(self, other: dict) -> None:
        """Add one step's (or another worker's) counters, given as a dict of the integer fields."""
        for k in ("steps", "clips", "tokens", "capacity", "cropped_clips", "cropped_tokens", "dropped_short"):
            setattr(self, k, getattr(self, k) + int(other.get(k, 0)))
        self.dropped_keys.extend(other.get("dropped_keys", []))

    def summary(self) -> str:
        return (
            f"steps={self.steps} clips/step={self.clips_per_step:.2f} fill={self.fill_ratio:.4f} "
            f"padding={self.padding:.4f} cropped_tokens={self.cropped_tokens} dropped_short={self.dropped_short}"
        )


@dataclass
class PackPlan:
    """What the streaming packer emits: the clips of one step, each with the frames it keeps."""

    items: list[dict]
    n_frames: list[int]
    patch: tuple[int, int]
    rows: list[int] | None
    stats: dict


def pack_stage(
    src: Iterable[dict],
    *,
    n_mels: int,
    budget: int,
    mode: str = "flat",
    row_len: int | None = None,
    patches: Sequence[tuple[int, int]] = ((16, 16),),
    buffer_size: int = 128,
    rng: np.random.Generator | None = None,
    pad_short: bool = False,
    stride: tuple[int, int] | None = None,
) -> Iterator[PackPlan]:
    """Streaming packer over clip records ``{"key", "n_frames", ...}`` (frames available after the length cap).

    Each step draws its patch from ``patches`` with ``rng`` (one draw per step, so a resumed stream
    that replays the plan draws the same sizes), counts each buffered clip's tokens at that patch,
    crops clips above the cap (``budget`` flat, ``row_len`` rows) to the cap, and emits the fullest
    BFD step. A clip shorter than one patch has no tokens: it is dropped and counted (``dropped_short``),
    or, with ``pad_short`` (evaluation: every clip is scored), padded to one patch. ``stride`` counts
    the overlapping patches of the classic padded AST input (:func:`pipeline.batch.token_count`).
    """
    rng = rng or np.random.default_rng(0)
    cap = budget if mode == "flat" else int(row_len or 0)
    buffer: list[dict] = []
    it = iter(src)
    exhausted = False
    while True:
        while not exhausted and len(buffer) < buffer_size:
            try:
                buffer.append(next(it))
            except StopIteration:
                exhausted = True
        if not buffer:
            return
        patch = tuple(patches[int(rng.integers(len(patches)))]) if len(patches) > 1 else tuple(patches[0])
        p_t = patch[1]
        per_column = int(token_count(p_t, n_mels, patch))  # tokens of one patch column (p_t frames)
        if per_column <= 0:
            raise PackingError(f"patch {patch} is taller than the {n_mels} mel bins")
        max_frames = (cap // per_column) * p_t
        counts, kept, step_stats = [], [], {"dropped_short": 0, "dropped_keys": []}
        alive = []
        for item in buffer:
            t = trim_frames(int(item["n_frames"]), p_t)
            if t == 0 and pad_short:
                t = p_t
            if t == 0:
                step_stats["dropped_short"] += 1
                step_stats["dropped_keys"].append(item["key"])
                log.debug(  # counted in the step's stats (dropped_short, dropped_keys); every epoch is planned ahead
                    "clip %r has %d frames, fewer than one patch %s: dropped", item["key"], item["n_frames"], patch
                )
                continue
            alive.append(item)
            kept.append(min(t, max_frames))
            counts.append(int(token_count(kept[-1], n_mels, patch, stride)))
        buffer = alive
        if not buffer:
            continue
        steps = plan_packs(counts, budget, mode, row_len)
        step = steps[0]
        cropped = [i for i in step.clips if kept[i] < trim_frames(int(buffer[i]["n_frames"]), p_t)]
        step_stats.update(
            steps=1,
            clips=len(step.clips),
            tokens=step.tokens,
            capacity=budget,
            cropped_clips=len(cropped),
            cropped_tokens=sum(
                int(token_count(trim_frames(int(buffer[i]["n_frames"]), p_t), n_mels, patch, stride)) - counts[i]
                for i in cropped
            ),
        )
        chosen = set(step.clips)
        yield PackPlan(
            items=[buffer[i] for i in step.clips],
            n_frames=[kept[i] for i in step.clips],
            patch=patch,
            rows=step.rows,
            stats=step_stats,
        )
        buffer = [b for i, b in enumerate(buffer) if i not in chosen]
