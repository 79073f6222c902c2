"""Adapter from the run config to :mod:`pipeline.loader`'s streaming loader (shards too big for memory).

``data.loader: stream`` trains from shards read on the fly (local, http(s)://, s3://) with the pipeline's
per-rank loader: keyed-random resolution/crop/masks, best-fit packing, equal steps on every rank and
exact mid-epoch resume. This module only translates a :class:`~model.recipes.Stage` and the ``data``
section into a :class:`pipeline.stream_config.StreamConfig`, and gives the loader the small interface
the trainer uses (``set_epoch`` that keeps a restored position, ``len`` from the index estimate).
With ``data.pad_to`` the equal-length clips are handed to the model as a padded ``(B, T, F)`` batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from flexast.model.config import Config
from flexast.model.data import ClipSet, PaddedBatch, clipset_from_index
from flexast.pipeline.batch import PackedBatch


def index_only(source: str) -> ClipSet:
    """A :class:`ClipSet` with the vocabulary, statistics and shifts of ``index.json`` but no clips."""
    path = os.path.join(source, "index.json") if os.path.isdir(source) else source
    from flexast.pipeline.sources import expand_urls

    index, _ = expand_urls(path)
    return clipset_from_index(index or {}, [])


def stream_config(cfg: Config, stage, seed: int) -> dict:
    """The :class:`~pipeline.stream_config.StreamConfig` fields of one stage of a run."""
    d = cfg.data
    res = stage.resolutions
    if len(res) == 1 and res[0].pool == 1:
        policy = {"kind": "fixed", "shift_ms": res[0].shift_ms}
    elif all(r.pool == 1 for r in res):
        policy = {"kind": "random", "shifts_ms": [r.shift_ms for r in res]}
    else:
        policy = {
            "kind": "pool",
            "shift_ms": res[0].shift_ms,
            "pool_factors": [r.pool for r in res],
            "pool_mode": stage.pool_mode,
        }
    out = {
        "budget_tokens": d.token_budget,
        "mode": "rows" if d.row_len else "flat",
        "row_len": d.row_len or None,
        "patches": [list(p) for p in stage.patches],
        "pack_buffer": d.pack_buffer,
        "shuffle_buffer": d.shuffle_buffer,
        "train": True,
        "seed": seed,
        "resolution": policy,
        "max_frames": None if d.pad_to else stage.max_frames,
        "target_frames": d.pad_to or None,
        "freq_mask": d.specaug.freq_mask,
        "time_mask": d.specaug.time_mask,
        "mixup_prob": d.mixup,
        "mixup_alpha": d.mixup_alpha,
        "label_mode": "index" if d.labels == "single" else "multi_hot",
        "balanced": d.balanced,
        "num_workers": d.workers,
    }
    if d.norm:
        out["norm_mean"], out["norm_std"] = float(d.norm[0]), float(d.norm[1])
    return out


class StreamAdapter:
    """The trainer's loader interface over :class:`pipeline.loader.StreamLoader`."""

    def __init__(self, cfg: Config, stage, seed: int, rank: int, world: int):
        from flexast.pipeline.loader import make_loader

        src = cfg.data.train
        if os.path.isdir(src):
            src = os.path.join(src, "index.json")
        self.pad_to = cfg.data.pad_to
        self.loader = make_loader(stream_config(cfg, stage, seed), src, rank=rank, world_size=world)
        self.epoch = 0

    def __len__(self) -> int:
        return int(self.loader.estimated_steps() or 1)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.loader.epoch:  # keep a position restored by load_state_dict
            self.loader.set_epoch(epoch)

    def state_dict(self) -> dict:
        return json.loads(json.dumps(self.loader.state_dict()))

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.loader.load_state_dict(state)

    def __iter__(self) -> Iterator[PackedBatch | PaddedBatch]:
        for batch in self.loader:
            if self.pad_to:
                x = batch.frames.view(batch.n_clips, -1, batch.n_mels)  # (B, T, F): equal-length clips
                out = PaddedBatch(x, batch.labels, batch.keys)
                out._tokens = batch.total_tokens
                yield out
            else:
                yield batch
