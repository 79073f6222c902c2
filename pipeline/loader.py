"""The trainer's entry point: an iterable of :class:`~pipeline.batch.PackedBatch` per (rank, world_size, epoch).

Notation: ``R`` ranks, ``W`` workers per rank, ``k`` steps this rank's slots planned, ``K`` the most
steps any rank planned.

Guarantees, per epoch:

* **Order.** Worker outputs are put in a canonical round-robin order (worker 0, 1, …, skipping
  workers that are done), whatever order the DataLoader delivers them in, so the sequence is a
  function of (seed, epoch, R, W) only.
* **Equal steps on every rank.** Each rank holds back its last ``holdback_steps`` steps. When its
  slots are exhausted it learns ``K`` through ``reduce_max`` (``torch.distributed`` all-reduce by
  default) and splits its held-back steps (each split keeps the budget, never drops or repeats a clip)
  until it has ``K`` steps too. No clip is padded in or dropped; the split steps are less full.
  If ``K − k`` exceeds what the held-back clips can give, a :class:`~pipeline.errors.PipelineError`
  says to raise ``holdback_steps``.
* **Resume.** :meth:`StreamLoader.state_dict` records the epoch, the steps consumed from each worker
  and the position in the equalised tail; after :meth:`~StreamLoader.load_state_dict` each worker
  re-plans its first steps without decoding them and the sequence continues where it stopped.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator

import torch

from flexast.pipeline.batch import PackedBatch
from flexast.pipeline.errors import ConfigError, PipelineError
from flexast.pipeline.packing import PackStats
from flexast.pipeline.sources import expand_urls
from flexast.pipeline.stream import ShardStream
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.units import shift_name

log = logging.getLogger(__name__)


def _identity(x):
    return x


def dist_reduce_max(world_size: int) -> Callable[[int], int]:
    """``k ↦ max over ranks`` through ``torch.distributed`` (fails loudly when multi-rank without a process group)."""
    if world_size == 1:
        return _identity
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"world_size={world_size} but torch.distributed is not initialised: call init_process_group first, "
            "or pass reduce_max= (a function returning the maximum of its argument over ranks)"
        )

    def reduce_max(k: int) -> int:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([k], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    return reduce_max


def subset_batch(b: PackedBatch, idx: list[int]) -> PackedBatch:
    """The clips ``idx`` of ``b`` as a new batch (rows renumbered from 0 in order of appearance)."""
    clips = b.clip_frames()
    rows = None
    if b.rows is not None:
        old = [int(b.rows[i]) for i in idx]
        remap = {r: k for k, r in enumerate(dict.fromkeys(old))}
        rows = [remap[r] for r in old]
    return PackedBatch.from_clips(
        [clips[i] for i in idx],
        b.labels[idx],
        [b.keys[i] for i in idx],
        b.patch,
        frame_shift_ms=b.frame_shift_ms[idx],
        rows=rows,
        row_len=b.row_len,
    )


def split_batch(b: PackedBatch) -> tuple[PackedBatch, PackedBatch]:
    """Two batches from one: by whole rows in row mode (when there are two or more), else by clips."""
    n = b.n_clips
    if n < 2:
        raise PipelineError(f"cannot split a step of {n} clip")
    if b.rows is not None and b.n_rows >= 2:
        half = b.n_rows // 2
        first = [i for i in range(n) if int(b.rows[i]) < half]
    else:
        first = list(range(n // 2))
    second = [i for i in range(n) if i not in set(first)]
    return subset_batch(b, first), subset_batch(b, second)


def equalise(batches: list[PackedBatch], extra: int) -> list[PackedBatch]:
    """``len(batches) + extra`` batches holding the same clips: repeatedly split the batch with the most clips."""
    out = list(batches)
    for _ in range(extra):
        i = max(range(len(out)), key=lambda j: (out[j].n_clips, -j), default=None)
        if i is None or out[i].n_clips < 2:
            raise PipelineError(
                f"cannot add {extra} steps to equalise ranks from {len(batches)} held-back steps "
                f"({sum(b.n_clips for b in batches)} clips): raise holdback_steps"
            )
        out[i : i + 1] = split_batch(out[i])
    return out


class StreamLoader:
    """Iterable of PackedBatch for one rank; one pass is one epoch (then the epoch advances by one).

    Args:
        cfg: the stream's configuration.
        source: a source spec (see :func:`pipeline.sources.expand_urls`), e.g. a shard folder's ``index.json``.
        rank, world_size: this process's DDP rank and the number of ranks.
        epoch: the first epoch.
        reduce_max: ``k ↦ max_r k_r`` across ranks; default ``torch.distributed`` (identity for one rank).
        in_process: run the ``cfg.num_workers`` slots as generators in this process (tests, debugging)
            instead of DataLoader worker processes; the sequence is identical.
        pin_memory, prefetch_factor: passed to the DataLoader.
        log_every: log the running packing statistics every this many steps (0: only at the epoch's end).

    Attributes:
        stats: running :class:`~pipeline.packing.PackStats` of the epoch so far (fill ratio, padding,
            cropped tokens, clips per step); ``last_stats`` and ``last_read`` keep the finished epoch's.
    """

    def __init__(
        self,
        cfg: StreamConfig,
        source,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        reduce_max: Callable[[int], int] | None = None,
        in_process: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        log_every: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is not in [0, world_size={world_size})")
        self.cfg = cfg
        index, shards = source if isinstance(source, tuple) else expand_urls(source, cfg.storage_options)
        self.index, self.shards = index, shards
        n_classes = cfg.n_classes or len((index or {}).get("labels", {}).get("names", []))
        if not n_classes and (cfg.label_mode == "multi_hot" or (cfg.train and cfg.mixup_prob > 0)):
            raise ConfigError(f"number of classes unknown for source {source!r}: set n_classes or use an index.json")
        cfg.norm_stats(index)  # fails here, in the main process, when no statistics are known
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, cfg.num_workers)
        self.use_processes = cfg.num_workers > 0 and not in_process
        self.reduce_max = reduce_max or dist_reduce_max(world_size)
        self.pin_memory, self.prefetch_factor, self.log_every = pin_memory, prefetch_factor, log_every
        self.last_stats, self.last_read = PackStats(), {}
        self.dataset = ShardStream(cfg, shards, index, rank, world_size, self.num_workers)
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning on the next iteration."""
        self.epoch = int(epoch)
        self.consumed = [0] * self.num_workers
        self.next_worker = 0
        self.tail_yielded = 0
        self.stats = PackStats()
        self.read: dict[int, dict] = {}

    def state_dict(self) -> dict:
        """Position in the epoch, enough to resume without replaying or skipping a clip."""
        return {
            "epoch": self.epoch,
            "consumed": list(self.consumed),
            "next_worker": self.next_worker,
            "tail_yielded": self.tail_yielded,
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; the layout (workers, ranks, seed) must be the one it was saved with."""
        mismatch = {
            k: (state.get(k), v)
            for k, v in (("num_workers", self.num_workers), ("world_size", self.world_size), ("seed", self.cfg.seed))
            if state.get(k) != v
        }
        if mismatch:
            raise ConfigError(f"cannot resume: saved vs current {mismatch}")
        self.set_epoch(state["epoch"])
        self.consumed = list(state["consumed"])
        self.next_worker = int(state["next_worker"])
        self.tail_yielded = int(state["tail_yielded"])

    def _arrivals(self) -> Iterator[tuple[PackedBatch | None, dict]]:
        self.dataset.epoch = self.epoch
        self.dataset.skip = list(self.consumed)
        if self.use_processes:
            yield from torch.utils.data.DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
            )
            return
        gens = [self.dataset.slot(w) for w in range(self.num_workers)]
        live = list(range(self.num_workers))
        while live:  # round-robin like the DataLoader
            for w in list(live):
                try:
                    yield next(gens[w])
                except StopIteration:
                    live.remove(w)

    def _ordered(self) -> Iterator[tuple[PackedBatch, dict]]:
        """Canonical round-robin order over workers, starting at ``next_worker``."""
        queues = [deque() for _ in range(self.num_workers)]
        done = [False] * self.num_workers
        arrivals = self._arrivals()
        p = self.next_worker
        while not all(done):
            if done[p]:
                p = (p + 1) % self.num_workers
                continue
            while not queues[p]:
                batch, info = next(arrivals)
                queues[info["worker"]].append((batch, info))
            batch, info = queues[p].popleft()
            if info.get("done"):
                done[p] = True
                self.read[p] = info.get("read", {})
            else:
                self.read[p] = info.get("read", {})
                yield batch, info
            p = (p + 1) % self.num_workers

    def _account(self, batch: PackedBatch, info: dict | None) -> None:
        step = {"steps": 1, "clips": batch.n_clips, "tokens": batch.total_tokens, "capacity": self.cfg.budget_tokens}
        if info is not None:
            s = info["stats"]
            step.update({k: s.get(k, 0) for k in ("cropped_clips", "cropped_tokens", "dropped_short")})
            step["dropped_keys"] = s.get("dropped_keys", [])
        self.stats.add(step)
        if self.log_every and self.stats.steps % self.log_every == 0:
            log.info("epoch %d rank %d: %s", self.epoch, self.rank, self.stats.summary())

    def __iter__(self) -> Iterator[PackedBatch]:
        held: deque = deque()
        for batch, info in self._ordered():
            held.append((batch, info))
            if len(held) > self.cfg.holdback_steps:
                b, inf = held.popleft()
                self.consumed[inf["worker"]] += 1
                self.next_worker = (inf["worker"] + 1) % self.num_workers
                self._account(b, inf)
                yield b
        k = sum(self.consumed) + len(held)
        big_k = int(self.reduce_max(k))
        tail = equalise([b for b, _ in held], big_k - k)
        for inf in [inf for _, inf in held][: 0 if self.tail_yielded else None]:  # their crop/drop counters, once
            self.stats.add({k2: inf["stats"].get(k2, 0) for k2 in ("cropped_clips", "cropped_tokens", "dropped_short")})
        for i, b in enumerate(tail):
            if i < self.tail_yielded:
                continue
            self.tail_yielded += 1
            self._account(b, None)
            yield b
        log.info("epoch %d rank %d: %s; read %s", self.epoch, self.rank, self.stats.summary(), self.read_counters())
        self.last_stats, self.last_read = self.stats, self.read_counters()
        self.set_epoch(self.epoch + 1)

    def estimated_steps(self) -> int | None:
        """Steps per epoch on this rank, estimated from ``index.json``'s frame totals (for lr schedules).

        None without an index. It ignores trimming to ``p_t`` and padding, so it is a few percent high
        or low; the exact count is known only when the epoch ends (every rank then has the same).
        """
        if not self.index or not self.index.get("shards"):
            return None
        policy = self.cfg.policy(self.epoch)
        totals: dict[str, float] = {}
        for shard in self.index["shards"]:
            for name, t in shard.get("frames", {}).items():
                totals[name] = totals.get(name, 0) + t
        if policy.kind == "random":
            names = [shift_name(x) for x in policy.shifts_ms] or sorted(totals)
            frames = sum(totals.get(n, 0) for n in names) / max(len(names), 1)
        else:
            frames = totals.get(shift_name(policy.shift_ms), 0)
            if policy.kind == "pool":
                frames /= sum(policy.pool_factors) / len(policy.pool_factors)
        n_clips = sum(int(sh["samples"]) for sh in self.index["shards"])
        cap = self.cfg.target_frames or self.cfg.max_frames
        if cap:
            frames = n_clips * cap if self.cfg.target_frames else min(frames, n_clips * cap)
        n_mels = self.cfg.n_mels or int(self.index.get("n_mels", 128))
        per_frame = sum((n_mels // p_f) / p_t for p_f, p_t in self.cfg.patches) / len(self.cfg.patches)
        return max(1, math.ceil(frames * per_frame / self.cfg.budget_tokens / self.world_size))

    def read_counters(self) -> dict:
        """Samples, shards and skipped shard errors of this rank's workers so far in the epoch."""
        total: dict = {}
        for counters in self.read.values():
            for k, v in counters.items():
                total[k] = total.get(k, 0) + v if not isinstance(v, list) else total.get(k, []) + v
        return total


def make_loader(
    cfg: StreamConfig | dict,
    source,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    reduce_max: Callable[[int], int] | None = None,
    **kwargs,
) -> StreamLoader:
    """The trainer's one call: a :class:`StreamLoader` (``cfg.num_workers`` DataLoader workers) for this rank."""
    cfg = cfg if isinstance(cfg, StreamConfig) else StreamConfig.from_dict(cfg)
    return StreamLoader(cfg, source, rank, world_size, epoch, reduce_max, **kwargs)


def make_stream(cfg: StreamConfig | dict, source, rank: int = 0, world_size: int = 1, epoch: int = 0, **kwargs):
    """Like :func:`make_loader` but always in this process (no worker processes); same sequence."""
    return make_loader(cfg, source, rank, world_size, epoch, in_process=True, **kwargs)
