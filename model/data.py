"""Clip sets in memory and the deterministic, resumable loader the recipes train and evaluate on.

Notation: ``T`` frames at a clip's own frame shift, ``F`` mel bins, ``C`` classes, ``R`` a pooling or
compression factor (frame shift 10·R ms), ``p = (p_f, p_t)`` the patch of a step.

Shards are read once into memory with :mod:`pipeline.shards` (small and medium sets: demo data,
ESC-50, Speech Commands, tests). Every step of an epoch is *planned* from ``(seed, epoch)`` alone, so
a resumed run replays the plan and skips the steps already done: no sample is repeated or lost.
Every DDP rank gets the same number of steps (the plan is dealt round-robin and cut to a multiple of
the world size). Packing uses :func:`pipeline.packing.plan_packs` (best-fit-decreasing over a buffer).

The data logic itself is the pipeline's, in the stream's order: pooling (:func:`pipeline.pooling.pool_time`,
tail floor) → crop → mixup (:func:`pipeline.augment.mixup`) → SpecAugment
(:func:`pipeline.augment.spec_augment`) → :func:`pipeline.augment.normalise`; balanced sampling draws with
:func:`pipeline.sampling.clip_weights`; tokens are :func:`pipeline.batch.token_count`. All random draws of a
step come from one generator seeded by ``(seed, epoch, step)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flexast.pipeline.augment import mixup, normalise, spec_augment
from flexast.pipeline.batch import PackedBatch, token_count, trim_frames
from flexast.pipeline.errors import ConfigError, ShardError
from flexast.pipeline.packing import plan_packs
from flexast.pipeline.pooling import pool_time, pooled_length
from flexast.pipeline.resolution import TimeScale
from flexast.pipeline.sampling import clip_weights
from flexast.pipeline.shards import iter_tar, load_npy
from flexast.pipeline.sources import expand_urls, is_remote
from flexast.pipeline.units import parse_shift_name, shift_name


@dataclass
class Clip:
    """One sample: ``feats[shift_ms]`` is a ``(T, F)`` float16 log-mel (not normalised)."""

    key: str
    label_ids: list[int]
    feats: dict[float, np.ndarray]


@dataclass
class ClipSet:
    """Clips plus what the index says about them (vocabulary and per-shift mean/std)."""

    clips: list[Clip]
    label_names: list[str]
    display_names: list[str]
    stats: dict[float, tuple[float, float]] = field(default_factory=dict)
    n_mels: int = 128
    features: dict = field(default_factory=dict)  # the fbank options the shards were built with
    sample_rate: int = 16000

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    stored_shifts: list[float] = field(default_factory=list)  # when there are no clips in memory (streaming)

    @property
    def shifts_ms(self) -> list[float]:
        return sorted(self.clips[0].feats) if self.clips else list(self.stored_shifts)


def _shard_paths(source: str) -> tuple[list[str], dict]:
    """Tar shards and the parsed ``index.json`` of a source spec (:func:`pipeline.sources.expand_urls`).

    A glob or brace pattern has no index of its own; the ``index.json`` beside its first shard is used if present.
    """
    index_path = os.path.join(source, "index.json") if os.path.isdir(source) else source
    if index_path.endswith(".json") and not is_remote(index_path) and not os.path.exists(index_path):
        raise ShardError(f"{index_path}: index.json not found (build shards first: pipeline build-shards)")
    index, shards = expand_urls(index_path if index_path.endswith(".json") else source)
    paths = [s.url for s in shards if s.url.endswith(".tar")]
    if index is None:
        beside = os.path.join(os.path.dirname(paths[0]), "index.json") if paths else ""
        index = {}
        if beside and not is_remote(beside) and os.path.exists(beside):
            with open(beside) as f:
                index = json.load(f)
    return paths, index


def read_clips(source: str, max_clips: int = 0) -> ClipSet:
    """All samples of a shard set in memory.

    Args:
        source: shard folder, its ``index.json``, or a glob of ``.tar`` shards.
        max_clips: stop after this many (0 = all).
    """
    paths, index = _shard_paths(source)
    clips: list[Clip] = []
    for path in paths:
        for key, members in iter_tar(path):
            meta = json.loads(members["json"])
            feats = {
                parse_shift_name(ext[: -len(".npy")]): load_npy(data, f"{path}:{key}.{ext}")
                for ext, data in members.items()
                if ext.endswith(".npy")
            }
            clips.append(Clip(key=key, label_ids=[int(i) for i in meta.get("label_ids", [])], feats=feats))
            if max_clips and len(clips) >= max_clips:
                break
        if max_clips and len(clips) >= max_clips:
            break
    return clipset_from_index(index, clips)


def clipset_from_index(index: dict, clips: list[Clip]) -> ClipSet:
    """``clips`` with the vocabulary, per-shift stats, fbank options and shifts that ``index`` records.

    Without label names in the index they are ``"0" … "C-1"`` for the label ids the clips use (none without clips).
    """
    labels = index.get("labels", {})
    names = list(labels.get("names", []))
    if not names and clips:
        n = 1 + max((i for c in clips for i in c.label_ids), default=0)
        names = [str(i) for i in range(n)]
    stats = {parse_shift_name(k): (float(v["mean"]), float(v["std"])) for k, v in index.get("stats", {}).items()}
    n_mels = int(index.get("n_mels", clips[0].feats[min(clips[0].feats)].shape[1] if clips else 128))
    build = index.get("config", {})
    data = ClipSet(
        clips,
        names,
        list(labels.get("display_names", names)),
        stats,
        n_mels,
        dict(build.get("features", {})),
        int(index.get("sample_rate", build.get("sample_rate", 16000))),
    )
    data.stored_shifts = [float(s) for s in index.get("shifts_ms", [])]
    return data


@dataclass
class PaddedBatch:
    """Classic AST input: ``x (B, T, F)`` padded or cut to a fixed length, with labels and keys."""

    x: torch.Tensor
    labels: torch.Tensor
    keys: list[str]

    @property
    def n_clips(self) -> int:
        return len(self.keys)

    @property
    def total_tokens(self) -> int:  # filled in by the loader for logging
        return getattr(self, "_tokens", 0)

    def to(self, device, non_blocking: bool = False) -> PaddedBatch:
        out = PaddedBatch(self.x.to(device, non_blocking=non_blocking), self.labels.to(device), self.keys)
        out._tokens = self.total_tokens
        return out


class ClipLoader:
    """Deterministic per-epoch plans of packed steps over a :class:`ClipSet`.

    Args:
        data: the clips.
        labels: ``"multi"`` (multi-hot float labels) or ``"single"`` (class index).
        patches: patch sizes; in training one is drawn per step, in eval the first is used.
        budget: tokens per step (flat), or ``rows × row_len`` in row mode.
        resolutions: per-clip resolutions to draw from (one = fixed).
        max_frames: length cap at the clip's own resolution: random crop in training, centre cut in
            eval; never padded.
        pad_to: > 0 switches to classic padded batches of this many frames (AST recipe).
        pad_patch: ``(p_f, p_t, f_stride, t_stride)`` used to count tokens of a padded clip.
        norm: ``(mean, std)`` for every shift; default: the index's per-shift stats.
        freq_mask, time_mask: SpecAugment maxima (bins; 10 ms frames, scaled by each clip's compression).
        mixup: chance that a clip is mixed with a partner of its step (per clip, as in AST), λ ~ Beta(α, α).
        balanced: draw clips with AST's balanced weights (with replacement) instead of a permutation.
        train: shuffle, random crops, mixup, SpecAugment.
        rank, world: DDP rank and world size.
    """

    def __init__(
        self,
        data: ClipSet,
        *,
        labels: str = "multi",
        patches: Sequence[tuple[int, int]] = ((16, 16),),
        budget: int = 4096,
        row_len: int = 0,
        resolutions: Sequence[TimeScale] = (TimeScale(),),
        pool_mode: str = "avg",
        max_frames: int = 1024,
        pad_to: int = 0,
        pad_patch: tuple[int, int, int, int] = (16, 16, 16, 16),
        norm: tuple[float, float] | None = None,
        freq_mask: int = 0,
        time_mask: int = 0,
        pack_buffer: int = 64,
        mixup: float = 0.0,
        mixup_alpha: float = 10.0,
        balanced: bool = False,
        train: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.data = data
        self.labels = labels
        self.patches = [tuple(int(v) for v in p) for p in patches]
        self.budget, self.row_len = int(budget), int(row_len)
        self.resolutions = list(resolutions)
        self.pool_mode, self.max_frames, self.pad_to, self.pad_patch = pool_mode, max_frames, pad_to, pad_patch
        self.norm = norm
        self.freq_mask, self.time_mask = freq_mask, time_mask
        self.pack_buffer, self.train, self.seed = pack_buffer, train, seed
        self.mixup, self.mixup_alpha, self.balanced = mixup, mixup_alpha, balanced
        self.rank, self.world = rank, world
        self.epoch, self.position = 0, 0
        self.dropped_short = 0
        for r in self.resolutions:
            if data.clips and r.shift_ms not in data.clips[0].feats:
                raise ConfigError(
                    f"frame shift {r.shift_ms} ms is not in the shards (stored: {data.shifts_ms}); "
                    f"rebuild shards with it or choose data.shift_ms / data.shifts_ms from the stored ones"
                )
        self._plans: dict[int, list] = {}

    # ---- planning -------------------------------------------------------------------------------

    def _frames(self, clip: Clip, res: TimeScale) -> int:
        return pooled_length(clip.feats[res.shift_ms].shape[0], res.pool, "floor")

    def _pad_tokens_per_clip(self) -> int:
        """Tokens of one ``pad_to``-frame clip at the padded recipe's (possibly overlapping) patch stride."""
        p_f, p_t, fs, ts = self.pad_patch
        return int(token_count(self.pad_to, self.data.n_mels, (p_f, p_t), stride=(fs, ts)))

    def _plan_epoch(
        self, epoch: int
    ) -> list[tuple[tuple[int, int], list[tuple[int, int, int, int]], list[int] | None]]:
        """Steps of this rank: ``(patch, [(clip, resolution, start, n_frames)], rows)``."""
        if epoch in self._plans:
            return self._plans[epoch]
        rng = np.random.default_rng([self.seed, epoch, 17])
        n = len(self.data.clips)
        if self.train and self.balanced:
            order = rng.choice(n, size=n, replace=True, p=self._balanced_weights())
        else:
            order = rng.permutation(n) if self.train else np.arange(n)
        items = []
        for i in order:
            r = int(rng.integers(len(self.resolutions))) if len(self.resolutions) > 1 else 0
            t = self._frames(self.data.clips[i], self.resolutions[r])
            cap = self.pad_to or self.max_frames
            keep = min(t, cap)
            start = int(rng.integers(0, t - keep + 1)) if self.train else (t - keep) // 2
            items.append((int(i), r, start, keep))
        steps = self._pad_steps(items) if self.pad_to else self._pack_steps(items, rng)
        usable = (len(steps) // self.world) * self.world if self.world > 1 else len(steps)
        mine = steps[self.rank : usable : self.world]
        self._plans = {epoch: mine}
        return mine

    def _pad_steps(self, items):
        per_step = max(1, self.budget // self._pad_tokens_per_clip())
        return [(self.patches[0], items[s : s + per_step], None) for s in range(0, len(items), per_step)]

    def _pack_steps(self, items, rng):
        steps, buffer, queue = [], [], list(items)
        mode = "rows" if self.row_len else "flat"
        cap = self.row_len or self.budget
        while queue or buffer:
            while queue and len(buffer) < self.pack_buffer:
                buffer.append(queue.pop(0))
            patch = self.patches[int(rng.integers(len(self.patches)))] if self.train else self.patches[0]
            p_t = patch[1]
            per_col = int(token_count(p_t, self.data.n_mels, patch))  # tokens of one patch column
            max_keep = (cap // per_col) * p_t
            alive, counts = [], []
            for i, r, start, keep in buffer:
                keep = min(trim_frames(keep, p_t), max_keep)
                if keep == 0 and not self.train:  # eval: a clip shorter than one patch is padded to one patch
                    keep = p_t
                if keep == 0:  # training: shorter than one patch at this size, no tokens
                    self.dropped_short += 1
                    continue
                alive.append((i, r, start, keep))
                counts.append(int(token_count(keep, self.data.n_mels, patch)))
            if not alive:
                buffer = []
                continue
            plan = plan_packs(counts, self.budget, mode, self.row_len or None)
            take = plan if not self.train else plan[:1]  # eval: everything at once; train: the fullest step
            for step in take:
                steps.append((patch, [alive[k] for k in step.clips], step.rows))
            taken = {k for step in take for k in step.clips}
            buffer = [c for k, c in enumerate(alive) if k not in taken]
        return steps

    # ---- iteration ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._plan_epoch(self.epoch))

    def at_epoch_end(self) -> bool:
        """True when every step of the current epoch has been handed out."""
        return self.position >= len(self._plan_epoch(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._plans = {}

    def __iter__(self) -> Iterator[PackedBatch | PaddedBatch]:
        plan = self._plan_epoch(self.epoch)
        while self.position < len(plan):
            k = self.position
            batch = self._make(plan[k], np.random.default_rng([self.seed, self.epoch, k, 29]))
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def _features(self, clip: Clip, res: TimeScale, start: int, keep: int) -> torch.Tensor:
        """Raw (un-normalised) ``(keep, F)`` float32 crop, pooled first; eval pads a too-short clip with NaN."""
        x = clip.feats[res.shift_ms].astype(np.float32)  # (T, F), a fresh buffer the augmentations may overwrite
        if res.pool > 1:
            x = pool_time(x, res.pool, self.pool_mode, tail="floor")  # (T // R, F)
        x = x[start : start + keep]
        if x.shape[0] < keep:  # eval only: a clip shorter than one patch, padded to one patch
            x = np.concatenate([x, np.full((keep - x.shape[0], x.shape[1]), np.nan, np.float32)], 0)
        return torch.from_numpy(np.ascontiguousarray(x))

    def _normalised(self, x: torch.Tensor, res: TimeScale) -> torch.Tensor:
        """:func:`pipeline.augment.normalise` in place with the shift's stats; NaN padding becomes 0, the mean."""
        mean, std = self.norm or self.data.stats.get(res.shift_ms, (0.0, 0.5))
        return torch.nan_to_num_(normalise(x, mean, std, out=x), nan=0.0)

    def _balanced_weights(self) -> np.ndarray:
        """``(N,)`` draw probabilities of AST's balanced sampling (:func:`pipeline.sampling.clip_weights`)."""
        ids = [c.label_ids for c in self.data.clips]
        counts = np.bincount(np.asarray([i for c in ids for i in c], np.int64), minlength=self.data.n_classes)
        w = clip_weights(ids, counts)
        return w / w.sum()

    def _labels(self, clips: list[Clip]) -> torch.Tensor:
        if self.labels == "single":
            return torch.tensor([c.label_ids[0] for c in clips], dtype=torch.int64)
        y = torch.zeros(len(clips), self.data.n_classes)
        for row, c in enumerate(clips):
            y[row, c.label_ids] = 1.0
        return y

    def _make(self, step, rng) -> PackedBatch | PaddedBatch:
        patch, members, rows = step
        clips = [self.data.clips[i] for i, *_ in members]
        res = [self.resolutions[r] for _, r, _, _ in members]
        feats = [self._features(self.data.clips[i], self.resolutions[r], s, k) for i, r, s, k in members]
        labels = self._labels(clips)
        if self.train and self.mixup > 0:  # per clip with probability `mixup`, partner cut or tiled to T_i
            if labels.dim() == 1:
                labels = torch.nn.functional.one_hot(labels, self.data.n_classes).float()  # (N, C)
            feats, labels = mixup(feats, labels, self.mixup_alpha, self.mixup, rng)
        if self.train and (self.freq_mask or self.time_mask):
            feats = [
                spec_augment(f, self.freq_mask, self.time_mask, rng, compression=r.compression, inplace=True)
                for f, r in zip(feats, res, strict=True)
            ]
        feats = [self._normalised(f, r) for f, r in zip(feats, res, strict=True)]
        keys = [c.key for c in clips]
        if self.pad_to:
            x = torch.zeros(len(feats), self.pad_to, self.data.n_mels)  # (B, T, F)
            for b, f in enumerate(feats):
                x[b, : f.shape[0]] = f
            out = PaddedBatch(x, labels, keys)
            out._tokens = len(feats) * self._pad_tokens_per_clip()
            return out
        shifts = [r.frame_shift_ms for r in res]
        return PackedBatch.from_clips(
            feats,
            labels,
            keys,
            patch,
            frame_shift_ms=shifts,
            rows=rows,
            row_len=self.row_len or None,
        )


def resolutions_from(
    policy: str, shift_ms: float, shifts_ms: Sequence[float], pool_factors: Sequence[int], stored: Sequence[float]
) -> list[TimeScale]:
    """The per-clip resolution choices of a data policy: fixed | random (stored shifts) | pool (factors)."""
    if policy == "fixed":
        return [TimeScale(float(shift_ms), 1)]
    if policy == "random":
        return [TimeScale(float(s), 1) for s in (shifts_ms or stored)]
    if policy == "pool":
        return [TimeScale(float(shift_ms), int(r)) for r in pool_factors]
    raise ConfigError(f"data.resolution: unknown policy {policy!r} (fixed, random or pool)")


def describe_shift(shift_ms: float) -> str:
    """``'s10'``-style name of a shift, for logs and tables."""
    return shift_name(shift_ms) if math.isfinite(shift_ms) else str(shift_ms)
