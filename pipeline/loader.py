"""The one loader: an iterable of :class:`~pipeline.batch.PackedBatch` per (rank, world_size, epoch), over any source.

Notation: ``R`` ranks, ``W`` workers per rank, ``k`` steps this rank planned, ``K`` the most steps any
rank planned.

Train, evaluation, in-training validation, the demo and the benchmarks all read through
:class:`StreamLoader`; only the source differs (:mod:`pipeline.datasource`: tar, Zarr, memory).

An epoch is **planned before it is read**. At the first iteration of an epoch each rank plans the
steps of its ``W`` slots from records (metadata) alone (:func:`pipeline.stream.plan_slot`), in a
canonical round-robin order over the slots. Then:

* **Equal steps on every rank.** The ranks agree on ``K`` with one ``reduce_max`` (an all-reduce
  under ``torch.distributed``) at that fixed point: the epoch's first ``iter()``, or the trainer's
  call of :meth:`StreamLoader.steps_in_epoch`, which every rank makes at the same place. It is
  never called while a rank is stepping, so it cannot interleave with the trainer's own
  collectives. A rank with ``k < K`` splits its fullest planned steps (each split keeps the budget,
  never drops or repeats a clip) until it has ``K``. No clip is padded in or dropped.
* **Exact epoch length.** :meth:`steps_in_epoch` is the number of steps the epoch will yield, known
  before its first step; the trainer derives its run length and lr schedule from it.
* **Workers.** Step ``i`` of the plan is materialised (features fetched, augmented, normalised) by the
  worker of the slot that planned it, and the loader yields steps in plan order whatever order the
  DataLoader delivers them in: the sequence is a function of (seed, epoch, R, W) only.
* **Resume.** :meth:`state_dict` is ``(epoch, position)``; after :meth:`load_state_dict` the epoch
  is re-planned and continues at ``position``, nothing replayed or skipped.
* **No empty epoch.** An epoch with no step raises :class:`~pipeline.errors.PipelineError` naming the source.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch

from flexast.pipeline.batch import token_count
from flexast.pipeline.datasource import Source, label_map, open_source
from flexast.pipeline.errors import ConfigError, PipelineError
from flexast.pipeline.packing import PackPlan, PackStats
from flexast.pipeline.sources import is_remote
from flexast.pipeline.stream import StepDataset, plan_slot, wanted
from flexast.pipeline.stream_config import StreamConfig, _Const

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


def split_plan(plan: PackPlan, n_mels: int, stride=None) -> tuple[PackPlan, PackPlan]:
    """Two planned steps from one: by whole rows in row mode (when there are two or more), else by clips."""
    n = len(plan.items)
    if n < 2:
        raise PipelineError(f"cannot split a step of {n} clip")
    if plan.rows is not None and len(set(plan.rows)) >= 2:
        half = (max(plan.rows) + 1) // 2
        parts = [[i for i in range(n) if plan.rows[i] < half], [i for i in range(n) if plan.rows[i] >= half]]
    else:
        parts = [list(range(n // 2)), list(range(n // 2, n))]
    out = []
    for k, idx in enumerate(parts):
        rows = None
        if plan.rows is not None:
            old = [plan.rows[i] for i in idx]
            remap = {r: j for j, r in enumerate(dict.fromkeys(old))}
            rows = [remap[r] for r in old]
        frames = [plan.n_frames[i] for i in idx]
        stats = dict(plan.stats) if k == 0 else {}
        stats.update(clips=len(idx), tokens=sum(int(token_count(t, n_mels, plan.patch, stride)) for t in frames))
        out.append(PackPlan([plan.items[i] for i in idx], frames, plan.patch, rows, stats))
    return out[0], out[1]


def equalise(steps: list, extra: int, n_mels: int, stride=None) -> list:
    """``len(steps) + extra`` steps ``(worker, plan)`` holding the same clips: split the step with most clips."""
    out = list(steps)
    for _ in range(extra):
        i = max(range(len(out)), key=lambda j: (len(out[j][1].items), j), default=None)
        if i is None or len(out[i][1].items) < 2:
            raise PipelineError(
                f"cannot make {len(steps) + extra} steps from {len(steps)} planned steps of "
                f"{sum(len(p.items) for _, p in steps)} clips on this rank: another rank has more steps "
                "(too few clips per rank; write more, smaller shards or use fewer ranks)"
            )
        w, plan = out[i]
        a, b = split_plan(plan, n_mels, stride)
        out[i : i + 1] = [(w, a), (w, b)]
    return out


class StreamLoader:
    """Iterable of PackedBatch for one rank; one pass is one epoch (then the epoch advances by one).

    Args:
        cfg: the stream's configuration.
        source: a :class:`~pipeline.datasource.Source`, or a source spec for :func:`~pipeline.datasource.open_source`.
        rank, world_size: this process's DDP rank and the number of ranks.
        epoch: the first epoch.
        reduce_max: ``k ↦ max_r k_r`` across ranks; default ``torch.distributed`` (identity for one rank).
        in_process: run the ``cfg.num_workers`` workers' steps in this process (tests, debugging)
            instead of DataLoader worker processes; the sequence is identical.
        pin_memory, prefetch_factor: passed to the DataLoader.
        log_every: log the running packing statistics every this many steps (0: only at the epoch's end).
        vocab: label names of the model (labels are matched by name); default the source's own.
        norm: ``{shift_name: (mean, std)}`` or one ``(mean, std)`` pair; default ``cfg``'s pair, else the
            source's ``index.json`` statistics. Evaluation passes the training statistics.

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
        vocab: list[str] | None = None,
        norm=None,
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is not in [0, world_size={world_size})")
        self.cfg = cfg
        if not isinstance(source, Source):
            source = open_source(source, cfg.storage_options, retries=cfg.retries, backoff_s=cfg.backoff_s)
        self.source = source
        self.index = self.source.index
        names = self.source.label_names
        self.vocab = list(vocab) if vocab is not None else names
        labels = self.index.get("labels", {})
        self.labels = label_map(names, self.vocab, self.source.spec, labels.get("counts")) if names else None
        self.n_classes = cfg.n_classes or len(self.vocab)
        if not self.n_classes and (cfg.label_mode == "multi_hot" or (cfg.train and cfg.mixup_prob > 0)):
            raise ConfigError(f"number of classes unknown for source {self.source.spec!r}: set n_classes or vocab")
        if norm is None:
            norm = cfg.norm_stats(self.index)  # fails here, in the main process, when no statistics are known
        self.norm = _Const(tuple(float(v) for v in norm)) if isinstance(norm, tuple | list) else norm
        self.n_mels = cfg.n_mels or int(self.index.get("n_mels", 128))
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, cfg.num_workers)
        self.use_processes = cfg.num_workers > 0 and not in_process
        self.reduce_max = reduce_max or dist_reduce_max(world_size)
        self.pin_memory, self.prefetch_factor, self.log_every = pin_memory, prefetch_factor, log_every
        self.last_stats, self.last_read = PackStats(), {}
        self._plan: tuple[int, list, dict] | None = None
        self._lengths: dict[int, int] = {}
        self.epoch, self.position = int(epoch), 0
        self.stats, self.read = PackStats(), {}

    # ---- planning ---------------------------------------------------------------------------------

    def plan(self, epoch: int) -> list[tuple[int, PackPlan]]:
        """The rank's steps of ``epoch`` as ``(worker, plan)``, equalised across ranks (one ``reduce_max``)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        counters: dict = {}
        if any(is_remote(sh.url) for sh in self.source.shards[:1]):
            self.source.prefetch(self.source.shards)
        per_worker = [
            plan_slot(
                self.cfg,
                self.source,
                epoch=epoch,
                rank=self.rank,
                world_size=self.world_size,
                worker=w,
                num_workers=self.num_workers,
                labels=self.labels,
                counters=counters,
            )
            for w in range(self.num_workers)
        ]
        steps = []
        for i in range(max((len(p) for p in per_worker), default=0)):  # canonical round-robin over workers
            steps += [(w, p[i]) for w, p in enumerate(per_worker) if i < len(p)]
        k = len(steps)
        big_k = int(self.reduce_max(k))
        if big_k == 0:
            raise PipelineError(
                f"epoch {epoch} of {self.source.spec!r} yields no step ({counters.get('samples', 0)} clips read; "
                f"{counters.get('shard_errors', 0)} shards failed): check the data and the length and patch settings"
            )
        steps = equalise(steps, big_k - k, self.n_mels, self.cfg.stride)
        if self.source.remote:  # e.g. a Zarr source's chunk indexes: then each step's reads are one round trip
            self.source.prepare([w for _, p in steps for w in wanted(p)], counters)
        self._plan = (epoch, steps, counters)
        self._lengths[epoch] = len(steps)
        return steps

    def steps_in_epoch(self, epoch: int | None = None) -> int:
        """Exactly how many steps ``epoch`` (default the current one) yields on every rank."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._lengths:
            self.plan(epoch)
        return self._lengths[epoch]

    def __len__(self) -> int:
        return self.steps_in_epoch()

    # ---- position ---------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Go to ``epoch`` (from its beginning, unless it is already the current epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0
            self.stats, self.read = PackStats(), {}

    def at_epoch_end(self) -> bool:
        """True when every step of the current epoch has been handed out."""
        return self.position >= self.steps_in_epoch()

    def state_dict(self) -> dict:
        """Position in the epoch, enough to resume without replaying or skipping a clip."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``; the layout (workers, ranks, seed) must be the one it was saved with."""
        if "position" not in state:
            raise ConfigError(f"cannot resume: loader state {sorted(state)} is from an older loader (no 'position')")
        mismatch = {
            k: (state.get(k), v)
            for k, v in (("num_workers", self.num_workers), ("world_size", self.world_size), ("seed", self.cfg.seed))
            if state.get(k) != v
        }
        if mismatch:
            raise ConfigError(f"cannot resume: saved vs current {mismatch}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.stats, self.read = PackStats(), {}

    # ---- iteration --------------------------------------------------------------------------------

    def _dataset(self, steps, start: int) -> StepDataset:
        ds = StepDataset(
            self.cfg,
            self.source,
            self.norm,
            self.n_classes,
            self.cfg.policy(),
            (self.cfg.seed, self.epoch, self.rank),
        )
        ds.steps = [(pos, w, plan) for pos, (w, plan) in enumerate(steps)]
        ds.start = start
        return ds

    def _arrivals(self, ds: StepDataset) -> Iterator[tuple[int, object, dict]]:
        if self.use_processes:
            yield from torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
            )
            return
        gens = [ds.run(w, self.num_workers) for w in range(self.num_workers)]
        live = list(range(self.num_workers))
        while live:  # round-robin like the DataLoader
            for w in list(live):
                try:
                    yield next(gens[w])
                except StopIteration:
                    live.remove(w)

    def _account(self, batch, plan: PackPlan) -> None:
        s = plan.stats
        self.stats.add(
            {
                "steps": 1,
                "clips": batch.n_clips,
                "tokens": batch.total_tokens,
                "capacity": self.cfg.budget_tokens,
                "cropped_clips": s.get("cropped_clips", 0),
                "cropped_tokens": s.get("cropped_tokens", 0),
                "dropped_short": s.get("dropped_short", 0),
                "dropped_keys": s.get("dropped_keys", []),
            }
        )
        if self.log_every and self.stats.steps % self.log_every == 0:
            log.info("epoch %d rank %d: %s", self.epoch, self.rank, self.stats.summary())

    def __iter__(self) -> Iterator:
        steps = self.plan(self.epoch)
        plan_read = dict(self._plan[2])
        pending: dict[int, tuple] = {}
        arrivals = self._arrivals(self._dataset(steps, self.position))
        while self.position < len(steps):
            want = self.position
            while want not in pending:
                pos, batch, counters = next(arrivals)
                pending[pos] = (batch, counters)
                self.read[steps[pos][0]] = counters
            batch, _ = pending.pop(want)
            self.position += 1
            self._account(batch, steps[want][1])
            yield batch
        self.last_stats, self.last_read = self.stats, _sum_counters([plan_read, *self.read.values()])
        log.info("epoch %d rank %d: %s; read %s", self.epoch, self.rank, self.stats.summary(), self.last_read)
        self.set_epoch(self.epoch + 1)

    def read_counters(self) -> dict:
        """Bytes and requests of this rank's workers so far in the epoch."""
        return _sum_counters(self.read.values())


def _sum_counters(dicts) -> dict:
    """Counters summed key by key (lists, such as ``failed_shards``, concatenated)."""
    total: dict = {}
    for counters in dicts:
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
