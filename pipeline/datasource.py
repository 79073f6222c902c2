"""Where a loader's clips come from: a WebDataset tar set, a Zarr v3 store, or either cached in memory.

Notation: ``N`` samples of a shard, ``T`` frames of a clip at one stored shift, ``F`` mel bins.

Every source offers the same two calls, so :mod:`pipeline.stream` plans and materialises steps the
same way whatever the store:

* :meth:`Source.records` — the samples of one shard, in shard order, as metadata only:
  ``{"key", "url", "meta": {"label_ids", "frames": {shift_name: T}, ...}, "loc": {shift_name: where}}``.
  A step is planned (resolution, crop length, packing) from records alone.
* :meth:`Source.fetch` — the ``(T, F)`` float16 features of chosen ``(url, loc)`` pairs, and nothing else.

Sources:

* :class:`TarSource` — WebDataset tars, local or ``http(s)://`` / ``s3://``. Records come from the
  shard's member index (``<shard>.members.json``, written at build time, see ``docs/shard-format.md``)
  or, for shards built without one, from one scan of the tar's headers. Features are byte ranges of
  the ``.npy`` members: a local shard is memory-mapped; a remote one is read by range requests.
* :class:`ZarrSource` — the build's ``store.zarr`` (one group per shard); a feature is one slice of
  ``<shift>/values`` between two offsets.
* :class:`MemorySource` — records and every shift's features of another source, read once
  (:meth:`MemorySource.cache`) and replayed every epoch.

Given the same shards, the three give the same records in the same order, so a loader over any of
them produces the same steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np

from flexast.pipeline.errors import ConfigError, ShardError
from flexast.pipeline.sources import (
    ShardInfo,
    expand_urls,
    fetch_many,
    fetch_object,
    is_remote,
    read_index,
    with_retries,
)
from flexast.pipeline.tar_index import (
    MEMBERS_SUFFIX,
    load_npy,
    records_from_member_index,
    records_from_members,
    scan_tar,
)
from flexast.pipeline.transport import MAX_IN_FLIGHT
from flexast.pipeline.units import shift_name
from flexast.pipeline.zarr_chunks import ChunkReader, Layout, layout, read_meta

log = logging.getLogger(__name__)


class Source:
    """Common part of the sources: ``spec`` (what the user named), ``index`` (``index.json``), ``shards``."""

    kind = "?"

    def __init__(self, spec: str, index: dict, shards: list[ShardInfo], storage_options: dict | None = None):
        self.spec, self.index, self.shards = spec, index, shards
        self.storage_options = storage_options or {}
        self.retries, self.backoff_s = 4, 0.2  # transient-error policy of remote reads
        self._records: dict[str, list[dict]] = {}

    @property
    def label_names(self) -> list[str]:
        return list(self.index.get("labels", {}).get("names", []))

    @property
    def remote(self) -> bool:
        """Whether :meth:`fetch` goes over the network (HTTP, S3, ...): then the loader reads steps ahead."""
        return any(is_remote(s.url) for s in self.shards)

    @property
    def n_clips(self) -> int:
        return sum(int(s.samples or 0) for s in self.shards)

    def records(self, shard: ShardInfo) -> list[dict]:
        """The samples of ``shard`` as metadata records (cached for the life of the source)."""
        if shard.url not in self._records:
            recs = self._load_records(shard)
            if shard.samples is not None and len(recs) != shard.samples:
                raise ShardError(f"shard {shard.url}: {len(recs)} samples found but index.json lists {shard.samples}")
            self._records[shard.url] = recs
        return self._records[shard.url]

    def prefetch(self, shards: Sequence[ShardInfo], threads: int = 16) -> None:
        """Load the records of ``shards`` concurrently (one small read each: a member index, a group's
        offsets), so planning an epoch over many remote shards does not wait for them one by one. Errors
        are left for :meth:`records` to raise, in the planner's order."""
        todo = [s for s in shards if s.url not in self._records]
        if len(todo) < 2:
            return

        def load(shard):
            with contextlib.suppress(Exception):  # raised again, in order, by the planner's own call
                self.records(shard)

        with ThreadPoolExecutor(min(threads, len(todo))) as pool:
            list(pool.map(load, todo))

    def _load_records(self, shard: ShardInfo) -> list[dict]:
        raise NotImplementedError

    def prepare(self, wanted: Sequence[tuple[str, object]], counters: dict | None = None) -> None:
        """Fetch now what :meth:`fetch` of ``wanted`` would need besides the features themselves (a Zarr
        source's chunk indexes), so that each step's reads are one round of requests. Nothing by default."""

    def fetch(self, wanted: Sequence[tuple[str, object]], counters: dict | None = None) -> list[np.ndarray]:
        """``(T, F)`` float16 features for each ``(url, loc)`` of ``wanted``, in order."""
        raise NotImplementedError

    def touching(self, a: Sequence[tuple[str, object]], b: Sequence[tuple[str, object]]) -> bool:
        """Whether some feature of ``b`` lies right beside one of ``a`` in the same object, so that fetching
        them together saves a request (read-ahead then fetches their steps together). Never, by default."""
        return False

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles are per process
        return state


# ---- WebDataset tar ---------------------------------------------------------------------------------


class TarSource(Source):
    """WebDataset tar shards (see the module docstring)."""

    kind = "tar"

    def __init__(self, spec, index, shards, storage_options=None):
        super().__init__(spec, index, shards, storage_options)
        self._handles: dict[str, mmap.mmap] = {}
        sizes = {s["name"]: s.get("bytes") for s in index.get("shards", [])}
        self._bytes = {sh.url: sizes.get(sh.url.rsplit("/", 1)[-1]) for sh in shards}  # tar sizes index.json lists

    def _map(self, url: str):
        if url not in self._handles:
            path = url.removeprefix("file://")
            try:
                with open(path, "rb") as f:
                    if os.fstat(f.fileno()).st_size == 0:
                        raise ShardError(f"shard {url}: empty file")
                    self._handles[url] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except FileNotFoundError as exc:
                raise ShardError(f"shard {url}: missing") from exc
        return self._handles[url]

    def _load_records(self, shard: ShardInfo) -> list[dict]:
        url = shard.url
        side = url + MEMBERS_SUFFIX
        if not is_remote(url):
            if os.path.exists(side.removeprefix("file://")):
                with open(side.removeprefix("file://")) as f:
                    return records_from_member_index(json.load(f), url, len(self._map(url)))
            buf = self._map(url)
            return records_from_members(scan_tar(buf, url), lambda o, s: buf[o : o + s], url)
        try:
            doc = with_retries(
                lambda: _read_remote(side, self.storage_options), f"member index {side}", self.retries, self.backoff_s
            )
        except FileNotFoundError:
            doc = None
        if doc is not None:
            return records_from_member_index(json.loads(doc), url, self._bytes.get(url))
        log.warning("shard %s has no member index: reading it whole once (rebuild it for ranged reads)", url)
        data = fetch_object(url, self.storage_options, retries=self.retries, backoff_s=self.backoff_s)  # resumable
        self._handles[url] = data  # the whole shard is here now: serve its features from memory
        return records_from_members(scan_tar(data, url), lambda o, s: data[o : o + s], url)

    def touching(self, a, b) -> bool:
        """Members of one tar with at most one json member and its headers between them (a one-shift build)."""
        return _touch(a, b, lambda url, loc: (url, loc[0], loc[0] + loc[1]), gap=3 * 512 + 1024)

    def fetch(self, wanted, counters=None):
        out: list = [None] * len(wanted)
        remote: dict[str, list[int]] = {}
        for i, (url, (offset, size)) in enumerate(wanted):
            if is_remote(url) and url not in self._handles:
                remote.setdefault(url, []).append(i)
                continue
            buf = self._handles[url] if is_remote(url) else self._map(url)
            out[i] = buf[offset : offset + size]
        asks = [
            (url, [(wanted[i][1][0], wanted[i][1][0] + wanted[i][1][1]) for i in idx]) for url, idx in remote.items()
        ]
        got = fetch_many(  # as many in flight as the loop allows: steps read ahead queue behind this one's requests
            asks, self.storage_options, retries=self.retries, backoff_s=self.backoff_s, max_in_flight=MAX_IN_FLIGHT,
            counters=counters,
        )  # fmt: skip
        for idx, blobs in zip(remote.values(), got, strict=True):  # every shard's requests were in flight together
            for i, data in zip(idx, blobs, strict=True):
                out[i] = data
        return [load_npy(data, f"shard {url}") for data, (url, _) in zip(out, wanted, strict=True)]


def _touch(a, b, span, gap: int = 0) -> bool:
    """Whether a feature of ``b`` begins at most ``gap`` bytes (or frames) after one of ``a`` ends, or ends
    at most ``gap`` before one begins; ``span(url, loc)`` is ``(object, start, stop)``."""
    spans_a = [span(url, loc) for url, loc in a]
    for url, loc in b:
        obj, x, y = span(url, loc)
        if any(o == obj and (0 <= x - e <= gap or 0 <= s - y <= gap) for o, s, e in spans_a):
            return True
    return False


def _read_remote(url: str, storage_options: dict | None) -> bytes:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.cat_file(path)


# ---- Zarr ---------------------------------------------------------------------------------------------


def zarr_group_path(shard: dict) -> str:
    """The group of an ``index.json`` shard entry, relative to the build folder (``store.zarr/<stem>``)."""
    group = shard.get("zarr_group") or shard["name"].rsplit(".", 1)[0]
    return group if "/" in group else f"store.zarr/{group}"


class ZarrSource(Source):
    """The Zarr v3 store of a build (see the module docstring); shard URLs are the groups' URLs.

    Planning reads every group's small arrays (keys, labels, offsets, durations) and its ``values``
    arrays' metadata through zarr's asynchronous API, all groups and arrays at once (:meth:`prefetch`):
    three rounds of requests (group, array metadata, chunks) however many groups. :meth:`prepare` then
    fetches the chunk indexes of the shard objects an epoch's steps touch, so each step's features are one
    round of ranged requests (:class:`~pipeline.zarr_chunks.ChunkReader`).
    """

    kind = "zarr"

    def __init__(self, spec, index, folder, storage_options=None):
        shards = [ShardInfo(f"{folder}/{zarr_group_path(s)}", int(s["samples"])) for s in index.get("shards", [])]
        super().__init__(spec, index, shards, storage_options)
        self._handles: dict = {}
        self._read: dict[str, dict | BaseException] = {}  # group url → its arrays, as read by prefetch
        self.layouts: dict[tuple[str, str], Layout | None] = {}  # (group url, shift) → writer layout or None
        self.reader: ChunkReader | None = None  # kept when pickled into workers: its chunk indexes travel along

    def _group(self, url: str):
        if url not in self._handles:
            import zarr

            try:
                self._handles[url] = zarr.open_group(url, mode="r", storage_options=self.storage_options or None)
            except Exception as exc:
                raise ShardError(f"shard {url}: unreadable Zarr group ({type(exc).__name__}: {exc})") from exc
        return self._handles[url]

    def _values(self, url: str, shift: str):
        """The ``<shift>/values`` array of a group, opened once per process (opening reads its metadata)."""
        if (url, shift) not in self._handles:
            self._handles[(url, shift)] = self._group(url)[f"{shift}/values"]
        return self._handles[(url, shift)]

    def prefetch(self, shards: Sequence[ShardInfo], threads: int = 16) -> None:
        """Read the groups of ``shards`` not read yet, all at once; errors wait for :meth:`records` to raise."""
        todo = [s.url for s in shards if s.url not in self._records and s.url not in self._read]
        if not todo:
            return
        from zarr.core.sync import sync

        got = sync(_read_groups(todo, self.storage_options, self.index.get("shifts_ms", [])))
        self._read.update(zip(todo, got, strict=True))

    def _load_records(self, shard: ShardInfo) -> list[dict]:
        url = shard.url
        if url not in self._read:
            self.prefetch([shard])
        got = self._read.pop(url)
        if isinstance(got, BaseException):
            raise ShardError(f"shard {url}: unreadable Zarr group ({type(got).__name__}: {got})") from got
        names = self.label_names
        keys = [str(k) for k in got["keys"]]
        values, offsets, durations = got["label_values"], got["label_offsets"], got["duration_s"]
        frame_offsets = got["offsets"]
        for shift, meta in got["values_meta"].items():
            self.layouts[(url, shift)] = layout(f"{url}/{shift}/values", meta)
        recs = []
        for j, key in enumerate(keys):
            ids = [int(i) for i in values[int(offsets[j]) : int(offsets[j + 1])]]
            frames = {s: int(o[j + 1] - o[j]) for s, o in frame_offsets.items()}
            meta = {"key": key, "label_ids": ids, "labels": [names[i] for i in ids if i < len(names)], "frames": frames}
            if durations is not None:
                meta["duration_s"] = float(durations[j])
            loc = {s: (s, int(o[j]), int(o[j + 1])) for s, o in frame_offsets.items()}
            recs.append({"key": key, "url": url, "meta": meta, "loc": loc})
        return recs

    def _layout(self, url: str, shift: str) -> Layout | None:
        """The writer's chunk layout of ``<shift>/values`` (read directly), or None (read through zarr)."""
        if (url, shift) not in self.layouts:
            try:
                meta = read_meta(f"{url}/{shift}/values", self.storage_options)
                self.layouts[(url, shift)] = layout(f"{url}/{shift}/values", meta)
            except (OSError, ValueError):
                self.layouts[(url, shift)] = None
        return self.layouts[(url, shift)]

    def __getstate__(self):
        state = super().__getstate__()
        state["_read"] = {}  # read but not yet turned into records: nothing a worker needs
        return state

    def _reader(self) -> ChunkReader:
        if self.reader is None:
            self.reader = ChunkReader(self.storage_options, self.retries, self.backoff_s)
        return self.reader

    def touching(self, a, b) -> bool:
        """Consecutive frames of one ``<shift>/values`` array."""
        return _touch(a, b, lambda url, loc: ((url, loc[0]), loc[1], loc[2]))

    def prepare(self, wanted, counters=None) -> None:
        """Fetch the chunk indexes of every shard object that reading ``wanted`` touches, all at once."""
        items = [(lay, t0, t1) for url, (shift, t0, t1) in wanted if (lay := self._layout(url, shift)) is not None]
        self._reader().load_indexes(items, counters)

    def fetch(self, wanted, counters=None):
        """Slices of the writer's layout read chunk by chunk directly (:mod:`pipeline.zarr_chunks`), others via zarr."""
        lays = [self._layout(url, shift) for url, (shift, _, _) in wanted]
        direct = [i for i, lay in enumerate(lays) if lay is not None]
        out: list = [None] * len(wanted)
        try:
            got = self._reader().read([(lays[i], *wanted[i][1][1:]) for i in direct], counters)
        except ShardError:
            raise
        except Exception as exc:
            urls = sorted({wanted[i][0] for i in direct})
            raise ShardError(f"shard {urls}: cannot read features ({type(exc).__name__}: {exc})") from exc
        for i, x in zip(direct, got, strict=True):
            out[i] = x
        for i, (url, (shift, t0, t1)) in enumerate(wanted):
            if out[i] is None:
                try:
                    out[i] = np.asarray(self._values(url, shift)[t0:t1])  # (T, F) float16
                except Exception as exc:
                    raise ShardError(f"shard {url}: cannot read {shift}/values[{t0}:{t1}] ({exc})") from exc
                if counters is not None:
                    counters["bytes"] = counters.get("bytes", 0) + out[i].nbytes
        return out


async def _read_groups(urls: list[str], storage_options: dict | None, shifts_ms: list) -> list[dict | BaseException]:
    """For each group: ``keys``, ``label_values``, ``label_offsets``, ``duration_s`` (or None), ``offsets``
    (``{shift: (N+1,)}``) and ``values_meta`` (``{shift: zarr.json of <shift>/values}``), or the exception
    that stopped it. Runs on zarr's event loop; every group and array is read concurrently."""
    import zarr.api.asynchronous as za

    async def one(url: str) -> dict:
        g = await za.open_group(store=url, mode="r", storage_options=storage_options or None)
        shifts = [shift_name(float(s)) for s in g.attrs.get("shifts_ms", shifts_ms)]
        small = ["keys", "label_values", "label_offsets", *(f"{s}/offsets" for s in shifts)]
        names = [*small, "duration_s", *(f"{s}/values" for s in shifts)]
        arrays = await asyncio.gather(*(g.getitem(n) for n in names), return_exceptions=True)
        found = dict(zip(names, arrays, strict=True))
        for name in [*small, *(f"{s}/values" for s in shifts)]:
            if isinstance(found[name], BaseException):
                raise found[name]
        durations = found["duration_s"] if not isinstance(found["duration_s"], BaseException) else None
        reads = [found[n] for n in small] + ([durations] if durations is not None else [])
        data = await asyncio.gather(*(a.getitem(slice(None)) for a in reads))
        got = dict(zip(small, data, strict=False))
        return {
            "keys": got["keys"],
            "label_values": got["label_values"],
            "label_offsets": got["label_offsets"],
            "duration_s": data[len(small)] if durations is not None else None,
            "offsets": {s: got[f"{s}/offsets"] for s in shifts},
            "values_meta": {s: found[f"{s}/values"].metadata.to_dict() for s in shifts},
        }

    return list(await asyncio.gather(*(one(u) for u in urls), return_exceptions=True))


# ---- memory -------------------------------------------------------------------------------------------


class MemorySource(Source):
    """Records and features held in memory: ``shards_data[url]`` is a list of records whose ``loc[shift]``
    is the ``(T, F)`` float16 array itself."""

    kind = "memory"

    def __init__(self, spec: str, index: dict, shards_data: dict[str, list[dict]]):
        shards = [ShardInfo(url, len(recs)) for url, recs in shards_data.items()]
        super().__init__(spec, index, shards)
        self._records = dict(shards_data)

    @classmethod
    def cache(cls, source: Source, max_clips: int = 0) -> MemorySource:
        """Read every shard of ``source`` once (every stored shift), optionally only its first ``max_clips``."""
        data, n = {}, 0
        for shard in source.shards:
            recs = source.records(shard)
            if max_clips:
                recs = recs[: max_clips - n]
            wanted = [(r["url"], loc) for r in recs for loc in r["loc"].values()]
            arrays = iter(source.fetch(wanted))
            data[shard.url] = [{**r, "loc": {s: np.array(next(arrays)) for s in r["loc"]}} for r in recs]
            n += len(recs)
            if max_clips and n >= max_clips:
                break
        mem = cls(source.spec, source.index, data)
        mem.origin = source.kind
        return mem

    @property
    def remote(self) -> bool:
        return False

    def _load_records(self, shard):
        raise ShardError(f"shard {shard.url} is not in memory")

    def fetch(self, wanted, counters=None):
        return [loc for _, loc in wanted]


# ---- opening a spec -----------------------------------------------------------------------------------


def open_source(
    spec: str | Sequence[str],
    storage_options: dict | None = None,
    format: str = "auto",
    retries: int = 4,
    backoff_s: float = 0.2,
) -> Source:
    """A :class:`TarSource` or :class:`ZarrSource` for a source spec (see :func:`pipeline.sources.expand_urls`).

    ``format``: ``auto`` (tar when the build has tar shards, else its Zarr store; a spec ending in
    ``store.zarr`` picks Zarr), ``tar`` or ``zarr``.

    Raises:
        ShardError: naming the spec, when it names nothing or a build with no shards.
    """
    if format not in ("auto", "tar", "zarr"):
        raise ConfigError(f"source format {format!r} (expected auto, tar or zarr)")
    where = spec if isinstance(spec, str) else ", ".join(spec)
    if isinstance(spec, str) and spec.rstrip("/").endswith("store.zarr"):
        spec, format = spec.rstrip("/")[: -len("store.zarr")].rstrip("/") or ".", "zarr"
    pattern = isinstance(spec, str) and any(c in spec for c in "*?{[")
    if isinstance(spec, str) and not is_remote(spec) and not os.path.exists(spec) and not pattern:
        raise ShardError(f"data source {where!r} does not exist")
    try:
        index, shards = expand_urls(spec, storage_options)
    except FileNotFoundError as exc:
        raise ShardError(f"data source {where!r}: no index.json ({exc})") from exc
    index = index or {}
    if isinstance(spec, str) and not spec.endswith(".json") and not index:
        beside = os.path.join(os.path.dirname(shards[0].url), "index.json") if shards else ""
        if beside and not is_remote(beside) and os.path.exists(beside):
            index, _ = read_index(beside)
    has_tar = any(s.url.endswith(".tar") for s in shards)
    if format == "zarr" or (format == "auto" and not has_tar):
        if not index.get("shards") or not any(s.get("zarr_group") for s in index["shards"]):
            raise ShardError(f"data source {where!r}: no Zarr store in its index.json (build with --format zarr|both)")
        folder = spec if not spec.endswith(".json") else (spec.rsplit("/", 1)[0] if "/" in spec else ".")
        source: Source = ZarrSource(where, index, folder.rstrip("/"), storage_options)
    elif not has_tar:
        raise ShardError(f"data source {where!r} lists no tar shards")
    else:
        source = TarSource(where, index, [s for s in shards if s.url.endswith(".tar")], storage_options)
    source.retries, source.backoff_s = retries, backoff_s
    return source


def label_map(source_names: Sequence[str], vocab: Sequence[str], where: str, counts=None) -> list[int]:
    """For each label id of a source, its id in ``vocab`` (matched by name).

    Raises:
        ConfigError: naming every label of the source (with at least one clip, when ``counts`` says)
            that ``vocab`` lacks, and the source.
    """
    pos = {n: i for i, n in enumerate(vocab)}
    used = [n for i, n in enumerate(source_names) if counts is None or i >= len(counts) or counts[i] > 0]
    unknown = [n for n in used if n not in pos]
    if unknown:
        raise ConfigError(
            f"{where}: labels {unknown} are not in the model's vocabulary of {len(vocab)} labels "
            f"(first: {list(vocab)[:5]}); evaluate on data labelled with the training vocabulary"
        )
    return [pos.get(n, -1) for n in source_names]
