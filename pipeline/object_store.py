"""One request to an HTTP server or to S3, on fsspec's I/O event loop; the per-process filesystems behind them.

Units: bytes, half-open ``[start, stop)``. Each ``get_*`` appends bytes ``[start + len(buf), stop)`` to
``buf`` as they arrive (so what arrived before a failure is kept), and each ``head_*`` returns an
object's size. They raise what the server said: ``FileNotFoundError``, ``PermissionError``,
:class:`RangeError` (past the end), :class:`HTTPStatus` (other statuses), or the client's own errors;
:mod:`pipeline.transport` decides what to retry.
"""

from __future__ import annotations

import os
import weakref

import fsspec

from flexast.pipeline.errors import ShardError

CHUNK = 64 << 10


_FILESYSTEMS: dict[tuple, tuple[int, object]] = {}
_INHERITED: list = []


def filesystem(url: str, storage_options: dict | None = None):
    """``(fs, path)`` for a remote URL: one fsspec filesystem (one connection pool) per process and options,
    also when the options ask fsspec to skip its own instance cache."""
    opts = dict(storage_options or {})
    key = (url.split("://", 1)[0], repr(sorted(opts.items(), key=lambda kv: kv[0])))
    pid, fs = _FILESYSTEMS.get(key, (None, None))
    if fs is None or pid != os.getpid():
        fs, _ = fsspec.core.url_to_fs(url, **opts)
        _FILESYSTEMS[key] = (os.getpid(), fs)
    return fs, fs._strip_protocol(url) if not url.startswith(("http://", "https://")) else url


def _forget_inherited_sessions() -> None:
    """In a forked child (a DataLoader worker): never close the parent's HTTP/S3 sessions from here.

    fsspec drops its cached filesystems on the child's first use, and their finalizers then try to
    close the parent's aiohttp/aiobotocore sessions on the parent's event loop, which does not run in
    the child: "attached to a different loop" tracebacks. The sockets are the parent's; leave them,
    and keep the objects alive so that aiohttp does not complain about them being collected unclosed.
    """
    for fin in list(weakref.finalize._registry):  # no public way to list finalizers
        info = fin.peek()
        func = info[1] if info else None
        if getattr(func, "__qualname__", "").endswith(("S3FileSystem.close_session", "HTTPFileSystem.close_session")):
            _INHERITED.append(fin.detach())  # kept alive: collecting them warns "Unclosed client session"
    _FILESYSTEMS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_sessions)


class RangeError(ShardError):
    """A byte range that cannot be read: past the end of the object, or its object is missing or denied."""


class HTTPStatus(Exception):
    """An HTTP status that is neither 200 nor 206 (``status`` tells whether a retry can help)."""

    def __init__(self, status: int, url: str):
        super().__init__(f"HTTP {status} for {url}")
        self.status = status


def _content_range_total(value: str | None) -> int | None:
    """The object size from a ``Content-Range: bytes a-b/total`` header (None when absent or ``*``)."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _raise_if_absent(status: int, url: str) -> None:
    """A missing or forbidden object is permanent (never retried): ``FileNotFoundError`` / ``PermissionError``."""
    if status == 404:
        raise FileNotFoundError(url)
    if status in (401, 403):
        raise PermissionError(f"HTTP {status} for {url}")


async def get_http(fs, url: str, start: int, stop: int, buf: bytearray, counters: dict | None) -> None:
    """Append bytes ``[start + len(buf), stop)`` of ``url`` to ``buf`` (bytes kept when the response breaks)."""
    kw = fs.kwargs.copy()
    headers = {**kw.pop("headers", {}), "Range": f"bytes={start + len(buf)}-{stop - 1}"}
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kw) as r:
        _raise_if_absent(r.status, url)
        if r.status == 416:
            total = _content_range_total(r.headers.get("Content-Range"))
            raise RangeError(f"{url}: bytes [{start}, {stop}) run past the end of the object ({total} bytes)")
        if r.status not in (200, 206):
            raise HTTPStatus(r.status, url)
        skip = start + len(buf) if r.status == 200 else 0  # a server that ignores Range sends the whole object
        if r.status == 200 and counters is not None:
            counters["unranged"] = counters.get("unranged", 0) + 1
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


async def _s3_get_object(fs, url: str, byte_range: str, span: str) -> dict:
    """s3fs's aiobotocore ``get_object`` of ``url`` with the ``Range`` header ``byte_range``; S3's error codes
    become ``FileNotFoundError`` / ``PermissionError`` (permanent) and ``RangeError`` (``span``, in words, runs
    past the end)."""
    import botocore.exceptions

    bucket, key, version = fs.split_path(url)
    await fs.set_session()
    s3 = await fs.get_s3(bucket)
    kw = {"VersionId": version} if version else {}
    try:
        return await s3.get_object(Bucket=bucket, Key=key, Range=byte_range, **kw)
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            raise FileNotFoundError(url) from exc
        if code in ("AccessDenied", "403"):
            raise PermissionError(f"{url}: {exc}") from exc
        if code == "InvalidRange":
            raise RangeError(f"{url}: {span} run past the end of the object") from exc
        raise


async def get_s3(fs, url: str, start: int, stop: int, buf: bytearray, counters: dict | None) -> None:
    """Like :func:`get_http` through s3fs's aiobotocore client (credentials and endpoint from the storage options)."""
    resp = await _s3_get_object(fs, url, f"bytes={start + len(buf)}-{stop - 1}", f"bytes [{start}, {stop})")
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


async def tail_http(fs, url: str, n: int) -> bytes:
    """The last ``n`` bytes of ``url`` from one suffix-range GET (``Range: bytes=-n``); all of it when shorter."""
    kw = fs.kwargs.copy()
    headers = {**kw.pop("headers", {}), "Range": f"bytes=-{n}"}
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kw) as r:
        _raise_if_absent(r.status, url)
        if r.status not in (200, 206):
            raise HTTPStatus(r.status, url)
        data = await r.read()  # a body cut short raises aiohttp's ClientPayloadError (transient: retried whole)
    return data[-n:] if r.status == 200 else data  # 200: a server that ignores Range sent the whole object


async def tail_s3(fs, path: str, n: int) -> bytes:
    """Like :func:`tail_http` through s3fs's aiobotocore client."""
    resp = await _s3_get_object(fs, path, f"bytes=-{n}", f"the last {n} bytes")
    body = resp["Body"]
    try:
        data = await body.read()
    finally:
        body.close()
    length = resp.get("ContentLength")
    if length is not None and len(data) < int(length):
        raise ConnectionError(f"{path}: response ended after {len(data)} of {length} bytes")  # transient
    return data[-n:]


async def head_http(fs, url: str) -> int:
    """The size of ``url`` from a ``HEAD`` (or, without a length there, from a one-byte ranged GET)."""
    kw = fs.kwargs.copy()
    session = await fs.set_session()
    async with session.head(fs.encode_url(url), allow_redirects=True, **kw) as r:
        _raise_if_absent(r.status, url)
        if r.status == 200 and r.content_length is not None:
            return r.content_length
        if r.status >= 500 or r.status == 429:
            raise HTTPStatus(r.status, url)
    headers = {**kw.pop("headers", {}), "Range": "bytes=0-0"}  # no HEAD or no length: ask for one byte
    async with session.get(fs.encode_url(url), headers=headers, **kw) as r:
        if r.status == 206 and _content_range_total(r.headers.get("Content-Range")) is not None:
            return _content_range_total(r.headers.get("Content-Range"))
        if r.status == 200 and r.content_length is not None:
            return r.content_length
        if r.status == 404:
            raise FileNotFoundError(url)
        raise HTTPStatus(r.status, url)


async def head_s3(fs, path: str) -> int:
    """The size of an S3 object from ``HeadObject``."""
    import botocore.exceptions

    bucket, key, version = fs.split_path(path)
    await fs.set_session()
    s3 = await fs.get_s3(bucket)
    try:
        resp = await s3.head_object(Bucket=bucket, Key=key, **({"VersionId": version} if version else {}))
    except botocore.exceptions.ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "NoSuchBucket", "404"):
            raise FileNotFoundError(path) from exc
        raise
    return int(resp["ContentLength"])
