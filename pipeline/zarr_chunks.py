"""A direct reader for the Zarr arrays ``pipeline build-shards`` writes: ``<shift>/values (ΣT, F)`` float16.

Notation: ``ΣT`` frames of a shard at one shift, ``F`` mel bins, ``S`` frames per shard object, ``c``
frames per inner chunk.

The writer's layout (``docs/shard-format.md``): a regular grid of shard objects of ``(S, F)``
(``c/<k>/0``), each with the ``sharding_indexed`` codec: ``(c, F)`` inner chunks encoded ``bytes``
(little-endian) then ``zstd``, and an index at the object's end of ``S / c`` pairs ``(offset, nbytes)``
as little-endian uint64, then a CRC-32C. Reading a clip's ``values[t0:t1]`` through zarr costs a few
milliseconds of Python per call; here it is the index (read once per shard object) plus one byte
range and one zstd decode per inner chunk, through :func:`pipeline.sources.fetch_ranges` (local, HTTP,
S3 alike). :func:`layout` returns None for any other layout, and the caller then reads through zarr.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from numcodecs import Zstd

from flexast.pipeline.errors import ShardError
from flexast.pipeline.sources import fetch_ranges

_EMPTY = 2**64 - 1  # an inner chunk that was never written (all fill value)


@dataclass(frozen=True)
class Layout:
    """What :func:`read_frames` needs of one ``values`` array."""

    url: str  # the array's folder
    shape: tuple[int, int]  # (ΣT, F)
    shard_frames: int  # S
    chunk_frames: int  # c
    fill: float


def layout(url: str, meta: dict) -> Layout | None:
    """The :class:`Layout` of an array whose ``zarr.json`` is ``meta``, or None when it is not the writer's."""
    try:
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        shape, outer = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
        inner = conf["chunk_shape"]
        ok = (
            codec["name"] == "sharding_indexed"
            and meta["data_type"] == "float16"
            and len(shape) == 2
            and outer[1] == inner[1] == shape[1]
            and outer[0] % inner[0] == 0
            and [c["name"] for c in conf["codecs"]] == ["bytes", "zstd"]
            and conf["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
            and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
            and conf.get("index_location", "end") == "end"
            and meta["chunk_key_encoding"]["configuration"].get("separator", "/") == "/"
        )
    except (KeyError, TypeError, ValueError):
        return None
    if not ok:
        return None
    return Layout(url, (int(shape[0]), int(shape[1])), int(outer[0]), int(inner[0]), float(meta["fill_value"] or 0))


class ChunkReader:
    """Reads frame ranges of writer-layout arrays; caches each shard object's chunk index (per process)."""

    def __init__(self, storage_options: dict | None = None, retries: int = 4, backoff_s: float = 0.2):
        self.storage_options, self.retries, self.backoff_s = storage_options, retries, backoff_s
        self.indexes: dict[str, np.ndarray] = {}
        self.codec = Zstd()

    def _get(self, url: str, ranges, counters):
        return fetch_ranges(
            url, ranges, self.storage_options, retries=self.retries, backoff_s=self.backoff_s, counters=counters
        )

    def _index(self, lay: Layout, k: int, counters) -> tuple[str, np.ndarray]:
        obj = f"{lay.url}/c/{k}/0"
        if obj not in self.indexes:
            n = lay.shard_frames // lay.chunk_frames
            from flexast.pipeline.sources import is_remote

            if is_remote(obj):
                import fsspec

                fs, path = fsspec.core.url_to_fs(obj, **(self.storage_options or {}))
                size = fs.size(path)
            else:
                import os

                size = os.path.getsize(obj.removeprefix("file://"))
            (raw,) = self._get(obj, [(size - 16 * n - 4, size - 4)], counters)
            self.indexes[obj] = np.frombuffer(raw, "<u8").reshape(n, 2)  # (n, 2): offset, nbytes
        return obj, self.indexes[obj]

    def read(self, items: list[tuple[Layout, int, int]], counters: dict | None = None) -> list[np.ndarray]:
        """``values[t0:t1]`` as ``(T, F)`` float16 for each ``(layout, t0, t1)``; each needed chunk decoded once."""
        need: dict[tuple[str, int], tuple] = {}  # (array url, chunk number) → (layout, shard object, index row)
        for lay, t0, t1 in items:
            for j in range(t0 // lay.chunk_frames, -(-t1 // lay.chunk_frames)):
                k, row = divmod(j * lay.chunk_frames, lay.shard_frames)
                need.setdefault((lay.url, j), (lay, k, row // lay.chunk_frames))
        by_obj: dict[str, list] = {}
        for (url, j), (lay, k, row) in need.items():
            obj, index = self._index(lay, k, counters)
            offset, nbytes = (int(v) for v in index[row])
            by_obj.setdefault(obj, []).append(((url, j), lay, offset, nbytes))
        chunks: dict[tuple[str, int], np.ndarray] = {}
        for obj, wanted in by_obj.items():
            present = [w for w in wanted if w[2] != _EMPTY]
            blobs = self._get(obj, [(off, off + n) for _, _, off, n in present], counters) if present else []
            for (key, lay, _, _), blob in zip(present, blobs, strict=True):
                try:
                    data = self.codec.decode(blob)
                except Exception as exc:
                    raise ShardError(f"{obj}: inner chunk {key[1]} does not decode ({exc})") from exc
                chunks[key] = np.frombuffer(data, "<f2").reshape(lay.chunk_frames, lay.shape[1])  # (c, F)
            for key, lay, off, _ in wanted:
                if off == _EMPTY:
                    chunks[key] = np.full((lay.chunk_frames, lay.shape[1]), lay.fill, np.float16)
        out = []
        for lay, t0, t1 in items:
            j0, j1 = t0 // lay.chunk_frames, -(-t1 // lay.chunk_frames)
            parts = [chunks[(lay.url, j)] for j in range(j0, j1)]
            x = parts[0] if len(parts) == 1 else np.concatenate(parts, 0)  # (Σc, F)
            start = t0 - j0 * lay.chunk_frames
            out.append(x[start : start + t1 - t0])
        return out


def read_meta(url: str, storage_options: dict | None = None) -> dict:
    """The parsed ``zarr.json`` of an array folder."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{url}/zarr.json", **(storage_options or {}))
    return json.loads(fs.cat_file(path))
