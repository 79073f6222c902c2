"""The streaming pipeline: shards → samples → clips with a resolution → packed steps → PackedBatch.

Notation: ``R`` ranks, ``W`` DataLoader workers per rank, a *slot* is one (rank, worker) pair
(``slot = rank·W + worker``); ``T`` frames at a clip's own shift, ``F`` mel bins, ``C`` classes.

Every stage is a plain generator ``stage(src, **params)`` over dicts, testable on lists:

    assign_shards → read_stage → [reweight_stage] → resolve_stage → shuffle_stage → pack_stage → materialise

* :func:`assign_shards` is the visible split by rank and worker. Shards are shuffled with
  (seed, epoch), identically on every rank, then dealt to slots. With fewer shards than slots the
  split is at sample level (slot ``s`` reads shard ``s mod n`` and keeps every ``m``-th sample), with
  a warning, since several slots then read the same bytes. The union over slots is the dataset,
  each sample exactly once. Equal *steps* per rank are made by :mod:`pipeline.loader`.
* Randomness is keyed, not sequential: a clip's resolution, crop and masks come from a generator
  seeded with ``(seed, epoch, crc32(key), occurrence)``; the shuffle buffer and the per-step patch
  draw from ``(seed, epoch, rank, worker)``. So the order is deterministic given (seed, epoch), and
  a resumed slot that replays its plan without decoding features reproduces it exactly.
* Features are decoded only in :func:`materialise`, and only for the shift a clip uses; the other
  shifts' bytes are dropped as soon as the resolution is chosen.
"""

from __future__ import annotations

import io
import logging
import warnings
import zlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from pipeline.augment import mixup, normalise, spec_augment
from pipeline.batch import PackedBatch
from pipeline.errors import ShardError
from pipeline.packing import PackPlan, pack_stage
from pipeline.resolution import ResolutionPolicy, apply_pool
from pipeline.sampling import mean_clip_weight, reweight_stage
from pipeline.sources import ShardInfo, read_shard
from pipeline.stream_config import StreamConfig

log = logging.getLogger(__name__)

# Stream ids that keep the seeded generators of different purposes apart.
_RES, _AUG, _PATCH, _MIX, _SHUF, _SHARDS, _WEIGHT = range(7)


def slot_rng(cfg: StreamConfig, epoch: int, rank: int, worker: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, epoch, rank, worker, purpose])


def clip_rng(cfg: StreamConfig, epoch: int, key: str, occurrence: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, epoch, zlib.crc32(key.encode()), occurrence, purpose])


def assign_shards(
    shards: list[ShardInfo], *, seed: int, epoch: int, shuffle: bool, slot: int, n_slots: int
) -> list[tuple[ShardInfo, int, int]]:
    """The shards one slot reads, as ``(shard, every, offset)``: it keeps sample ``i`` when ``i % every == offset``."""
    order = list(shards)
    if shuffle:
        perm = np.random.default_rng([seed, epoch, _SHARDS]).permutation(len(order))
        order = [order[i] for i in perm]
    n = len(order)
    if n >= n_slots:
        return [(order[j], 1, 0) for j in range(slot, n, n_slots)]
    if slot == 0:
        warnings.warn(
            f"{n} shards for {n_slots} rank×worker slots: splitting at sample level, so {n_slots - n} slots "
            f"re-read shards they partly skip; write at least {n_slots} shards for efficient reading",
            stacklevel=2,
        )
    j = slot % n
    every = len(range(j, n_slots, n))  # slots sharing shard j
    return [(order[j], every, slot // n)]


def read_stage(assignments: list[tuple[ShardInfo, int, int]], cfg: StreamConfig, counters: dict) -> Iterator[dict]:
    """Samples of the assigned shards (with retries); ``on_error='skip'`` skips a failing shard and counts it."""
    for shard, every, offset in assignments:
        try:
            for i, sample in enumerate(read_shard(shard, cfg.storage_options, cfg.retries, cfg.backoff_s)):
                if i % every == offset:
                    counters["samples"] = counters.get("samples", 0) + 1
                    yield sample
        except ShardError as exc:
            if cfg.on_error == "raise":
                raise
            counters["shard_errors"] = counters.get("shard_errors", 0) + 1
            counters.setdefault("failed_shards", []).append(shard.url)
            log.warning("skipping the rest of a shard (on_error=skip): %s", exc)
        counters["shards"] = counters.get("shards", 0) + 1


def shuffle_stage(src: Iterable, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle buffer of ``size`` items (``size <= 1`` passes through)."""
    if size <= 1:
        yield from src
        return
    buf: list = []
    for item in src:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


def resolve_stage(src: Iterable[dict], cfg: StreamConfig, policy: ResolutionPolicy, epoch: int) -> Iterator[dict]:
    """Choose each clip's resolution and frame count (length cap or fixed target); keep only that shift's bytes."""
    for sample in src:
        key, meta = sample["key"], sample["meta"]
        if meta is None:
            raise ShardError(f"shard {sample['url']}: sample {key!r} has no .json member")
        occ = int(sample.get("occurrence", 0))
        frames = meta.get("frames") or {}
        res = policy.choose(frames, clip_rng(cfg, epoch, key, occ, _RES))
        if res.shift not in sample["npy"]:
            raise ShardError(f"shard {sample['url']}: sample {key!r} has no {res.shift}.npy member")
        n = res.n_frames
        if cfg.target_frames:
            n = cfg.target_frames
        elif cfg.max_frames:
            n = min(n, cfg.max_frames)
        yield {
            "key": key,
            "url": sample["url"],
            "meta": meta,
            "occurrence": occ,
            "res": res,
            "n_frames": n,
            "npy": sample["npy"][res.shift],
        }


def _labels(items: list[dict], cfg: StreamConfig, n_classes: int) -> torch.Tensor:
    if cfg.label_mode == "index":
        ids = []
        for it in items:
            lab = it["meta"].get("label_ids", [])
            if len(lab) != 1:
                raise ShardError(f"label_mode='index' needs one label per clip; {it['key']!r} has {lab}")
            ids.append(int(lab[0]))
        out = torch.tensor(ids, dtype=torch.int64)
        if cfg.mixup_prob > 0 and cfg.train:
            out = torch.nn.functional.one_hot(out, n_classes).to(torch.float32)
        return out
    out = torch.zeros(len(items), n_classes, dtype=torch.float32)
    for i, it in enumerate(items):
        out[i, list(it["meta"].get("label_ids", []))] = 1.0
    return out


def _crop(x: np.ndarray, n: int, mode: str, rng: np.random.Generator) -> np.ndarray:
    """``(T, F)`` → ``(n, F)``: a random, centred or first window when ``T > n``; zeros appended when ``T < n``."""
    t = x.shape[0]
    if t > n:
        start = {"random": lambda: int(rng.integers(0, t - n + 1)), "center": lambda: (t - n) // 2}.get(
            mode, lambda: 0
        )()
        return x[start : start + n]
    if t < n:
        return np.concatenate([x, np.zeros((n - t, x.shape[1]), x.dtype)], 0)  # (n, F)
    return x


def materialise(
    plan: PackPlan, cfg: StreamConfig, norm: dict[str, tuple[float, float]], n_classes: int, epoch: int, mix_rng
) -> PackedBatch:
    """Decode, pool, crop, mix, mask and normalise the clips of one planned step into a :class:`PackedBatch`."""
    clips = []
    rngs = []
    for it, n in zip(plan.items, plan.n_frames, strict=True):
        try:
            x = np.load(io.BytesIO(it["npy"]), allow_pickle=False).astype(np.float32)  # (T, F) at the stored shift
        except ValueError as exc:
            raise ShardError(f"shard {it['url']}: sample {it['key']!r} has an unreadable .npy: {exc}") from exc
        x = apply_pool(x, it["res"], cfg.resolution.get("pool_mode", "avg"), cfg.resolution.get("pool_tail", "floor"))
        rng = clip_rng(cfg, epoch, it["key"], it["occurrence"], _AUG)
        x = _crop(x, n, cfg.crop if cfg.train else cfg.eval_crop, rng)
        clips.append(torch.from_numpy(np.ascontiguousarray(x)))
        rngs.append(rng)
    labels = _labels(plan.items, cfg, n_classes)
    if cfg.train and cfg.mixup_prob > 0:
        clips, labels = mixup(clips, labels, cfg.mixup_alpha, cfg.mixup_prob, mix_rng)
    out = []
    for x, it, rng in zip(clips, plan.items, rngs, strict=True):
        res = it["res"]
        if cfg.train and (cfg.freq_mask or cfg.time_mask):
            x = spec_augment(x, cfg.freq_mask, cfg.time_mask, rng, res.compression, cfg.n_freq_masks, cfg.n_time_masks)
        mean, std = norm[res.shift]
        out.append(normalise(x, mean, std))
    return PackedBatch.from_clips(
        out,
        labels,
        [it["key"] for it in plan.items],
        plan.patch,
        frame_shift_ms=[it["res"].frame_shift_ms for it in plan.items],
        rows=plan.rows,
        row_len=cfg.row_len if cfg.mode == "rows" else None,
    )


def slot_stream(
    cfg: StreamConfig,
    shards: list[ShardInfo],
    index: dict | None,
    *,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    skip_steps: int = 0,
) -> Iterator[tuple[PackedBatch, dict]]:
    """One slot's epoch: ``(batch, info)`` per step, ``info = {"worker", "step", "stats", "read"}``.

    The first ``skip_steps`` steps are planned but not decoded (resume without replay or skip).
    """
    slot, n_slots = rank * num_workers + worker, world_size * num_workers
    assignments = assign_shards(
        shards, seed=cfg.seed, epoch=epoch, shuffle=cfg.train and cfg.shuffle_shards, slot=slot, n_slots=n_slots
    )
    counters: dict = {}
    src: Iterable[dict] = read_stage(assignments, cfg, counters)
    labels = (index or {}).get("labels", {})
    n_classes = cfg.n_classes or len(labels.get("names", [])) or 0
    if cfg.balanced and cfg.train:
        counts = labels.get("counts")
        if not counts:
            raise ShardError("balanced sampling needs labels.counts in index.json")
        mean_w = mean_clip_weight(counts, int(index.get("total_samples", sum(s.samples or 0 for s in shards))))
        src = reweight_stage(src, counts, mean_w, slot_rng(cfg, epoch, rank, worker, _WEIGHT))
    src = resolve_stage(src, cfg, cfg.policy(epoch), epoch)
    if cfg.train:
        src = shuffle_stage(src, cfg.shuffle_buffer, slot_rng(cfg, epoch, rank, worker, _SHUF))
    patches = [tuple(p) for p in cfg.patches] if cfg.train else [tuple(cfg.patches[0])]
    plans = pack_stage(
        src,
        n_mels=cfg.n_mels or int((index or {}).get("n_mels", 128)),
        budget=cfg.budget_tokens,
        mode=cfg.mode,
        row_len=cfg.row_len,
        patches=patches,
        buffer_size=cfg.pack_buffer,
        rng=slot_rng(cfg, epoch, rank, worker, _PATCH),
    )
    norm = cfg.norm_stats(index)
    for step, plan in enumerate(plans):
        info = {"worker": worker, "step": step, "stats": plan.stats, "read": dict(counters)}
        if step < skip_steps:
            continue
        mix_rng = np.random.default_rng([cfg.seed, epoch, rank, worker, _MIX, step])
        yield materialise(plan, cfg, norm, n_classes, epoch, mix_rng), info


class ShardStream(torch.utils.data.IterableDataset):
    """The per-rank dataset handed to a DataLoader: each worker runs its own slot of the epoch.

    Yields ``(batch, info)`` and finally ``(None, {"worker": w, "done": True, ...})`` so that the
    loader can restore a canonical worker order; :class:`pipeline.loader.StreamLoader` unwraps it.
    """

    def __init__(self, cfg: StreamConfig, shards, index, rank: int, world_size: int, num_workers: int):
        super().__init__()
        self.cfg, self.shards, self.index = cfg, shards, index
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.epoch = 0
        self.skip: list[int] = [0] * self.num_workers

    def slot(self, worker: int) -> Iterator[tuple[PackedBatch | None, dict]]:
        last: dict = {"worker": worker, "read": {}}
        for batch, info in slot_stream(
            self.cfg,
            self.shards,
            self.index,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=self.num_workers,
            skip_steps=self.skip[worker],
        ):
            last = info
            yield batch, info
        yield None, {"worker": worker, "done": True, "read": last.get("read", {})}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None:
            raise RuntimeError("ShardStream is iterated by DataLoader workers; use StreamLoader in-process")
        if info.num_workers != self.num_workers:
            raise RuntimeError(f"ShardStream built for {self.num_workers} workers, DataLoader has {info.num_workers}")
        return self.slot(info.id)
