"""Reading byte ranges of a shard, locally or from object storage, with requests in flight and retries.

Units: byte offsets into one object, half-open ``[start, stop)``.

:func:`fetch_ranges` is the one transport the loader uses for random access (tar members by index,
Zarr chunks). Over HTTP(S) and S3 it runs on fsspec's I/O event loop: up to ``max_in_flight``
requests at once, each a ``Range: bytes=start-(stop-1)`` GET read in 64 KiB chunks.

* **Coalescing.** The requested ranges are sorted and a range joins the previous request when the gap
  between them is at most :data:`COALESCE_GAP` bytes (a tar header or two) and the joined request stays
  within :data:`COALESCE_MAX` bytes. The gap bytes are fetched and dropped; nothing else is read.
* **Retries.** Connection errors (aiohttp's, botocore's ``EndpointConnectionError`` and friends,
  ``OSError``), timeouts, HTTP 5xx and 429, and S3 throttling (``SlowDown``, ``Throttling``,
  ``RequestTimeout``) are retried with exponential backoff ``backoff_s · 2^k`` (×0.5–1.5 jitter),
  ``retries`` times per request. A response cut short keeps the bytes it delivered and the retry asks
  only for the rest (*resumed*). A missing object, a denied one, or a range past its end is never retried.
* **Errors.** A request that stays unreadable raises :class:`~pipeline.errors.ShardError` naming the URL
  and the byte range; the original exception is its ``__cause__``.
* **Counters.** ``counters`` (a dict, updated in place, summed over calls) gets ``requests`` (GETs
  sent, retries included), ``retries``, ``resumed`` (retries that continued a cut-short response) and
  ``bytes`` (bytes received, gaps included).

Other fsspec protocols (``gs://`` …) read through ``fs.cat_file`` with the same retries but no resume.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Sequence

import fsspec
import fsspec.asyn

from flexast.pipeline.errors import ShardError

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "gcs://")
COALESCE_GAP = 8 << 10
"""Largest gap (bytes) between two requested ranges that are fetched in one request."""
COALESCE_MAX = 16 << 20
"""Largest coalesced request (bytes); a single range larger than this is still one request."""
CHUNK = 64 << 10
THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
     "ServiceUnavailable", "503", "500", "TooManyRequests", "RequestLimitExceeded"}
)  # fmt: skip


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


class RangeError(ShardError):
    """A byte range that cannot be read: past the end of the object, or its object is missing or denied."""


class _CutShort(Exception):
    """A response that ended before its range did (retried from the byte where it stopped)."""


class _Status(Exception):
    """An HTTP status that is neither 200 nor 206 (``status`` tells whether a retry can help)."""

    def __init__(self, status: int, url: str):
        super().__init__(f"HTTP {status} for {url}")
        self.status = status


def is_transient(exc: BaseException) -> bool:
    """Whether retrying can help: connection drops, timeouts, HTTP 5xx and 429, S3 throttling; not missing files,
    denied access, ranges past the end or bad data."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | ShardError):
        return False
    if isinstance(exc, _CutShort | asyncio.TimeoutError):
        return True
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        code = str(response["Error"].get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in THROTTLE_CODES or status >= 500 or status == 429
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    try:
        import botocore.exceptions as bce

        if isinstance(exc, bce.ConnectionError | bce.HTTPClientError | bce.IncompleteReadError):
            return True  # EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ResponseStreamingError…
    except ImportError:  # pragma: no cover - botocore comes with s3fs
        pass
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:  # pragma: no cover - aiohttp comes with fsspec[http]
        pass
    return isinstance(exc, ConnectionError | TimeoutError | OSError | EOFError)


def backoff_delay(backoff_s: float, attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): ``backoff_s · 2^attempt`` with ±50 % jitter."""
    return backoff_s * 2**attempt * (0.5 + random.random())


def coalesce(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    """``(start, stop, indices of the ranges it covers)`` per request, per the rule in the module docstring."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    groups: list[tuple[int, int, list[int]]] = []
    for i in order:
        a, b = ranges[i]
        if a == b:
            continue
        if groups:
            s, e, idx = groups[-1]
            if a - e <= COALESCE_GAP and max(b, e) - s <= COALESCE_MAX:
                groups[-1] = (s, max(b, e), [*idx, i])
                continue
        groups.append((a, b, [i]))
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


def _content_range_total(value: str | None) -> int | None:
    """The object size from a ``Content-Range: bytes a-b/total`` header (None when absent or ``*``)."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


async def _get_http(fs, url: str, start: int, stop: int, buf: bytearray) -> None:
    """Append bytes ``[start + len(buf), stop)`` of ``url`` to ``buf`` (bytes kept when the response breaks)."""
    kw = fs.kwargs.copy()
    headers = {**kw.pop("headers", {}), "Range": f"bytes={start + len(buf)}-{stop - 1}"}
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kw) as r:
        if r.status == 404:
            raise FileNotFoundError(url)
        if r.status in (401, 403):
            raise PermissionError(f"HTTP {r.status} for {url}")
        if r.status == 416:
            total = _content_range_total(r.headers.get("Content-Range"))
            raise RangeError(f"{url}: bytes [{start}, {stop}) run past the end of the object ({total} bytes)")
        if r.status not in (200, 206):
            raise _Status(r.status, url)
        skip = start + len(buf) if r.status == 200 else 0  # a server that ignores Range sends the whole object
        total = _content_range_total(r.headers.get("Content-Range")) if r.status == 206 else r.content_length
        if total is not None and total < stop:
            raise RangeError(f"{url}: bytes [{start}, {stop}) run past the end of the object ({total} bytes)")
        async for chunk in r.content.iter_chunked(CHUNK):
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            buf += chunk[: stop - start - len(buf)]
            if len(buf) >= stop - start:
                return


async def _get_s3(fs, url: str, start: int, stop: int, buf: bytearray) -> None:
    """Like :func:`_get_http` through s3fs's aiobotocore client (credentials and endpoint from the storage options)."""
    import botocore.exceptions

    bucket, key, version = fs.split_path(url)
    await fs.set_session()
    s3 = await fs.get_s3(bucket)
    kw = {"VersionId": version} if version else {}
    try:
        resp = await s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={start + len(buf)}-{stop - 1}", **kw)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise FileNotFoundError(url) from exc
        if code in ("AccessDenied", "403"):
            raise PermissionError(f"{url}: {exc}") from exc
        if code == "InvalidRange":
            raise RangeError(f"{url}: bytes [{start}, {stop}) run past the end of the object") from exc
        raise
    body = resp["Body"]
    try:
        total = _content_range_total(resp.get("ContentRange"))
        if total is not None and total < stop:
            raise RangeError(f"{url}: bytes [{start}, {stop}) run past the end of the object ({total} bytes)")
        while len(buf) < stop - start:
            chunk = await body.read(min(CHUNK, stop - start - len(buf)))
            if not chunk:
                return
            buf += chunk
    finally:
        body.close()


async def _fetch_one(get, fs, url: str, start: int, stop: int, sem, retries, backoff_s, counters) -> bytes:
    """Bytes ``[start, stop)`` with retries; only failures that made no progress use up ``retries``."""
    buf = bytearray()
    attempt = 0
    while True:
        before = len(buf)
        async with sem:
            _count(counters, requests=1)
            try:
                await get(fs, url, start, stop, buf)
                if len(buf) < stop - start:
                    raise _CutShort(f"{url}: response ended after {len(buf)} of {stop - start} bytes")
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
    ranges = _check(url, ranges)
    groups = coalesce(ranges)
    if not groups:
        return [b"" for _ in ranges]
    if not is_remote(url):
        blobs = _read_local(url, groups, counters)
    else:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        get = {"http": _get_http, "https": _get_http, "s3": _get_s3, "s3a": _get_s3}.get(protocol)
        if get is None:
            blobs = _read_generic(fs, path, groups, retries, backoff_s, max_in_flight, counters)
        else:
            target = url if get is _get_http else path
            blobs = fsspec.asyn.sync(
                fs.loop, _gather, get, fs, target, groups, retries, backoff_s, max_in_flight, counters
            )
    out = [b""] * len(ranges)
    for (start, _, idx), blob in zip(groups, blobs, strict=True):
        for i in idx:
            a, b = ranges[i]
            out[i] = blob[a - start : b - start]
    return out
