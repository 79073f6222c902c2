"""A direct reader for the Zarr arrays ``pipeline build-shards`` writes: ``<shift>/values (ΣT, F)`` float16.

Notation: ``ΣT`` frames of a shard at one shift, ``F`` mel bins, ``S`` frames per shard object, ``c``
frames per inner chunk.

The writer's layout (``docs/shard-format.md``): a regular grid of shard objects of ``(S, F)``
(``c/<k>/0``), each with the ``sharding_indexed`` codec: ``(c, F)`` inner chunks encoded ``bytes``
(little-endian; builds made before raw chunks add ``zstd``), and an index at the object's end of
``S / c`` pairs ``(offset, nbytes)`` as little-endian uint64, then a CRC-32C.

Reading a clip's ``values[t0:t1]`` through zarr costs a few milliseconds of Python per call. Here it is
the index (read once per shard object, by one suffix-range request) plus, for raw chunks stored in order,
one byte range per clip (its exact bytes), else one range and one decode per inner chunk, all through
:mod:`pipeline.transport` (local, HTTP, S3 alike), every object of a call in flight together.
:func:`layout` returns None for any other layout, and the caller then reads through zarr.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import numpy as np
from numcodecs import Zstd

from flexast.pipeline.errors import ShardError
from flexast.pipeline.transport import MAX_IN_FLIGHT, fetch_many, fetch_tails

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
    """Reads frame ranges of writer-layout arrays; caches each shard object's chunk index (per process).

    A call needs at most two rounds of requests, each sent all at once: the indexes of the shard objects
    it touches that are not cached yet (one suffix-range GET each, :func:`pipeline.transport.fetch_tails`;
    :meth:`load_indexes` fetches them ahead, e.g. while an epoch is planned), then every byte range of
    every object (one :func:`pipeline.transport.fetch_many`).
    """

    def __init__(self, storage_options: dict | None = None, retries: int = 4, backoff_s: float = 0.2):
        self.storage_options, self.retries, self.backoff_s = storage_options, retries, backoff_s
        self.indexes: dict[str, np.ndarray] = {}
        self.codec = Zstd()
        self._lock = threading.Lock()  # one index fetch at a time: steps read ahead on threads never fetch one twice

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @staticmethod
    def objects(lay: Layout, t0: int, t1: int) -> list[str]:
        """The shard objects holding frames ``[t0, t1)``."""
        if t1 <= t0:
            return []
        return [f"{lay.url}/c/{k}/0" for k in range(t0 // lay.shard_frames, (t1 - 1) // lay.shard_frames + 1)]

    def load_indexes(self, items: list[tuple[Layout, int, int]], counters: dict | None = None) -> None:
        """Fetch the chunk indexes of every shard object ``items`` touch that is not cached, all at once."""
        need = {obj: lay for lay, t0, t1 in items for obj in self.objects(lay, t0, t1)}
        if all(obj in self.indexes for obj in need):
            return
        with self._lock:
            missing = [obj for obj in need if obj not in self.indexes]
            if not missing:
                return
            sizes = [16 * (need[obj].shard_frames // need[obj].chunk_frames) + 4 for obj in missing]
            tails = fetch_tails(
                list(zip(missing, sizes, strict=True)), self.storage_options, retries=self.retries,
                backoff_s=self.backoff_s, counters=counters,
            )  # fmt: skip
            for obj, n, raw in zip(missing, sizes, tails, strict=True):
                if len(raw) != n:
                    raise ShardError(f"{obj}: {len(raw)} bytes, shorter than its chunk index ({n} bytes): corrupt")
                self.indexes[obj] = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)  # (S / c, 2): offset, nbytes

    def read(self, items: list[tuple[Layout, int, int]], counters: dict | None = None) -> list[np.ndarray]:
        """``values[t0:t1]`` as ``(T, F)`` float16 for each ``(layout, t0, t1)``.

        Raw chunks stored in order are read as one byte range per clip and shard object (exactly the
        clip's bytes); otherwise each needed inner chunk is read and decoded once per call. Every range
        of the call is in one :func:`~pipeline.transport.fetch_many` (all objects in flight together).
        """
        self.load_indexes(items, counters)
        out: list = [None] * len(items)
        asks: dict[str, list[tuple[int, int]]] = {}  # shard object → byte ranges
        where: list[tuple[str, int]] = []  # per range asked: (object, position in asks[object])
        spans_of: dict[int, list[int]] = {}  # item → its ranges (numbers in ``where``)
        rest = []
        for i, (lay, t0, t1) in enumerate(items):
            spans = self._raw_spans(lay, t0, t1) if not lay.compressed else None
            if spans is None:
                rest.append(i)
                continue
            spans_of[i] = [_ask(asks, where, obj, a, b) for obj, a, b in spans]
        need = self._chunk_asks([items[i] for i in rest], asks, where)
        got = _fetch_all(asks, self.storage_options, self.retries, self.backoff_s, counters)
        blobs = [got[obj][j] for obj, j in where]
        for i, nums in spans_of.items():
            data = blobs[nums[0]] if len(nums) == 1 else b"".join(blobs[j] for j in nums)
            out[i] = np.frombuffer(data, "<f2").reshape(-1, items[i][0].shape[1])  # (T, F)
        chunks = self._decode(need, blobs)
        for i, x in zip(rest, self._assemble([items[i] for i in rest], chunks), strict=True):
            out[i] = x
        return out

    def _raw_spans(self, lay: Layout, t0: int, t1: int) -> list[tuple[str, int, int]] | None:
        """Byte ranges ``(shard object, start, stop)`` holding exactly frames ``[t0, t1)`` of a raw layout,
        or None when a needed chunk is missing or the chunks are not stored in order."""
        row = lay.shape[1] * 2  # bytes per frame
        spans = []
        t = t0
        while t < t1:
            k = t // lay.shard_frames
            stop = min(t1, (k + 1) * lay.shard_frames)
            obj = f"{lay.url}/c/{k}/0"
            index = self.indexes[obj]
            c0 = (t - k * lay.shard_frames) // lay.chunk_frames
            c1 = -(-(stop - k * lay.shard_frames) // lay.chunk_frames)
            offs, sizes = index[c0:c1, 0], index[c0:c1, 1]
            if (offs == _EMPTY).any() or (sizes != lay.chunk_frames * row).any() or (np.diff(offs) != sizes[:-1]).any():
                return None
            a = int(offs[0]) + (t - k * lay.shard_frames - c0 * lay.chunk_frames) * row
            spans.append((obj, a, a + (stop - t) * row))
            t = stop
        return spans

    def _chunk_asks(self, items: list[tuple[Layout, int, int]], asks: dict, where: list) -> dict:
        """Add the inner chunks ``items`` overlap (each once) to ``asks``; ``need`` maps ``(array url, chunk
        number)`` to ``(layout, shard object, range number in where or None for a never-written chunk)``."""
        need: dict[tuple[str, int], tuple] = {}
        for lay, t0, t1 in items:
            for j in range(t0 // lay.chunk_frames, -(-t1 // lay.chunk_frames)):
                if (lay.url, j) in need:
                    continue
                k, row = divmod(j * lay.chunk_frames, lay.shard_frames)
                obj = f"{lay.url}/c/{k}/0"
                offset, nbytes = (int(v) for v in self.indexes[obj][row // lay.chunk_frames])
                num = None if offset == _EMPTY else _ask(asks, where, obj, offset, offset + nbytes)
                need[(lay.url, j)] = (lay, obj, num)
        return need

    def _decode(self, need: dict, blobs: list[bytes]) -> dict[tuple[str, int], np.ndarray]:
        chunks: dict[tuple[str, int], np.ndarray] = {}
        for key, (lay, obj, num) in need.items():
            if num is None:
                chunks[key] = np.full((lay.chunk_frames, lay.shape[1]), lay.fill, np.float16)  # (c, F)
                continue
            try:
                data = self.codec.decode(blobs[num]) if lay.compressed else blobs[num]
            except Exception as exc:
                raise ShardError(f"{obj}: inner chunk {key[1]} does not decode ({exc})") from exc
            chunks[key] = np.frombuffer(data, "<f2").reshape(lay.chunk_frames, lay.shape[1])  # (c, F)
        return chunks

    @staticmethod
    def _assemble(items: list[tuple[Layout, int, int]], chunks: dict) -> list[np.ndarray]:
        out = []
        for lay, t0, t1 in items:
            j0, j1 = t0 // lay.chunk_frames, -(-t1 // lay.chunk_frames)
            parts = [chunks[(lay.url, j)] for j in range(j0, j1)]
            x = parts[0] if len(parts) == 1 else np.concatenate(parts, 0)  # (Σc, F)
            start = t0 - j0 * lay.chunk_frames
            out.append(x[start : start + t1 - t0])
        return out


def _ask(asks: dict, where: list, obj: str, a: int, b: int) -> int:
    """Queue bytes ``[a, b)`` of ``obj``; returns the range's number in ``where``."""
    ranges = asks.setdefault(obj, [])
    ranges.append((a, b))
    where.append((obj, len(ranges) - 1))
    return len(where) - 1


def _fetch_all(asks: dict, storage_options, retries: int, backoff_s: float, counters) -> dict[str, list[bytes]]:
    """Every object's ranges in one :func:`~pipeline.transport.fetch_many`: ``{object: [bytes per range]}``."""
    if not asks:
        return {}
    got = fetch_many(
        list(asks.items()), storage_options, retries=retries, backoff_s=backoff_s, max_in_flight=MAX_IN_FLIGHT,
        counters=counters,
    )  # fmt: skip
    return dict(zip(asks, got, strict=True))


def read_meta(url: str, storage_options: dict | None = None) -> dict:
    """The parsed ``zarr.json`` of an array folder."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{url}/zarr.json", **(storage_options or {}))
    return json.loads(fs.cat_file(path))
