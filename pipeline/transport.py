"""Reading byte ranges of a shard, locally or from object storage, with requests in flight and retries.

Units: byte offsets into one object, half-open ``[start, stop)``.

:func:`fetch_ranges` is the one transport the loader uses for random access (tar members by index,
Zarr chunks). Over HTTP(S) and S3 it runs on fsspec's I/O event loop: up to ``max_in_flight``
requests at once, each a ``Range: bytes=start-(stop-1)`` GET read in 64 KiB chunks
(:mod:`pipeline.object_store`).

* **Coalescing.** The requested ranges of one object are sorted; ranges that overlap or touch become one
  request. Then the gaps between requests are joined smallest first while each is at most
  :data:`COALESCE_GAP` bytes (a tar header or two) and all joined gaps stay within :data:`COALESCE_WASTE`
  (10 %) of the bytes asked for; no request grows beyond :data:`COALESCE_MAX` bytes. Gap bytes are fetched
  and dropped (so bytes sent are at most 1.1× the bytes asked for); nothing else is read.
* **Retries.** What :func:`pipeline.retrying.is_transient` calls transient (connection errors, botocore's
  ``EndpointConnectionError`` included, timeouts, HTTP 5xx and 429, S3 throttling) is retried with
  exponential backoff ``backoff_s · 2^k`` (×0.5–1.5 jitter), ``retries`` times per request. A response
  cut short keeps the bytes it delivered and the retry asks only for the rest (*resumed*); a failure
  that delivered bytes does not use up a retry. A missing object, a denied one, or a range past its
  end is never retried.
* **Errors.** A request that stays unreadable raises :class:`~pipeline.errors.ShardError` naming the URL
  and the byte range; the original exception is its ``__cause__``.
* **In flight.** ``max_in_flight`` bounds one call's requests; every call of a process also shares a cap
  of :data:`MAX_IN_FLIGHT` requests on the event loop, so several calls started ahead of time
  (:func:`submit`, the loader's read-ahead) never hold more than that many connections.
* **Counters.** ``counters`` (a dict, updated in place, summed over calls) gets ``requests`` (HEADs and
  GETs sent, retries included), ``retries``, ``resumed`` (retries that continued a cut-short response) and
  ``bytes`` (bytes received, gaps included); ``unranged`` counts responses of a server that ignored
  ``Range`` and sent the whole object (read up to the range's end, the rest dropped).

:func:`fetch_object` reads a whole object the same way (its size from one ``HEAD``, then 8 MiB requests),
and :func:`object_size` is that ``HEAD`` alone. :func:`fetch_tails` reads the last ``n`` bytes of many
objects with one suffix-range GET each (``Range: bytes=-n``, no ``HEAD``), all in flight together. Other
fsspec protocols (``gs://`` …) read through ``fs.cat_file`` with the same retries but no resume.
:func:`submit` runs any of them (or a source's ``fetch``) on a per-process thread pool and returns a
``Future``: that is how reads start early.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import fsspec
import fsspec.asyn

from flexast.pipeline.errors import ShardError
from flexast.pipeline.object_store import (
    RangeError,
    filesystem,
    get_http,
    get_s3,
    head_http,
    head_s3,
    tail_http,
    tail_s3,
)
from flexast.pipeline.retrying import CutShort, backoff_delay, is_transient

__all__ = [
    "COALESCE_GAP",
    "COALESCE_MAX",
    "COALESCE_WASTE",
    "RangeError",
    "coalesce",
    "fetch_many",
    "fetch_object",
    "fetch_ranges",
    "fetch_tails",
    "is_remote",
    "is_transient",
    "object_size",
    "submit",
    "submit_many",
]

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "gcs://")


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


COALESCE_GAP = 8 << 10
"""Largest gap (bytes) between two requested ranges that are fetched in one request."""
COALESCE_WASTE = 0.1
"""Most gap bytes the requests for one object may carry, as a fraction of the bytes asked for."""
COALESCE_MAX = 16 << 20
"""Largest coalesced request (bytes); a single range larger than this is still one request."""
CHUNK = 64 << 10
MAX_IN_FLIGHT = 64
"""Requests in flight at once on one event loop (one process), whatever the number of calls sharing it."""
SUBMIT_THREADS = 16
"""Threads of the per-process pool behind :func:`submit` (each waits on one call; the I/O is on the loop)."""

_CAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _loop_cap() -> asyncio.Semaphore:
    """The running loop's shared :data:`MAX_IN_FLIGHT` semaphore (made and used on that loop's thread only)."""
    loop = asyncio.get_running_loop()
    cap = _CAPS.get(loop)
    if cap is None:
        cap = _CAPS[loop] = asyncio.Semaphore(MAX_IN_FLIGHT)
    return cap


_NATIVE = {  # pipeline.object_store's calls (resumed ranges, typed errors) per fsspec protocol; they take:
    "http": ({"get": get_http, "head": head_http, "tail": tail_http}, "url"),  # the URL
    "s3": ({"get": get_s3, "head": head_s3, "tail": tail_s3}, "path"),  # fsspec's bucket/key path
}
_NATIVE["https"], _NATIVE["s3a"] = _NATIVE["http"], _NATIVE["s3"]


def _native(fs, url: str, path: str, op: str):
    """``(call, target)``: :mod:`pipeline.object_store`'s ``op`` (``get``, ``head`` or ``tail``) for ``fs``'s protocol
    and what it takes (``url`` or ``path``); ``(None, path)`` for other fsspec protocols (``gs://`` …)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    calls, takes = _NATIVE.get(protocol, ({}, "path"))
    call = calls.get(op)
    return call, (url if call is not None and takes == "url" else path)


def _on_their_loops(jobs: list, run_one, max_in_flight: int) -> list:
    """``await run_one(job, sem)`` for every job (``job[2]`` its filesystem), on that filesystem's event loop with
    ``max_in_flight`` slots per loop (fsspec runs every async filesystem on one loop: normally one pass); results
    in job order."""
    results: list = [None] * len(jobs)
    loops = {id(j[2].loop): j[2].loop for j in jobs}
    for loop in loops.values():
        mine = [k for k, j in enumerate(jobs) if j[2].loop is loop]

        async def run(mine=mine):
            sem = asyncio.Semaphore(max(1, max_in_flight))
            return await asyncio.gather(*(run_one(jobs[k], sem) for k in mine))

        for k, got in zip(mine, fsspec.asyn.sync(loop, run), strict=True):
            results[k] = got
    return results


def coalesce(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    """``(start, stop, indices of the ranges it covers)`` per request, per the rule in the module docstring."""
    order = sorted((i for i in range(len(ranges)) if ranges[i][0] < ranges[i][1]), key=lambda i: ranges[i])
    runs: list[list] = []  # ranges that overlap or touch: one request, no byte fetched and dropped
    for i in order:
        a, b = ranges[i]
        if runs and a <= runs[-1][1] and max(b, runs[-1][1]) - runs[-1][0] <= COALESCE_MAX:
            runs[-1][1] = max(b, runs[-1][1])
            runs[-1][2].append(i)
        else:
            runs.append([a, b, [i]])
    budget = COALESCE_WASTE * sum(e - s for s, e, _ in runs)  # gap bytes this object's requests may carry
    joined = [False] * max(0, len(runs) - 1)  # joined[j]: runs j and j + 1 are one request
    gaps = sorted((runs[j + 1][0] - runs[j][1], j) for j in range(len(runs) - 1))
    for gap, j in gaps:
        if gap > min(COALESCE_GAP, budget):
            break
        lo, hi = j, j + 1
        while lo > 0 and joined[lo - 1]:
            lo -= 1
        while hi < len(joined) and joined[hi]:
            hi += 1
        if runs[hi][1] - runs[lo][0] <= COALESCE_MAX:
            joined[j], budget = True, budget - gap
    groups: list[tuple[int, int, list[int]]] = []
    for j, (a, b, idx) in enumerate(runs):
        if j and joined[j - 1]:
            s0, _, prev = groups[-1]
            groups[-1] = (s0, b, prev + idx)
        else:
            groups.append((a, b, list(idx)))
    return groups


def _count(counters: dict | None, **kw: int) -> None:
    if counters is not None:
        for k, v in kw.items():
            counters[k] = counters.get(k, 0) + v


def _check(url: str, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out = [(int(a), int(b)) for a, b in ranges]
    bad = [r for r in out if not 0 <= r[0] <= r[1]]
    if bad:
        raise RangeError(f"{url}: byte ranges must satisfy 0 <= start <= stop, got {bad[:5]}")
    return out


def _read_local(url: str, groups, counters: dict | None) -> list[bytes]:
    path = url.removeprefix("file://")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise RangeError(f"{url}: cannot open: {type(exc).__name__}: {exc}") from exc
    try:
        size = os.fstat(fd).st_size
        out = []
        for start, stop, _ in groups:
            if stop > size:
                raise RangeError(f"{url}: bytes [{start}, {stop}) run past the end of the file ({size} bytes)")
            out.append(os.pread(fd, stop - start, start))
            _count(counters, requests=1, bytes=stop - start)
        return out
    finally:
        os.close(fd)


async def _retrying(what: str, call, retries: int, backoff_s: float, counters: dict | None):
    """``await call()`` with the retry rule of the module docstring; errors name ``what``."""
    for attempt in range(retries + 1):
        _count(counters, requests=1)
        try:
            return await call()
        except Exception as exc:
            if isinstance(exc, ShardError):
                raise
            if not is_transient(exc):
                raise RangeError(f"{what} unreadable: {type(exc).__name__}: {exc}") from exc
            if attempt == retries:
                raise ShardError(f"{what} failed after {retries} retries: {type(exc).__name__}: {exc}") from exc
        _count(counters, retries=1)
        await asyncio.sleep(backoff_delay(backoff_s, attempt))
    raise AssertionError("unreachable")


def object_size(
    url: str, storage_options: dict | None = None, *, retries: int = 4, backoff_s: float = 0.2, counters=None
) -> int:
    """The size in bytes of a local file or remote object (one ``HEAD``), with the retries of :func:`fetch_ranges`.

    Raises:
        ShardError: naming ``url`` when it is missing, denied, or stays unreachable.
    """
    if not is_remote(url):
        try:
            return os.path.getsize(url.removeprefix("file://"))
        except OSError as exc:
            raise RangeError(f"{url}: size unreadable: {type(exc).__name__}: {exc}") from exc
    fs, path = filesystem(url, storage_options)
    head, target = _native(fs, url, path, "head")
    if head is None:

        async def head(fs, path):
            return int(await asyncio.to_thread(fs.size, path))

    call = functools.partial(head, fs, target)
    return fsspec.asyn.sync(fs.loop, _retrying, f"{url}: size", call, retries, backoff_s, counters)


async def _fetch_one(get, fs, url: str, start: int, stop: int, sem, retries, backoff_s, counters) -> bytes:
    """Bytes ``[start, stop)`` with retries; only failures that made no progress use up ``retries``."""
    buf = bytearray()
    attempt = 0
    while True:
        before = len(buf)
        async with sem, _loop_cap():
            _count(counters, requests=1)
            try:
                await get(fs, url, start, stop, buf, counters)
                if len(buf) < stop - start:
                    raise CutShort(f"{url}: response ended after {len(buf)} of {stop - start} bytes")
                _count(counters, bytes=len(buf) - before)
                return bytes(buf)
            except Exception as exc:
                _count(counters, bytes=len(buf) - before)
                if not is_transient(exc):
                    if isinstance(exc, RangeError):
                        raise
                    raise RangeError(f"{url}: bytes [{start}, {stop}) unreadable: {type(exc).__name__}: {exc}") from exc
                if attempt >= retries:
                    raise ShardError(
                        f"{url}: bytes [{start}, {stop}) failed after {retries} retries "
                        f"({len(buf)} bytes read): {type(exc).__name__}: {exc}"
                    ) from exc
        _count(counters, retries=1, resumed=int(len(buf) > 0))
        if len(buf) == before:
            attempt += 1
        await asyncio.sleep(backoff_delay(backoff_s, attempt - 1 if len(buf) == before else 0))


async def _gather(get, fs, url, groups, retries, backoff_s, max_in_flight, counters) -> list[bytes]:
    sem = asyncio.Semaphore(max(1, max_in_flight))
    return list(
        await asyncio.gather(*(_fetch_one(get, fs, url, s, e, sem, retries, backoff_s, counters) for s, e, _ in groups))
    )


def _read_generic(fs, url, groups, retries, backoff_s, max_in_flight, counters) -> list[bytes]:
    """Any other fsspec filesystem: ``cat_file`` per request from a thread pool, retried whole (no resume)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(group):
        start, stop, _ = group
        for attempt in range(retries + 1):
            _count(counters, requests=1)
            try:
                data = fs.cat_file(url, start=start, end=stop)
            except Exception as exc:
                if not is_transient(exc) or attempt == retries:
                    raise ShardError(
                        f"{url}: bytes [{start}, {stop}) unreadable after {attempt} retries: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                _count(counters, retries=1)
                time.sleep(backoff_delay(backoff_s, attempt))
                continue
            _count(counters, bytes=len(data))
            if len(data) != stop - start:
                raise RangeError(f"{url}: bytes [{start}, {stop}) run past the end of the object")
            return data
        raise AssertionError("unreachable")

    with ThreadPoolExecutor(max(1, max_in_flight)) as pool:
        return list(pool.map(one, groups))


def _fetch_groups(url, groups, storage_options, retries, backoff_s, max_in_flight, counters) -> list[bytes]:
    """The bytes of each ``(start, stop, _)`` request, as they are (no coalescing)."""
    if not is_remote(url):
        return _read_local(url, groups, counters)
    fs, path = filesystem(url, storage_options)
    get, target = _native(fs, url, path, "get")
    if get is None:
        return _read_generic(fs, path, groups, retries, backoff_s, max_in_flight, counters)
    return fsspec.asyn.sync(fs.loop, _gather, get, fs, target, groups, retries, backoff_s, max_in_flight, counters)


def fetch_ranges(
    url: str,
    ranges: Sequence[tuple[int, int]],
    storage_options: dict | None = None,
    *,
    retries: int = 4,
    backoff_s: float = 0.2,
    max_in_flight: int = 8,
    counters: dict | None = None,
) -> list[bytes]:
    """Bytes ``[start, stop)`` of ``url`` for each of ``ranges``, in the order given (see the module docstring).

    Raises:
        ShardError: naming ``url`` and the byte range, when a range stays unreadable after ``retries``
            retries, runs past the end of the object, or the object is missing or denied
            (:class:`RangeError` for the last three).
    """
    return fetch_many(
        [(url, ranges)], storage_options, retries=retries, backoff_s=backoff_s, max_in_flight=max_in_flight,
        counters=counters,
    )[0]  # fmt: skip


def fetch_many(
    requests: Sequence[tuple[str, Sequence[tuple[int, int]]]],
    storage_options: dict | None = None,
    *,
    retries: int = 4,
    backoff_s: float = 0.2,
    max_in_flight: int = 8,
    counters: dict | None = None,
) -> list[list[bytes]]:
    """:func:`fetch_ranges` for several objects at once: ``[(url, ranges), ...]`` → ``[[bytes, ...], ...]``.

    The requests of every object share the ``max_in_flight`` slots, so a step reading a few members
    from each of several shards waits for about one round trip, not one per shard.
    """
    plans = []
    for url, ranges in requests:
        checked = _check(url, ranges)
        plans.append((url, checked, coalesce(checked)))
    blobs: list = [[] for _ in plans]
    jobs = []  # (plan number, get, fs, target, groups) for the event loop
    for i, (url, _, groups) in enumerate(plans):
        if not groups:
            continue
        if not is_remote(url):
            blobs[i] = _read_local(url, groups, counters)
            continue
        fs, path = filesystem(url, storage_options)
        get, target = _native(fs, url, path, "get")
        if get is None:
            blobs[i] = _read_generic(fs, path, groups, retries, backoff_s, max_in_flight, counters)
            continue
        jobs.append((i, get, fs, target, groups))

    async def requests_of(job, sem):  # one object's coalesced requests, sharing the loop's slots
        _, get, fs, target, groups = job
        return list(
            await asyncio.gather(
                *(_fetch_one(get, fs, target, a, b, sem, retries, backoff_s, counters) for a, b, _ in groups)
            )
        )

    for job, got in zip(jobs, _on_their_loops(jobs, requests_of, max_in_flight), strict=True):
        blobs[job[0]] = got
    out = []
    for (_, ranges, groups), got in zip(plans, blobs, strict=True):
        sliced = [b""] * len(ranges)
        for (start, _, idx), blob in zip(groups, got, strict=True):
            for k in idx:
                a, b = ranges[k]
                sliced[k] = blob[a - start : b - start]
        out.append(sliced)
    return out


def fetch_tails(
    requests: Sequence[tuple[str, int]],
    storage_options: dict | None = None,
    *,
    retries: int = 4,
    backoff_s: float = 0.2,
    max_in_flight: int = MAX_IN_FLIGHT,
    counters: dict | None = None,
) -> list[bytes]:
    """The last ``n`` bytes of each object of ``[(url, n), ...]``: one suffix-range request each, all in flight
    together (no ``HEAD`` first), retried whole. An object shorter than ``n`` gives all its bytes.

    For what sits at an object's end, such as the chunk index of a Zarr shard object (:mod:`pipeline.zarr_chunks`).

    Raises:
        ShardError: naming the URL, when an object is missing, denied, or stays unreadable after ``retries``.
    """
    out: list = [None] * len(requests)
    jobs = []  # (position, tail, fs, target, n)
    for i, (url, n) in enumerate(requests):
        if n <= 0:
            raise RangeError(f"{url}: a tail of {n} bytes was asked for")
        if not is_remote(url):
            path = url.removeprefix("file://")
            try:
                with open(path, "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - n))
                    out[i] = f.read()
            except OSError as exc:
                raise RangeError(f"{url}: cannot read its last {n} bytes: {type(exc).__name__}: {exc}") from exc
            _count(counters, requests=1, bytes=len(out[i]))
            continue
        fs, path = filesystem(url, storage_options)
        tail, target = _native(fs, url, path, "tail")
        if tail is None:

            async def tail(fs, p, n):
                return await asyncio.to_thread(fs.cat_file, p, start=-n)

        jobs.append((i, tail, fs, target, n))

    async def one(job, sem):
        _, tail, fs, target, n = job

        async def call():
            async with sem, _loop_cap():
                return await tail(fs, target, n)

        data = await _retrying(f"{target}: last {n} bytes", call, retries, backoff_s, counters)
        _count(counters, bytes=len(data))
        return data

    for job, data in zip(jobs, _on_their_loops(jobs, one, max_in_flight), strict=True):
        out[job[0]] = data
    return out


_POOLS: dict[int, ThreadPoolExecutor] = {}


def submit(fn, /, *args, **kwargs) -> Future:
    """``fn(*args, **kwargs)`` started now on a per-process pool of :data:`SUBMIT_THREADS` threads: its ``Future``.

    The pool is made in the process that first calls (a DataLoader worker gets its own after the fork).
    """
    pool = _POOLS.get(os.getpid())
    if pool is None:
        pool = _POOLS[os.getpid()] = ThreadPoolExecutor(SUBMIT_THREADS, thread_name_prefix="flexast-submit")
    return pool.submit(fn, *args, **kwargs)


def submit_many(
    requests: Sequence[tuple[str, Sequence[tuple[int, int]]]],
    storage_options: dict | None = None,
    **kwargs,
) -> Future:
    """:func:`fetch_many` started now, without waiting: a ``Future`` of its result (errors raised by ``result()``).

    For reading ahead: submit the next step's ranges, decode this step, then take the next result.
    Keyword arguments are :func:`fetch_many`'s. Runs on :func:`submit`'s pool.
    """
    return submit(fetch_many, requests, storage_options, **kwargs)


def fetch_object(
    url: str,
    storage_options: dict | None = None,
    *,
    block: int = 8 << 20,
    retries: int = 4,
    backoff_s: float = 0.2,
    max_in_flight: int = 8,
    counters: dict | None = None,
) -> bytes:
    """A whole object: its size (one ``HEAD``), then ``block``-byte requests (not coalesced), ``max_in_flight`` at
    a time.

    The same retries, resume and counters as :func:`fetch_ranges`. A server that ignores ``Range`` is
    noticed on the first block and asked once for the whole object instead.
    """
    size = object_size(url, storage_options, retries=retries, backoff_s=backoff_s, counters=counters)
    if size == 0:
        return b""
    first: dict = {}
    (head,) = _fetch_groups(url, [(0, min(block, size), [0])], storage_options, retries, backoff_s, 1, first)
    rest = [(a, min(a + block, size), [0]) for a in range(len(head), size, block)]
    if first.get("unranged") and rest:
        rest = [(len(head), size, [0])]  # one more plain GET, read to the end (the blocks would each start at 0)
    for k, v in first.items():
        _count(counters, **{k: v})
    return head + b"".join(_fetch_groups(url, rest, storage_options, retries, backoff_s, max_in_flight, counters))
