"""The loader's stages: shards → records → clips with a resolution → planned steps → PackedBatch.

Notation: ``R`` ranks, ``W`` DataLoader workers per rank, a *slot* is one (rank, worker) pair
(``slot = rank·W + worker``); ``T`` frames at a clip's own shift, ``F`` mel bins, ``C`` classes.

Every stage is a plain generator ``stage(src, **params)`` over dicts, testable on lists:

    assign_shards → record_stage → [reweight_stage] → resolve_stage → shuffle_stage → pack_stage   (plan)
    group_steps → read_ahead → materialise                                                         (per step)

* :func:`assign_shards` is the visible split by rank and worker. Shards are shuffled with
  (seed, epoch), identically on every rank, then dealt to slots. With fewer shards than slots the
  split is at sample level (slot ``s`` reads shard ``s mod n`` and keeps every ``m``-th sample), with
  a warning. The union over slots is the dataset, each sample exactly once. Equal *steps* per rank
  are made by :mod:`pipeline.loader`.
* :func:`plan_slot` runs the planning stages on records (metadata from :mod:`pipeline.datasource`):
  nothing is fetched, so a whole epoch is planned before it is read.
* Randomness is keyed, not sequential: a clip's resolution, crop and masks come, in that order,
  from one generator keyed by ``(seed, epoch, key, occurrence)``; the shuffle buffer and the
  per-step patch draw from ``(seed, epoch, rank, worker)``; mixup from ``(seed, epoch, rank, step)``.
  So the plan is a function of (seed, epoch, R, W) and of the records, the same for every source.
* :func:`read_ahead` starts the fetch of each planned step (only the shift each clip uses,
  :meth:`Source.fetch`) ``read_ahead_steps`` steps before it is materialised, so a remote store's
  latency is paid while earlier steps are built; :func:`materialise` then pools, crops, mixes, masks
  and normalises the fetched features. Which steps and tensors come out does not depend on it.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import logging
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

import numpy as np
import torch

from flexast.pipeline.augment import mixup, normalise, spec_augment
from flexast.pipeline.batch import PackedBatch
from flexast.pipeline.errors import ShardError
from flexast.pipeline.packing import PackPlan, pack_stage
from flexast.pipeline.resolution import ResolutionPolicy, apply_pool
from flexast.pipeline.sampling import mean_clip_weight, reweight_stage
from flexast.pipeline.sources import ShardInfo
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.transport import submit

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


def record_stage(
    assignments: list[tuple[ShardInfo, int, int]], source, counters: dict, on_error: str = "raise"
) -> Iterator[dict]:
    """Records (metadata) of the assigned shards; ``on_error='skip'`` skips an unreadable shard and counts it."""
    for shard, every, offset in assignments:
        try:
            recs = source.records(shard)
        except ShardError as exc:
            if on_error == "raise":
                raise
            counters["shard_errors"] = counters.get("shard_errors", 0) + 1
            counters.setdefault("failed_shards", []).append(shard.url)
            log.warning("skipping a shard (on_error=skip): %s", exc)
            continue
        for i, rec in enumerate(recs):
            if i % every == offset:
                counters["samples"] = counters.get("samples", 0) + 1
                yield rec
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


def resolve_stage(
    src: Iterable[dict], cfg: StreamConfig, policy: ResolutionPolicy, epoch: int, labels: list[int] | None = None
) -> Iterator[dict]:
    """Choose each clip's resolution and frame count (length cap or fixed target), and the location of that shift.

    ``labels`` maps the source's label ids to the loader's vocabulary (:func:`pipeline.datasource.label_map`).
    """
    for rec in src:
        key, meta = rec["key"], rec["meta"]
        occ = int(rec.get("occurrence", 0))
        rng = clip_rng(cfg, epoch, key, occ, _CLIP)
        res = policy.choose(meta.get("frames") or {}, rng)
        if res.shift not in rec["loc"]:
            raise ShardError(f"shard {rec['url']}: sample {key!r} has no {res.shift} features")
        n = res.n_frames
        if cfg.target_frames:
            n = cfg.target_frames
        elif cfg.max_frames:
            n = min(n, cfg.max_frames)
        ids = [int(i) for i in meta.get("label_ids", [])]
        yield {
            "key": key,
            "url": rec["url"],
            "label_ids": ids if labels is None else [labels[i] for i in ids],
            "occurrence": occ,
            "res": res,
            "n_frames": n,
            "loc": rec["loc"][res.shift],
            "rng": rng,  # the clip's generator, next used for its crop and masks
        }


def _labels(items: list[dict], cfg: StreamConfig, n_classes: int) -> torch.Tensor:
    if cfg.label_mode == "index":
        ids = []
        for it in items:
            lab = it["label_ids"]
            if len(lab) != 1:
                raise ShardError(f"label_mode='index' needs one label per clip; {it['key']!r} has {lab}")
            ids.append(int(lab[0]))
        out = torch.tensor(ids, dtype=torch.int64)
        if cfg.mixup_prob > 0 and cfg.train:
            out = torch.nn.functional.one_hot(out, n_classes).to(torch.float32)
        return out
    out = torch.zeros(len(items), n_classes, dtype=torch.float32)
    for i, it in enumerate(items):
        out[i, list(it["label_ids"])] = 1.0
    return out


def wanted(plan: PackPlan) -> list[tuple[str, object]]:
    """The ``(url, loc)`` of the one shift each clip of a step uses: what :meth:`Source.fetch` reads."""
    return [(it["url"], it["loc"]) for it in plan.items]


def read_ahead(
    items: Iterable, start: Callable[[object], Future], k: int, size: Callable[[object], int] = lambda _: 1
) -> Iterator[tuple[object, Future]]:
    """``(item, start(item))`` in order, items started ahead while at most ``k + 1`` units are held.

    An item holds ``size(item)`` units (steps) from its start until the consumer asks for the item after
    it; the item being handed out counts, and an item is always started when nothing is held. With
    ``size`` 1: when item ``i`` is handed out, items up to ``i + k`` have been started. Items left when the
    consumer stops are cancelled (a running one finishes and is dropped).
    """
    window: deque = deque()
    held = 0
    source = iter(items)
    done = object()
    upcoming = next(source, done)
    try:
        while True:
            while upcoming is not done and (not window or held + size(upcoming) <= k + 1):
                window.append((upcoming, start(upcoming)))
                held += size(upcoming)
                upcoming = next(source, done)
            if not window:
                return
            item, fut = window.popleft()
            yield item, fut
            held -= size(item)  # held until the consumer asks for the next item
    finally:
        for _, fut in window:
            fut.cancel()


def group_steps(steps: list, touching: Callable[[list, list], bool], most: int) -> list[list]:
    """Consecutive steps in groups of at most ``most``; a step joins the group before it only when
    ``touching(group's wanted, step's wanted)`` (some of its byte ranges touch the group's: one request)."""
    groups: list[list] = []
    want: list = []
    for step in steps:
        mine = wanted(step[1])
        if groups and len(groups[-1]) < most and touching(want, mine):
            groups[-1].append(step)
            want += mine
        else:
            groups.append([step])
            want = list(mine)
    return groups


def _now(fn, *args) -> Future:
    """``fn(*args)`` run here, as a finished ``Future`` (read-ahead off)."""
    fut: Future = Future()
    try:
        fut.set_result(fn(*args))
    except BaseException as exc:  # raised again by result(), where the step is materialised
        fut.set_exception(exc)
    return fut


def _crop(x: np.ndarray, n: int, mode: str, rng: np.random.Generator, fill: float = 0.0) -> np.ndarray:
    """``(T, F)`` → ``(n, F)``: a random, centred or first window when ``T > n``; ``fill`` appended when ``T < n``."""
    t = x.shape[0]
    if t > n:
        start = {"random": lambda: int(rng.integers(0, t - n + 1)), "center": lambda: (t - n) // 2}.get(
            mode, lambda: 0
        )()
        return x[start : start + n]
    if t < n:
        return np.concatenate([x, np.full((n - t, x.shape[1]), fill, x.dtype)], 0)  # (n, F)
    return x


def materialise(
    plan: PackPlan,
    cfg: StreamConfig,
    norm: dict[str, tuple[float, float]],
    n_classes: int,
    mix_rng,
    policy: ResolutionPolicy,
    raw: list[np.ndarray],
) -> PackedBatch:
    """Pool, crop, mix, mask and normalise the clips of one planned step into a :class:`PackedBatch`.

    ``raw`` is the step's fetched ``(T, F)`` float16 features, one per clip (:func:`wanted`). Each clip is widened from
    float16 straight into its slice of the step's ``(ΣT, F)`` buffer, and masks and normalisation then
    work in place on that slice. Padding: ``target_frames`` (classic AST) appends zeros before
    normalising, as AST does; an evaluation clip shorter than one patch is padded with its shift's
    mean, which normalises to 0 (what ``model predict`` pads with).
    """
    arrays, rngs = [], []
    for it, n, x in zip(plan.items, plan.n_frames, raw, strict=True):
        if it["res"].pool > 1:  # pooled in float32: a float16 mean would round the result
            x = apply_pool(x.astype(np.float32), it["res"], policy.pool_mode, policy.pool_tail)  # (T', F)
        fill = 0.0 if cfg.target_frames else norm[it["res"].shift][0]
        rng = copy.deepcopy(it["rng"])  # the plan stays replayable: its generators are never advanced
        arrays.append(_crop(x, n, cfg.crop if cfg.train else cfg.eval_crop, rng, fill))  # (n, F)
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


def plan_slot(
    cfg: StreamConfig,
    source,
    *,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    labels: list[int] | None,
    counters: dict,
) -> list[PackPlan]:
    """Every step of one slot's epoch, planned from records alone (nothing fetched)."""
    slot, n_slots = rank * num_workers + worker, world_size * num_workers
    assignments = assign_shards(
        source.shards, seed=cfg.seed, epoch=epoch, shuffle=cfg.train and cfg.shuffle_shards, slot=slot, n_slots=n_slots
    )
    policy = cfg.policy()
    index = source.index
    src: Iterable[dict] = record_stage(assignments, source, counters, cfg.on_error)
    if cfg.balanced and cfg.train:
        counts = index.get("labels", {}).get("counts")
        if not counts:
            raise ShardError(f"{source.spec}: balanced sampling needs labels.counts in index.json")
        mean_w = mean_clip_weight(counts, int(index.get("total_samples", source.n_clips)))
        src = reweight_stage(src, counts, mean_w, slot_rng(cfg, epoch, rank, worker, _WEIGHT))
    src = resolve_stage(src, cfg, policy, epoch, labels)
    if cfg.train:
        src = shuffle_stage(src, cfg.shuffle_buffer, slot_rng(cfg, epoch, rank, worker, _SHUF))
    patches = [tuple(p) for p in cfg.patches] if cfg.train else [tuple(cfg.patches[0])]
    return list(
        pack_stage(
            src,
            n_mels=cfg.n_mels or int(index.get("n_mels", 128)),
            budget=cfg.budget_tokens,
            mode=cfg.mode,
            row_len=cfg.row_len,
            patches=patches,
            buffer_size=cfg.pack_buffer,
            rng=slot_rng(cfg, epoch, rank, worker, _PATCH),
            pad_short=not cfg.train,
            stride=tuple(cfg.stride) if cfg.stride else None,
        )
    )


class StepDataset(torch.utils.data.IterableDataset):
    """What DataLoader workers run: worker ``w`` materialises the planned steps ``steps`` assigns to it.

    ``steps`` is the rank's epoch in order, ``[(position, worker, plan)]``; each worker yields
    ``(position, batch, counters)`` for its own steps from ``start`` on, and the loader puts them back
    in position order.
    """

    def __init__(self, cfg: StreamConfig, source, norm, n_classes: int, policy, seed_parts: tuple):
        super().__init__()
        self.cfg, self.source, self.norm, self.n_classes, self.policy = cfg, source, norm, n_classes, policy
        self.seed_parts = seed_parts
        self.steps: list = []
        self.start = 0

    def run(self, worker: int, num_workers: int) -> Iterator[tuple[int, PackedBatch, dict]]:
        """This worker's steps; from a remote source their reads start up to ``read_ahead_steps`` steps early.

        One :meth:`Source.fetch` per step, except that a step whose byte ranges touch the previous step's
        (consecutive clips of one Zarr array, :meth:`Source.touching`) is fetched with it, up to
        ``⌊(k+1)/2⌋`` steps per fetch (``k = read_ahead_steps``), so the touching ranges are one request
        (:func:`pipeline.transport.coalesce`). At most ``k + 1`` steps' features are held.
        """
        counters: dict = {}
        mine = [(pos, plan) for pos, w, plan in self.steps if pos >= self.start and w % num_workers == worker]
        k = self.cfg.read_ahead_steps if self.source.remote else 0
        groups = group_steps(mine, self.source.touching, max(1, (k + 1) // 2))
        go = submit if k else _now

        def start(group):  # each group reads into its own counters: the pool's threads never share a dict
            mine_counters: dict = {}
            want = [w for _, plan in group for w in wanted(plan)]
            return go(lambda: (self.source.fetch(want, mine_counters), mine_counters))

        for group, fut in read_ahead(groups, start, k, len):
            raw, group_counters = fut.result()
            for key, v in group_counters.items():
                counters[key] = counters.get(key, 0) + v
            first = 0
            for pos, plan in group:
                mix_rng = keyed_rng(*self.seed_parts, _MIX, pos)
                clips = raw[first : first + len(plan.items)]
                first += len(plan.items)
                batch = materialise(plan, self.cfg, self.norm, self.n_classes, mix_rng, self.policy, clips)
                yield pos, batch, dict(counters)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None:
            return self.run(0, 1)
        return self.run(info.id, info.num_workers)
