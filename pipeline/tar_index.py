"""The layout of a tar shard: its members' byte offsets, the member index written beside it, and checksums.

Notation: ``N`` samples of a shard; offsets and sizes in bytes.

A WebDataset tar is a sequence of 512-byte headers each followed by a member's data padded to 512
bytes. :func:`scan_tar` lists every regular member as ``(name, data offset, size)``. At build time
:class:`pipeline.shards.TarShardWriter` writes the same list, with each member's CRC-32 and each
sample's json record, as ``<shard>.members.json`` (``docs/shard-format.md``): a reader then knows
every clip's frames, labels and the byte range of each shift's ``.npy`` without reading the tar, and
``pipeline verify`` checks every member's bytes against its checksum.

This module holds the one tar parser of the package.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from collections.abc import Iterator

import fsspec
import numpy as np

from flexast.pipeline.errors import ShardError

MEMBERS_SUFFIX = ".members.json"  # the member index beside a tar shard: train-000000.tar.members.json
MEMBERS_VERSION = 1


def _octal(field: bytes, url: str) -> int:
    if field[:1] == b"\x80":  # GNU base-256 size
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise ShardError(f"shard {url}: bad tar header number {field!r} (corrupt shard)") from exc


def scan_tar(buf, url: str) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular member of a tar held in ``buf`` (bytes or mmap).

    Raises:
        ShardError: naming the shard, for a bad header checksum or a tar cut before its end.
    """
    out, pos, long_name, n = [], 0, None, len(buf)
    while True:
        if pos + 512 > n:
            raise ShardError(f"shard {url}: truncated tar (ends at byte {n} without an end-of-archive block)")
        header = bytes(buf[pos : pos + 512])
        if header == b"\0" * 512:
            return out
        chksum = _octal(header[148:156], url)
        if chksum != sum(header) - sum(header[148:156]) + 8 * 32:
            raise ShardError(f"shard {url}: tar header checksum mismatch at byte {pos} (corrupt shard)")
        size = _octal(header[124:136], url)
        kind = header[156:157]
        data = pos + 512
        if data + size > n:
            raise ShardError(f"shard {url}: truncated tar (member at byte {pos} needs {size} bytes, file ends)")
        if kind in (b"x", b"L"):
            body = bytes(buf[data : data + size])
            if kind == b"L":
                long_name = body.rstrip(b"\0").decode()
            else:
                for record in body.decode().splitlines():
                    _, _, kv = record.partition(" ")
                    if kv.startswith("path="):
                        long_name = kv[len("path=") :]
        elif kind in (b"0", b"\0"):
            if long_name:
                name = long_name
            else:
                prefix = header[345:500].rstrip(b"\0") if header[257:262] == b"ustar" else b""
                name = ((prefix + b"/") if prefix else b"") + header[:100].rstrip(b"\0")
                name = name.decode()
            out.append((name, data, size))
            long_name = None
        else:
            long_name = None
        pos = data + -(-size // 512) * 512


def records_from_members(members: list[tuple[str, int, int]], read, url: str) -> list[dict]:
    """Group tar members by key into records; ``read(offset, size)`` gives a json member's bytes."""
    recs: list[dict] = []
    for name, offset, size in members:
        base = name.rsplit("/", 1)[-1]
        key, _, ext = base.partition(".")
        if not ext:
            raise ShardError(f"shard {url}: member {name!r} has no extension")
        if not recs or recs[-1]["key"] != key:
            recs.append({"key": key, "url": url, "meta": None, "loc": {}})
        rec = recs[-1]
        if ext == "json":
            try:
                rec["meta"] = json.loads(read(offset, size))
            except ValueError as exc:
                raise ShardError(f"shard {url}: sample {key!r} has unreadable json: {exc}") from exc
        elif ext.endswith(".npy"):
            rec["loc"][ext[: -len(".npy")]] = (offset, size)
    for rec in recs:
        check_record(rec)
    return recs


def check_record(rec: dict) -> None:
    """A sample needs its json and one ``.npy`` member per shift its json lists (else the shard was cut)."""
    meta = rec["meta"]
    missing = ["json"] if meta is None else sorted(set(meta.get("frames", {})) - set(rec["loc"]))
    if missing:
        raise ShardError(f"shard {rec['url']}: sample {rec['key']!r} lacks {missing} (truncated shard?)")


class MemberIndex:
    """The ``<shard>.members.json`` document, built member by member as a tar is written.

    ``{"version": 1, "bytes": <tar size>, "samples": [{"key", "meta": <the json member>,
    "members": {ext: [offset, size, crc32]}}]}``
    """

    def __init__(self) -> None:
        self.samples: list[dict] = []

    def add(self, name: str, offset: int, size: int, crc: int, data: bytes | None = None) -> None:
        """One member: its name, data offset and size in the tar, its CRC-32, and its bytes if it is json."""
        key, _, ext = name.rsplit("/", 1)[-1].partition(".")
        if not self.samples or self.samples[-1]["key"] != key:
            self.samples.append({"key": key, "members": {}})
        self.samples[-1]["members"][ext] = [offset, size, crc]
        if ext == "json" and data is not None:
            self.samples[-1]["meta"] = json.loads(data)

    def to_bytes(self, tar_bytes: int) -> bytes:
        doc = {"version": MEMBERS_VERSION, "bytes": int(tar_bytes), "samples": self.samples}
        return json.dumps(doc, separators=(",", ":")).encode()


def member_index(members: list[tuple[str, int, int]], buf) -> MemberIndex:
    """The member index of a tar held in ``buf``, from its :func:`scan_tar` listing."""
    out = MemberIndex()
    for name, offset, size in members:
        data = bytes(buf[offset : offset + size])
        out.add(name, offset, size, zlib.crc32(data), data)
    return out


def check_checksums(doc: dict, buf, url: str) -> list[str]:
    """Problems (one line each, naming shard, sample and member) where ``buf``'s bytes differ from the index."""
    problems = []
    for s in doc.get("samples", []):
        for ext, (offset, size, crc) in s["members"].items():
            data = buf[offset : offset + size]
            if len(data) != size:
                problems.append(f"{url}: {s['key']}.{ext} is cut ({len(data)} of {size} bytes)")
            elif zlib.crc32(data) != crc:
                problems.append(f"{url}: {s['key']}.{ext} fails its checksum (bytes changed since the build)")
    return problems


def verify_members(url: str, storage_options: dict | None = None) -> list[str]:
    """``pipeline verify``'s checksum check of one tar shard: a problem line per member whose bytes changed,
    or that its member index places outside the tar. Shards without a member index have nothing to check."""
    try:
        doc = read_member_index(url, storage_options)
        if doc is None:
            return []
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        buf = fs.cat_file(path)
    except FileNotFoundError:
        return []  # a missing shard is reported by the shard check itself
    except (OSError, ValueError) as exc:
        return [f"{url}{MEMBERS_SUFFIX}: unreadable member index ({exc})"]
    if doc.get("bytes") is not None and int(doc["bytes"]) != len(buf):
        return [f"{url}: {len(buf)} bytes but its member index describes {doc['bytes']}: rebuild the shards"]
    return check_checksums(doc, buf, url)


def read_member_index(url: str, storage_options: dict | None = None) -> dict | None:
    """The parsed ``<url>.members.json``, or None when the shard has none (built before member indexes)."""
    fs, path = fsspec.core.url_to_fs(url + MEMBERS_SUFFIX, **(storage_options or {}))
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def iter_tar(url: str, storage_options: dict | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a whole tar shard as ``(key, {extension: bytes})``, grouped by key in file order.

    Raises:
        ShardError: the shard is missing, truncated or not a tar; the message names it.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    try:
        buf = fs.cat_file(path)
    except FileNotFoundError as exc:
        raise ShardError(f"{url}: shard missing") from exc
    key, members = None, {}
    for name, offset, size in scan_tar(buf, url):
        k, _, ext = name.rsplit("/", 1)[-1].partition(".")
        if k != key and key is not None:
            yield key, members
            members = {}
        key = k
        members[ext] = buf[offset : offset + size]
    if key is not None:
        yield key, members


def records_from_member_index(doc: dict, url: str, tar_bytes: int | None = None) -> list[dict]:
    """Records (see :mod:`pipeline.datasource`) from a member index; ``tar_bytes``, when known, must match it.

    Raises:
        ShardError: naming the index, when its version is unknown or it describes another tar.
    """
    if doc.get("version") != MEMBERS_VERSION:
        raise ShardError(f"{url}{MEMBERS_SUFFIX}: member index version {doc.get('version')} (expected 1)")
    if tar_bytes is not None and doc.get("bytes") is not None and int(doc["bytes"]) != int(tar_bytes):
        raise ShardError(
            f"{url}{MEMBERS_SUFFIX}: describes a tar of {doc['bytes']} bytes, the shard has {tar_bytes} "
            "(an index from another build?): rebuild the shards with pipeline build-shards"
        )
    recs = []
    for s in doc["samples"]:
        loc = {ext[: -len(".npy")]: (m[0], m[1]) for ext, m in s["members"].items() if ext.endswith(".npy")}
        rec = {"key": s["key"], "url": url, "meta": s.get("meta"), "loc": loc}
        check_record(rec)
        recs.append(rec)
    return recs


_NPY_HEADER = re.compile(rb"\{'descr': '([<>|]?[a-z]\d+)', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \}")


def load_npy(data: bytes, where: str) -> np.ndarray:
    """A 2-D ``.npy`` as a read-only view of ``data``; the common header is parsed with one regex (no eval)."""
    if data[:6] == b"\x93NUMPY" and data[6] == 1:
        hlen = int.from_bytes(data[8:10], "little")
        m = _NPY_HEADER.match(data, 10, 10 + hlen)
        if m:
            rows, cols = int(m.group(2)), int(m.group(3))
            return np.frombuffer(data, np.dtype(m.group(1).decode()), rows * cols, 10 + hlen).reshape(rows, cols)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise ShardError(f"{where} has an unreadable .npy: {exc}") from exc
