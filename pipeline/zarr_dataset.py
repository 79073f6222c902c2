"""Map-style access to the Zarr store, for evaluation and random access.

Notation: ``N`` clips of the store, ``T`` frames of a clip at the chosen frame shift, ``F`` mel bins,
``C`` classes. The store layout is ``docs/shard-format.md``'s: one group per shard with
``<shift>/values (ΣT, F)`` float16, ``<shift>/offsets (N+1,)``, ``keys``, ``label_values`` +
``label_offsets`` and ``duration_s``. Only the offsets and labels are read up front; a clip's frames
are read on access (one slice of the values array).

An item is ``{"key", "features": (T, F) float32 normalised, "labels", "frame_shift_ms"}``;
:func:`collate_packed` packs a list of items into a :class:`~pipeline.batch.PackedBatch`.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from flexast.pipeline.augment import normalise
from flexast.pipeline.batch import PackedBatch
from flexast.pipeline.errors import ConfigError, ShardError
from flexast.pipeline.sources import read_index
from flexast.pipeline.units import parse_shift_name, shift_name


class ZarrClipDataset(torch.utils.data.Dataset):
    """Clips of a built shard folder's ``store.zarr``, addressable by index.

    Args:
        folder: the shard folder (holding ``index.json`` and ``store.zarr``), local or fsspec URL.
        shift_ms: which stored frame shift to read.
        max_frames: cut clips longer than this (``crop``: ``center`` or ``start``); None keeps native length.
        label_mode: ``multi_hot`` ((C,) float) or ``index`` (int64 scalar).
        norm: ``(mean, std)``; default the index's statistics for the shift.
        storage_options: fsspec options for remote stores.
    """

    def __init__(
        self,
        folder: str,
        shift_ms: float = 10.0,
        max_frames: int | None = None,
        crop: str = "center",
        label_mode: str = "multi_hot",
        norm: tuple[float, float] | None = None,
        storage_options: dict | None = None,
    ):
        if crop not in ("center", "start") or label_mode not in ("multi_hot", "index"):
            raise ConfigError(f"bad options: crop={crop!r} (center|start), label_mode={label_mode!r} (multi_hot|index)")
        self.folder = folder.rstrip("/")
        self.index, _ = read_index(self.folder, storage_options)
        self.shift = shift_name(shift_ms)
        self.max_frames, self.crop, self.label_mode = max_frames, crop, label_mode
        self.storage_options = storage_options
        if norm is None:
            stats = self.index.get("stats", {}).get(self.shift)
            if stats is None:
                raise ConfigError(f"index.json of {folder} has no statistics for {self.shift}; pass norm=")
            norm = (float(stats["mean"]), float(stats["std"]))
        self.norm = norm
        self.n_classes = len(self.index.get("labels", {}).get("names", []))
        # zarr_group is the group's path under the folder ("store.zarr/train-000000"); a bare name is under store.zarr.
        self.groups = [_group_path(s) for s in self.index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum([int(s["samples"]) for s in self.index["shards"]])])
        self._open: dict[int, dict] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}  # each worker opens its own handles
        return state

    def _group(self, g: int) -> dict:
        if g not in self._open:
            import zarr

            url = f"{self.folder}/{self.groups[g]}"
            try:
                grp = zarr.open_group(url, mode="r", storage_options=self.storage_options or None)
                self._open[g] = {
                    "values": grp[f"{self.shift}/values"],
                    "offsets": grp[f"{self.shift}/offsets"][...],
                    "keys": grp["keys"][...],
                    "label_values": grp["label_values"][...],
                    "label_offsets": grp["label_offsets"][...],
                }
            except Exception as exc:
                raise ShardError(
                    f"{url}: unreadable Zarr group for {self.shift} ({type(exc).__name__}: {exc})"
                ) from exc
        return self._open[g]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} clips")
        g = bisect.bisect_right(self.starts, i) - 1
        j = i - int(self.starts[g])
        grp = self._group(g)
        t0, t1 = int(grp["offsets"][j]), int(grp["offsets"][j + 1])
        if self.max_frames is not None and t1 - t0 > self.max_frames:
            t0 += (t1 - t0 - self.max_frames) // 2 if self.crop == "center" else 0
            t1 = t0 + self.max_frames
        x = torch.from_numpy(np.asarray(grp["values"][t0:t1], dtype=np.float32))  # (T, F)
        ids = grp["label_values"][int(grp["label_offsets"][j]) : int(grp["label_offsets"][j + 1])].tolist()
        if self.label_mode == "index":
            if len(ids) != 1:
                raise ShardError(f"label_mode='index' needs one label; clip {grp['keys'][j]!r} has {ids}")
            labels = torch.tensor(ids[0], dtype=torch.int64)
        else:
            labels = torch.zeros(self.n_classes)
            labels[ids] = 1.0
        return {
            "key": str(grp["keys"][j]),
            "features": normalise(x, *self.norm),
            "labels": labels,
            "frame_shift_ms": parse_shift_name(self.shift),
        }


def _group_path(shard: dict) -> str:
    group = shard.get("zarr_group") or shard["name"].rsplit(".", 1)[0]
    return group if "/" in group else f"store.zarr/{group}"


def collate_packed(items: list[dict], patch: tuple[int, int] = (16, 16)) -> PackedBatch:
    """Pack dataset items into one batch (each clip trimmed to a multiple of ``p_t``)."""
    return PackedBatch.from_clips(
        [it["features"] for it in items],
        torch.stack([it["labels"] for it in items]),
        [it["key"] for it in items],
        patch,
        frame_shift_ms=[it["frame_shift_ms"] for it in items],
    )
