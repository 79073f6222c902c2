"""Where shards come from: URL expansion and an ``index.json``; the transport's names, re-exported.

A source spec is a local path or glob, a brace pattern (``train-{000000..000099}.tar``, ``{a,b}``),
an ``http(s)://``, ``s3://`` or ``gs://`` URL (opened through fsspec; no ``pipe:`` commands), a
list of those, or a built ``index.json`` (or the folder holding it), which also gives the sample
count of every shard. Reading the shards is :mod:`pipeline.datasource`'s (records from the member
index, features by byte range); every remote byte goes through :mod:`pipeline.transport`
(requests in flight, retries with backoff, resumed ranges, counters). Small whole files (an
``index.json``) are read with :func:`with_retries`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec

from flexast.pipeline.errors import ShardError
from flexast.pipeline.retrying import backoff_delay
from flexast.pipeline.transport import (
    REMOTE_PREFIXES,
    fetch_many,
    fetch_object,
    fetch_ranges,
    is_remote,
    is_transient,
    object_size,
)

__all__ = [
    "REMOTE_PREFIXES",
    "ShardInfo",
    "expand_braces",
    "expand_urls",
    "fetch_many",
    "fetch_object",
    "fetch_ranges",
    "is_remote",
    "is_transient",
    "object_size",
    "open_url",
    "read_index",
    "with_retries",
]

log = logging.getLogger(__name__)


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


def open_url(url: str, storage_options: dict | None = None):
    """A binary file object for ``url``: local ``open``, or fsspec (HTTP streams, without range requests)."""
    if not is_remote(url):
        return open(url.removeprefix("file://"), "rb")
    opts = dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(url, **opts)
    kwargs = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    return fs.open(path, "rb", **kwargs)


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
            time.sleep(backoff_delay(backoff_s, attempt))
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
