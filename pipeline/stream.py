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
* Randomness is keyed, not sequential: a clip's resolution, crop and masks come, in that order,
  from one generator keyed by ``(seed, epoch, key, occurrence)``; the shuffle buffer and the
  per-step patch draw from ``(seed, epoch, rank, worker)``. So the order is deterministic given (seed, epoch), and
  a resumed slot that replays its plan without decoding features reproduces it exactly.
* Features are decoded only in :func:`materialise`, and only for the shift a clip uses; the other
  shifts' bytes are dropped as soon as the resolution is chosen.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import logging
import re
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from flexast.pipeline.augment import mixup, normalise, spec_augment
from flexast.pipeline.batch import PackedBatch
from flexast.pipeline.errors import ShardError
from flexast.pipeline.packing import PackPlan, pack_stage
from flexast.pipeline.resolution import ResolutionPolicy, apply_pool
from flexast.pipeline.sampling import mean_clip_weight, reweight_stage
from flexast.pipeline.sources import ShardInfo, read_shard
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.units import shift_name

log = logging.getLogger(__name__)

# Stream ids that keep the seeded generators of different purposes apart.
_CLIP, _PATCH, _MIX, _SHUF, _SHARDS, _WEIGHT = range(6)


def keyed_rng(*parts) -> np.random.Generator:
    """A counter-based (Philox) generator keyed by a hash of ``parts``: cheap to make, independent per key."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


def slot_rng(cfg: StreamConfig, epoch: int, rank: int, worker: int, purpose: int) -> np.random.Generator:
    return keyed_rng(cfg.seed, epoch, rank, worker, purpose)


def clip_rng(cfg: StreamConfig, epoch: int, key: str, occurrence: int, purpose: int) -> np.random.Generator:
    return keyed_rng(cfg.seed, epoch, key, occurrence, purpose)


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
        if any(sh.samples is None for sh in order):
            return [(order[j], 1, 0) for j in range(slot, n, n_slots)]
        # Deal each shard (in shuffled order) to the slot holding the fewest samples so far: slots end
        # within one shard of each other even when shard sizes differ (fewer steps to equalise later).
        heap = [(0, k) for k in range(n_slots)]
        mine = []
        for sh in order:
            load, k = heapq.heappop(heap)
            if k == slot:
                mine.append((sh, 1, 0))
            heapq.heappush(heap, (load + sh.samples, k))
        return mine
    if slot == 0:
        warnings.warn(
            f"{n} shards for {n_slots} rank×worker slots: splitting at sample level, so {n_slots - n} slots "
            f"re-read shards they partly skip; write at least {n_slots} shards for efficient reading",
            stacklevel=2,
        )
    j = slot % n
    every = len(range(j, n_slots, n))  # slots sharing shard j
    return [(order[j], every, slot // n)]


def read_stage(
    assignments: list[tuple[ShardInfo, int, int]], cfg: StreamConfig, counters: dict, want=None
) -> Iterator[dict]:
    """Samples of the assigned shards (with retries); ``on_error='skip'`` skips a failing shard and counts it.

    ``want(key, meta)`` limits the features kept to the shifts it names (see :func:`pipeline.sources.read_shard`).
    """
    for shard, every, offset in assignments:
        try:
            for i, sample in enumerate(read_shard(shard, cfg.storage_options, cfg.retries, cfg.backoff_s, want)):
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
        if occ == 0 and sample.get("note") is not None:
            res, rng = sample["note"]  # drawn by the reader's filter, identically
        else:
            rng = clip_rng(cfg, epoch, key, occ, _CLIP)
            res = policy.choose(frames, rng)
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
            "rng": rng,  # the clip's generator, next used for its crop and masks
        }


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|]?[a-z]\d+)', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \}")


def load_npy(data: bytes, where: str) -> np.ndarray:
    """A 2-D ``.npy`` as a read-only view of ``data``; the common header is parsed with one regex (no eval)."""
    if data[:6] == b"\x93NUMPY" and data[6] == 1:
        hlen = int.from_bytes(data[8:10], "little")
        m = _NPY_HEADER.match(data, 10, 10 + hlen)
        if m:
            rows, cols = int(m.group(2)), int(m.group(3))
            return np.frombuffer(data, np.dtype(m.group(1).decode()), rows * cols, 10 + hlen).reshape(rows, cols)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise ShardError(f"{where} has an unreadable .npy: {exc}") from exc


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
    plan: PackPlan,
    cfg: StreamConfig,
    norm: dict[str, tuple[float, float]],
    n_classes: int,
    epoch: int,
    mix_rng,
    policy: ResolutionPolicy,
) -> PackedBatch:
    """Decode, pool, crop, mix, mask and normalise the clips of one planned step into a :class:`PackedBatch`.

    Each clip is widened from float16 straight into its slice of the step's ``(ΣT, F)`` buffer, and
    masks and normalisation then work in place on that slice: one copy per clip.
    """
    arrays, rngs = [], []
    for it, n in zip(plan.items, plan.n_frames, strict=True):
        x = load_npy(it["npy"], f"shard {it['url']}: sample {it['key']!r}")  # (T, F) float16 at the stored shift
        x = apply_pool(x, it["res"], policy.pool_mode, policy.pool_tail)  # (T', F)
        rng = it["rng"]
        arrays.append(_crop(x, n, cfg.crop if cfg.train else cfg.eval_crop, rng))  # (n, F)
        rngs.append(rng)
    n_mels = arrays[0].shape[1]
    frames = torch.empty(sum(plan.n_frames), n_mels)  # (ΣT, F)
    views = list(torch.split(frames, plan.n_frames))  # N × (T_i, F)
    for view, x in zip(views, arrays, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only source array: copy_ only reads it
            view.copy_(torch.from_numpy(np.ascontiguousarray(x)))
    labels = _labels(plan.items, cfg, n_classes)
    if cfg.train and cfg.mixup_prob > 0:
        mixed, labels = mixup(views, labels, cfg.mixup_alpha, cfg.mixup_prob, mix_rng)
        for view, m in zip(views, mixed, strict=True):
            if m is not view:
                view.copy_(m)
    for view, it, rng in zip(views, plan.items, rngs, strict=True):
        res = it["res"]
        if cfg.train and (cfg.freq_mask or cfg.time_mask):
            spec_augment(
                view, cfg.freq_mask, cfg.time_mask, rng, res.compression, cfg.n_freq_masks, cfg.n_time_masks, True
            )
        normalise(view, *norm[res.shift], out=view)
    return PackedBatch(
        frames=frames,
        n_frames=torch.tensor(plan.n_frames, dtype=torch.int64),
        patch=plan.patch,
        labels=labels,
        keys=[it["key"] for it in plan.items],
        frame_shift_ms=torch.tensor([it["res"].frame_shift_ms for it in plan.items], dtype=torch.float32),
        rows=None if plan.rows is None else torch.tensor(plan.rows, dtype=torch.int64),
        row_len=cfg.row_len if cfg.mode == "rows" else None,
    )


def _wanted_shifts(cfg: StreamConfig, policy: ResolutionPolicy, epoch: int):
    """The reader's filter: only the shift :func:`resolve_stage` will pick is read.

    For ``random`` the draw is made here, with the clip's own generator (occurrence 0), and handed on
    as the sample's note ``(resolution, generator)``, so :func:`resolve_stage` need not draw again.
    """
    if policy.kind != "random":
        names = {shift_name(policy.shift_ms)}
        return lambda key, meta: (names, None)
    if cfg.balanced and cfg.train:
        return None  # a repeated clip draws again per occurrence: keep every shift

    def want(key, meta):
        rng = clip_rng(cfg, epoch, key, 0, _CLIP)
        res = policy.choose(meta.get("frames") or {}, rng)
        return {res.shift}, (res, rng)

    return want


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
    policy = cfg.policy(epoch)
    src: Iterable[dict] = read_stage(assignments, cfg, counters, _wanted_shifts(cfg, policy, epoch))
    labels = (index or {}).get("labels", {})
    n_classes = cfg.n_classes or len(labels.get("names", [])) or 0
    if cfg.balanced and cfg.train:
        counts = labels.get("counts")
        if not counts:
            raise ShardError("balanced sampling needs labels.counts in index.json")
        mean_w = mean_clip_weight(counts, int(index.get("total_samples", sum(s.samples or 0 for s in shards))))
        src = reweight_stage(src, counts, mean_w, slot_rng(cfg, epoch, rank, worker, _WEIGHT))
    src = resolve_stage(src, cfg, policy, epoch)
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
        mix_rng = keyed_rng(cfg.seed, epoch, rank, worker, _MIX, step)
        yield materialise(plan, cfg, norm, n_classes, epoch, mix_rng, policy), info


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
