"""A direct reader for the Zarr arrays ``pipeline build-shards`` writes: ``<shift>/values (ΣT, F)`` float16.

Notation: ``ΣT`` frames of a shard at one shift, ``F`` mel bins, ``S`` frames per shard object, ``c``
frames per inner chunk.

The writer's layout (``docs/shard-format.md``): a regular grid of shard objects of ``(S, F)``
(``c/<k>/0``), each with the ``sharding_indexed`` codec: ``(c, F)`` inner chunks encoded ``bytes``
(little-endian; builds made before raw chunks add ``zstd``), and an index at the object's end of
``S / c`` pairs ``(offset, nbytes)`` as little-endian uint64, then a CRC-32C.

Reading a clip's ``values[t0:t1]`` through zarr costs a few milliseconds of Python per call. Here it is
the index (read once per shard object) plus, for raw chunks stored in order, one byte range per clip
(its exact bytes), else one range and one decode per inner chunk, all through
:func:`pipeline.sources.fetch_ranges` (local, HTTP, S3 alike). :func:`layout` returns None for any
other layout, and the caller then reads through zarr.
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
    compressed: bool  # zstd after bytes, or raw little-endian float16


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
            and [c["name"] for c in conf["codecs"]] in (["bytes"], ["bytes", "zstd"])
            and conf["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
            and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
            and conf.get("index_location", "end") == "end"
            and meta["chunk_key_encoding"]["configuration"].get("separator", "/") == "/"
        )
    except (KeyError, TypeError, ValueError):
        return None
    if not ok:
        return None
    fill = float(meta["fill_value"] or 0)
    return Layout(url, (int(shape[0]), int(shape[1])), int(outer[0]), int(inner[0]), fill, len(conf["codecs"]) == 2)


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
        """``values[t0:t1]`` as ``(T, F)`` float16 for each ``(layout, t0, t1)``.

        Raw chunks stored in order are read as one byte range per clip and shard object (exactly the
        clip's bytes); otherwise each needed inner chunk is read and decoded once per call.
        """
        out: list = [None] * len(items)
        rest = []
        ranged: dict[str, list] = {}  # shard object → [(item, start byte, stop byte)]
        for i, (lay, t0, t1) in enumerate(items):
            spans = self._raw_spans(lay, t0, t1, counters) if not lay.compressed else None
            if spans is None:
                rest.append(i)
                continue
            out[i] = []
            for obj, a, b in spans:
                ranged.setdefault(obj, []).append((i, a, b))
        for obj, wanted in ranged.items():
            for (i, _, _), blob in zip(wanted, self._get(obj, [(a, b) for _, a, b in wanted], counters), strict=True):
                out[i].append(blob)
        for i in range(len(items)):
            if isinstance(out[i], list):
                lay = items[i][0]
                data = out[i][0] if len(out[i]) == 1 else b"".join(out[i])
                out[i] = np.frombuffer(data, "<f2").reshape(-1, lay.shape[1])  # (T, F)
        if rest:
            for i, x in zip(rest, self._read_chunks([items[i] for i in rest], counters), strict=True):
                out[i] = x
        return out

    def _raw_spans(self, lay: Layout, t0: int, t1: int, counters) -> list[tuple[str, int, int]] | None:
        """Byte ranges ``(shard object, start, stop)`` holding exactly frames ``[t0, t1)`` of a raw layout,
        or None when a needed chunk is missing or the chunks are not stored in order."""
        row = lay.shape[1] * 2  # bytes per frame
        spans = []
        t = t0
        while t < t1:
            k = t // lay.shard_frames
            stop = min(t1, (k + 1) * lay.shard_frames)
            obj, index = self._index(lay, k, counters)
            c0 = (t - k * lay.shard_frames) // lay.chunk_frames
            c1 = -(-(stop - k * lay.shard_frames) // lay.chunk_frames)
            offs, sizes = index[c0:c1, 0], index[c0:c1, 1]
            if (offs == _EMPTY).any() or (sizes != lay.chunk_frames * row).any() or (np.diff(offs) != sizes[:-1]).any():
                return None
            a = int(offs[0]) + (t - k * lay.shard_frames - c0 * lay.chunk_frames) * row
            spans.append((obj, a, a + (stop - t) * row))
            t = stop
        return spans

    def _read_chunks(self, items: list[tuple[Layout, int, int]], counters) -> list[np.ndarray]:
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
                    data = self.codec.decode(blob) if lay.compressed else blob
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
