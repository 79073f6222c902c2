"""Where shards come from: URL expansion, an ``index.json``, and reading one shard with retries.

A source spec is a local path or glob, a brace pattern (``train-{000000..000099}.tar``, ``{a,b}``),
an ``http(s)://``, ``s3://`` or ``gs://`` URL (opened through fsspec; no ``pipe:`` commands), a
list of those, or a built ``index.json`` (or the folder holding it), which also gives the sample
count of every shard. Reading a shard streams its tar members and groups them into samples
``{"key", "url", "meta": <key>.json, "npy": {shift_name: bytes}, "extra": {ext: bytes}}``; the
``.npy`` bytes are decoded later, only for the one frame shift a clip uses.

Transient failures (dropped connections, timeouts, HTTP 5xx/429) reopen the shard with exponential
backoff and skip the samples already yielded, so each sample is yielded exactly once. When the
retries are spent, or the shard is corrupt, a :class:`~pipeline.errors.ShardError` names the shard.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec

from pipeline.errors import ShardError

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "gcs://")


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its URL and, when an index lists it, its sample count."""

    url: str
    samples: int | None = None


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..012}`` numeric ranges (zero padding kept from the start) and ``{a,b}`` lists."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def open_url(url: str, storage_options: dict | None = None):
    """A binary file object for ``url``: local ``open``, or fsspec (HTTP streams, without range requests)."""
    if not is_remote(url):
        return open(url.removeprefix("file://"), "rb")
    opts = dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(url, **opts)
    kwargs = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    return fs.open(path, "rb", **kwargs)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying can help: connection drops, timeouts, HTTP 5xx and 429; not missing files or bad data."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | tarfile.TarError | ShardError):
        return False
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:  # pragma: no cover - aiohttp comes with s3fs
        pass
    return isinstance(exc, ConnectionError | TimeoutError | OSError | EOFError)


def with_retries(fn, what: str, retries: int = 4, backoff_s: float = 0.2):
    """Call ``fn()``, retrying transient errors with exponential backoff; the final error names ``what``."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == retries:
                raise ShardError(f"{what}: failed after {retries} retries: {type(exc).__name__}: {exc}") from exc
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def read_index(path: str, storage_options: dict | None = None) -> tuple[dict, list[ShardInfo]]:
    """Load a built ``index.json`` (or the folder that holds it); shard URLs are resolved next to it."""
    url = path if path.endswith(".json") else path.rstrip("/") + "/index.json"

    def load():
        with open_url(url, storage_options) as f:
            return json.loads(f.read())

    index = with_retries(load, f"index {url}")
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    shards = [ShardInfo(f"{base}/{s['name']}", int(s["samples"])) for s in index.get("shards", [])]
    if not shards:
        raise ShardError(f"index {url} lists no shards")
    return index, shards


def expand_urls(spec: str | Sequence[str], storage_options: dict | None = None) -> tuple[dict | None, list[ShardInfo]]:
    """Turn a source spec into ``(index or None, shards)``, in a fixed order (see the module docstring)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if len(specs) == 1:
        s = specs[0]
        if s.endswith("index.json") or (not is_remote(s) and os.path.isdir(s)):
            return read_index(s, storage_options)
    shards = []
    for s in specs:
        for url in expand_braces(s):
            if is_remote(url):
                shards.append(ShardInfo(url))
                continue
            matches = sorted(glob.glob(url)) if glob.has_magic(url) else [url]
            if not matches:
                raise ShardError(f"no shard matches {url!r}")
            shards.extend(ShardInfo(m) for m in matches)
    if not shards:
        raise ShardError(f"source spec {spec!r} names no shards")
    return None, shards


def _tar_samples(fileobj, url: str) -> Iterator[dict]:
    """Group a tar stream's members by key (the name up to its first dot) into samples."""
    current: dict | None = None
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            if "." not in base:
                raise ShardError(f"shard {url}: member {member.name!r} has no extension")
            key, ext = base.split(".", 1)
            data = tar.extractfile(member).read()
            if current is None or current["key"] != key:
                if current is not None:
                    yield current
                current = {"key": key, "url": url, "meta": None, "npy": {}, "extra": {}}
            if ext == "json":
                try:
                    current["meta"] = json.loads(data)
                except ValueError as exc:
                    raise ShardError(f"shard {url}: sample {key!r} has unreadable json: {exc}") from exc
            elif ext.endswith(".npy"):
                current["npy"][ext[: -len(".npy")]] = data
            else:
                current["extra"][ext] = data
    if current is not None:
        yield current


def _check_complete(sample: dict) -> None:
    """A sample needs its json and one ``.npy`` per shift its json lists; tarfile ends silently at a cut header."""
    meta = sample["meta"]
    missing = ["json"] if meta is None else sorted(set(meta.get("frames", {})) - set(sample["npy"]))
    if missing:
        raise ShardError(f"shard {sample['url']}: sample {sample['key']!r} lacks {missing} (truncated shard?)")


def read_shard(
    shard: ShardInfo,
    storage_options: dict | None = None,
    retries: int = 4,
    backoff_s: float = 0.2,
) -> Iterator[dict]:
    """Yield the samples of one shard exactly once, reopening it after transient failures.

    Raises:
        ShardError: naming the shard, when retries are exhausted, the tar is corrupt or truncated,
            or it holds fewer samples than the index says.
    """
    done = 0
    attempt = 0
    while True:
        try:
            with open_url(shard.url, storage_options) as raw:
                f = io.BufferedReader(raw, 1 << 20) if isinstance(raw, io.RawIOBase) else raw
                for i, sample in enumerate(_tar_samples(f, shard.url)):
                    _check_complete(sample)
                    if i >= done:
                        done += 1
                        yield sample
            break
        except ShardError:
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise ShardError(
                    f"shard {shard.url}: unreadable after {done} samples: {type(exc).__name__}: {exc}"
                ) from exc
            if attempt >= retries:
                raise ShardError(
                    f"shard {shard.url}: failed after {retries} retries ({done} samples read): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            log.warning("shard %s: %s; retry %d/%d", shard.url, exc, attempt + 1, retries)
            time.sleep(backoff_s * 2**attempt)
            attempt += 1
    if shard.samples is not None and done != shard.samples:
        raise ShardError(f"shard {shard.url}: {done} samples read but the index lists {shard.samples} (truncated?)")
