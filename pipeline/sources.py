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

import contextlib
import glob
import io
import json
import logging
import mmap
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np

from flexast.pipeline.errors import ShardError
from flexast.pipeline.transport import REMOTE_PREFIXES, backoff_delay, fetch_ranges, is_remote, is_transient

__all__ = ["REMOTE_PREFIXES", "ShardInfo", "expand_urls", "fetch_ranges", "is_remote", "is_transient", "read_shard"]

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


class TarFormatError(ShardError):
    """A tar whose header is corrupt (bad checksum or number): never retried."""


class TruncatedShard(TarFormatError):
    """A tar that ends early: retried for remote shards (the connection may have ended), not for local files."""


def _octal(field: bytes, url: str) -> int:
    text = field.rstrip(b"\0 ").strip()
    if field[:1] == b"\x80":  # GNU base-256 size
        return int.from_bytes(field[1:], "big")
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise TarFormatError(f"shard {url}: bad tar header number {field!r}") from exc


def _read_exact(f, n: int, url: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TruncatedShard(f"shard {url}: truncated in {what} ({len(data)} of {n} bytes)")
    return data


def _skip(f, n: int, url: str, seekable: bool) -> None:
    if seekable:
        f.seek(n, io.SEEK_CUR)
        return
    while n > 0:
        n -= len(_read_exact(f, min(n, 1 << 20), url, "member data"))


def _tar_members(f, url: str, wanted, seekable: bool) -> Iterator[tuple[str, bytes | None]]:
    """``(name, data)`` for each regular member of a ustar/pax/GNU tar; ``data`` is None when ``wanted(name)`` is false.

    A small reader instead of :mod:`tarfile`: header parsing dominated the stream's cost there, and
    unwanted members are skipped (seeked over where the file allows) without being read.
    """
    long_name = None
    while True:
        header = f.read(512)
        if not header or header == b"\0" * 512:
            return  # end of archive (a stream cut exactly here is caught by the completeness checks)
        if len(header) != 512:
            raise TruncatedShard(f"shard {url}: truncated tar header ({len(header)} bytes)")
        chksum = _octal(header[148:156], url)
        if chksum != int(np.frombuffer(header, np.uint8).sum()) - sum(header[148:156]) + 8 * 32:
            raise TarFormatError(f"shard {url}: tar header checksum mismatch (corrupt shard)")
        size = _octal(header[124:136], url)
        kind = header[156:157]
        padded = -(-size // 512) * 512
        if kind in (b"x", b"L"):  # pax extended header or GNU long name for the next member
            body = _read_exact(f, padded, url, "extended header")[:size]
            if kind == b"L":
                long_name = body.rstrip(b"\0").decode()
            else:
                for record in body.decode().splitlines():
                    _, _, kv = record.partition(" ")
                    if kv.startswith("path="):
                        long_name = kv[len("path=") :]
            continue
        name = long_name or (
            header[345:500].rstrip(b"\0") + b"/" if header[257:262] == b"ustar" and header[345] else b""
        )
        if not long_name:
            name = (name + header[:100].rstrip(b"\0")).decode()
        long_name = None
        if kind not in (b"0", b"\0"):
            _skip(f, padded, url, seekable)
            continue
        if wanted(name):
            data = _read_exact(f, size, url, f"member {name}")
            _skip(f, padded - size, url, seekable)
            yield name, data
        else:
            _skip(f, padded, url, seekable)
            yield name, None


def _tar_samples(fileobj, url: str, want=None, seekable: bool = False) -> Iterator[dict]:
    """Group a tar's members by key (the name up to its first dot) into samples.

    ``want(key, meta)`` returns ``(shift names whose .npy bytes to keep, note)``; members of other
    shifts are skipped unread and ``note`` (anything the caller wants to carry) is stored as
    ``sample["note"]``. Without ``want`` every member is kept. It is asked once the sample's json is
    known (json comes first).
    """
    current: dict | None = None
    keep: set | None = None

    def wanted(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        if keep is None or not base.endswith(".npy") or current is None or current["key"] != base.split(".", 1)[0]:
            return True
        return base.split(".", 1)[1][: -len(".npy")] in keep

    for name, data in _tar_members(fileobj, url, wanted, seekable):
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            raise ShardError(f"shard {url}: member {name!r} has no extension")
        key, ext = base.split(".", 1)
        if current is None or current["key"] != key:
            if current is not None:
                yield current
            current = {"key": key, "url": url, "meta": None, "npy": {}, "extra": {}, "skipped": set()}
            keep = None
        if ext.endswith(".npy"):
            if data is None:
                current["skipped"].add(ext[: -len(".npy")])
            else:
                current["npy"][ext[: -len(".npy")]] = data
        elif ext == "json":
            try:
                current["meta"] = json.loads(data)
            except ValueError as exc:
                raise ShardError(f"shard {url}: sample {key!r} has unreadable json: {exc}") from exc
            if want is not None:
                keep, current["note"] = want(key, current["meta"])
        else:
            current["extra"][ext] = data
    if current is not None:
        yield current


class _RawAdapter(io.RawIOBase):
    """A raw stream over a file object that only has ``read(n)``, so ``io.BufferedReader`` can batch small reads."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.f.read(len(buf))
        buf[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def _open_shard(url: str, storage_options: dict | None):
    """``(reader, seekable)``: a local shard is memory-mapped (skipping a member costs no system call);
    a remote one is read through a 4 MiB buffer (one request per buffer, not per tar block)."""
    if not is_remote(url):
        with open(url.removeprefix("file://"), "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise TruncatedShard(f"shard {url}: empty file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                yield m, True
        return
    with open_url(url, storage_options) as raw:
        yield io.BufferedReader(_RawAdapter(raw), 4 << 20), False


def _check_complete(sample: dict) -> None:
    """A sample needs its json and one ``.npy`` per shift its json lists (a cut at a member boundary)."""
    meta = sample["meta"]
    have = set(sample["npy"]) | sample["skipped"]
    missing = ["json"] if meta is None else sorted(set(meta.get("frames", {})) - have)
    if missing:
        raise TruncatedShard(f"shard {sample['url']}: sample {sample['key']!r} lacks {missing} (truncated shard?)")


def read_shard(
    shard: ShardInfo,
    storage_options: dict | None = None,
    retries: int = 4,
    backoff_s: float = 0.2,
    want=None,
) -> Iterator[dict]:
    """Yield the samples of one shard exactly once, reopening it after transient failures.

    ``want(key, meta) -> (shifts, note)`` names the shifts whose features to keep (see :func:`_tar_samples`).

    Raises:
        ShardError: naming the shard, when retries are exhausted, the tar is corrupt or truncated,
            or it holds fewer samples than the index says.
    """
    done = 0
    attempt = 0
    while True:
        try:
            with _open_shard(shard.url, storage_options) as (f, seekable):
                n = 0
                for n, sample in enumerate(_tar_samples(f, shard.url, want, seekable), start=1):
                    _check_complete(sample)
                    if n > done:
                        done += 1
                        yield sample
                if shard.samples is not None and n != shard.samples:
                    raise TruncatedShard(f"shard {shard.url}: {n} samples read but the index lists {shard.samples}")
            break
        except TruncatedShard as exc:
            if not is_remote(shard.url) or attempt >= retries:
                raise ShardError(f"{exc} (after {attempt} retries)") from exc
            log.warning("shard %s: %s; retry %d/%d", shard.url, exc, attempt + 1, retries)
            time.sleep(backoff_delay(backoff_s, attempt))
            attempt += 1
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
            time.sleep(backoff_delay(backoff_s, attempt))
            attempt += 1
