"""Shard files: deterministic WebDataset tar writer, Zarr v3 group writer, and the low-level readers.

Notation: ``N`` samples in a shard, ``T`` frames of one sample, ``ΣT`` frames of a shard at one shift,
``F`` mel bins. Layout and member names follow ``docs/shard-format.md``.

Visibility: a shard appears under its final name only when complete. Locally it is written under a
temporary name in the same folder and renamed (``os.replace`` is atomic); on an object store (any fsspec
URL) it is assembled in a local temporary file or folder and put when complete (a single PUT is atomic
on S3; for a Zarr group the group's ``zarr.json`` is put last).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib

import fsspec
import numpy as np
import soundfile as sf

from flexast.pipeline.errors import ShardError
from flexast.pipeline.manifest import is_url
from flexast.pipeline.tar_index import MEMBERS_SUFFIX, MemberIndex

ZARR_CHUNK_FRAMES = 256  # frames per Zarr chunk along time
ZARR_SHARD_FRAMES = 256 * 64  # frames per Zarr shard object (sharding codec): 16384 × F × 2 bytes


def join(base: str, *parts: str) -> str:
    """Join a local path or URL with relative parts using ``/``."""
    return "/".join([base.rstrip("/"), *parts])


def filesystem(url: str, storage_options: dict | None = None):
    """``(fs, path)`` for a local path or fsspec URL."""
    fs, _, (path,) = fsspec.get_fs_token_paths(url, storage_options=storage_options or {})
    return fs, path


def npy_header(array: np.ndarray) -> bytes:
    """The ``.npy`` header of a C-contiguous array (format 1.0; deterministic: no timestamps)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(array))
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` file bytes of an array."""
    array = np.ascontiguousarray(array)
    return npy_header(array) + array.tobytes()


def flac_bytes(waveform: np.ndarray, sample_rate: int) -> bytes:
    """Mono 16-bit FLAC bytes of a ``(S,)`` float waveform (values outside [-1, 1] clip)."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(waveform, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def tar_header(name: str, size: int) -> bytes:
    """GNU tar header of a regular file with normalised fields (mode 0o644, uid/gid 0, mtime 0, no owner names).

    Built directly (much faster than :meth:`tarfile.TarInfo.tobuf`, and the same bytes as Python 3.11's);
    names over 100 bytes fall back to tarfile, which writes a GNU long-name record first.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8**11:
        return _tarinfo(name, size).tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    block = bytearray(tarfile.BLOCKSIZE)
    block[0 : len(raw)] = raw
    block[100:148] = b"0000644\x000000000\x000000000\x00%011o\x0000000000000\x00" % size  # mode uid gid size mtime
    block[148:156] = b"        "  # checksum placeholder: counts as spaces
    block[156:157] = tarfile.REGTYPE
    block[257:265] = tarfile.GNU_MAGIC
    block[148:155] = b"%06o\x00" % sum(block)
    return bytes(block)


class TarShardWriter:
    """Write one WebDataset tar shard; it becomes visible under ``url`` only on :meth:`close`.

    Beside it goes its member index ``<url>.members.json`` (:class:`pipeline.tar_index.MemberIndex`:
    every member's byte range and CRC-32, every sample's json), which lets readers fetch only the members
    a step uses and ``pipeline verify`` check every member's bytes.

    Use as a context manager: leaving the block normally publishes the shard, an exception discards it.
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url
        self.storage_options = storage_options or {}
        self.remote = is_url(url)
        if self.remote:
            fd, self.tmp = tempfile.mkstemp(suffix=".tar", prefix="flexast-")
            os.close(fd)
        else:
            folder, name = os.path.split(os.path.abspath(url))
            os.makedirs(folder, exist_ok=True)
            self.tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 (closed in close/abort)
        self._offset = 0
        self.n_samples = 0
        self.members = MemberIndex()

    def _write(self, data) -> None:
        self._file.write(data)
        self._offset += len(data) if isinstance(data, bytes) else memoryview(data).nbytes

    def add(self, key: str, members: list[tuple[str, bytes | np.ndarray]]) -> None:
        """Add one sample: ``(extension, data)`` pairs written as ``<key>.<extension>`` in order.

        ``data`` is bytes, or an array written as a ``.npy`` file straight from its buffer (no copy).
        The bytes are those :mod:`tarfile` writes (GNU format, normalised headers), without its per-member copies.
        """
        if "." in key or "/" in key:
            raise ShardError(f"{self.url}: sample key {key!r} contains '.' or '/'")
        for ext, data in members:
            name = f"{key}.{ext}"
            if isinstance(data, np.ndarray):
                array = np.ascontiguousarray(data)
                header = npy_header(array)
                size = len(header) + array.nbytes
                self._write(tar_header(name, size))
                offset = self._offset
                body = memoryview(array).cast("B")
                self._write(header)
                self._write(body)
                self.members.add(name, offset, size, zlib.crc32(body, zlib.crc32(header)))
            else:
                size = len(data)
                self._write(tar_header(name, size))
                offset = self._offset
                self._write(data)
                self.members.add(name, offset, size, zlib.crc32(data), data if ext == "json" else None)
            pad = -size % tarfile.BLOCKSIZE
            if pad:
                self._write(b"\0" * pad)
        self.n_samples += 1

    def _finish(self) -> None:
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
        pad = -self._offset % tarfile.RECORDSIZE  # tarfile pads the archive to whole records
        if pad:
            self._write(b"\0" * pad)
        self._file.close()

    def close(self) -> int:
        """Finish the tar and make it visible under its final name; returns its size in bytes."""
        self._finish()
        size = os.path.getsize(self.tmp)
        write_bytes(self.url + MEMBERS_SUFFIX, self.members.to_bytes(size), self.storage_options)
        if self.remote:
            fs, path = filesystem(self.url, self.storage_options)
            fs.put_file(self.tmp, path)
            os.remove(self.tmp)
        else:
            os.replace(self.tmp, self.url)
        return size

    def abort(self) -> None:
        """Discard the partial shard."""
        try:
            self._file.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.size = self.close()
        else:
            self.abort()


def _write_group(folder: str, arrays: dict[str, np.ndarray], attrs: dict) -> None:
    import zarr
    from zarr.storage import LocalStore

    root = zarr.open_group(store=LocalStore(folder), mode="w", zarr_format=3, attributes=attrs)
    for name, values in arrays.items():
        values = np.asarray(values)
        compressors = "auto"
        if values.ndim == 2:  # (ΣT, F) ragged values: chunked along time, sharding codec, stored uncompressed
            chunks = (ZARR_CHUNK_FRAMES, values.shape[1])
            shards = (ZARR_SHARD_FRAMES, values.shape[1])
            compressors = None  # log-mel float16 barely compresses; raw chunks are read as one byte range per clip
        else:
            chunks, shards = (max(1, values.shape[0]),), None
        dtype = str if values.dtype.kind in "UO" else values.dtype
        arr = root.create_array(
            name,
            shape=values.shape,
            dtype=dtype,
            chunks=chunks,
            shards=shards,
            fill_value=None,
            compressors=compressors,
        )
        if values.size:
            arr[...] = values


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def write_zarr_group(
    store_url: str, stem: str, arrays: dict[str, np.ndarray], attrs: dict, storage_options=None
) -> int:
    """Write the whole Zarr v3 group ``store_url/stem`` from one task; visible only when complete.

    Returns the group's total size in bytes.

    Args:
        store_url: the ``store.zarr`` folder or URL.
        stem: group name (the shard stem, e.g. ``train-000000``).
        arrays: array path inside the group (``"s10/values"``) → data; 2-D arrays are ``(ΣT, F)``.
        attrs: group attributes.
    """
    if is_url(store_url):
        with tempfile.TemporaryDirectory(prefix="flexast-zarr-") as tmp:
            local = os.path.join(tmp, stem)
            _write_group(local, arrays, attrs)
            fs, path = filesystem(join(store_url, stem), storage_options)
            files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs_ in os.walk(local) for f in fs_)
            files.sort(key=lambda rel: rel == "zarr.json")  # the group's own metadata last: put-on-complete
            for rel in files:
                fs.put_file(os.path.join(local, rel), path + "/" + rel.replace(os.sep, "/"))
            return _folder_bytes(local)
    final = os.path.join(store_url, stem)
    tmp = os.path.join(store_url, f".{stem}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_group(tmp, arrays, attrs)
    size = _folder_bytes(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return size


def write_zarr_root(store_url: str, storage_options=None) -> None:
    """Write the store's root group metadata (``store.zarr/zarr.json``) so the store opens as a group."""
    meta = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}, indent=2).encode()
    write_bytes(join(store_url, "zarr.json"), meta, storage_options)


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write a small file atomically: temp + rename locally, a single put on an object store."""
    if is_url(url):
        fs, path = filesystem(url, storage_options)
        fs.pipe_file(path, data)
        return
    folder, name = os.path.split(os.path.abspath(url))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, url)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes | None:
    """Contents of a file, or None if it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def read_zarr_group(store_url: str, stem: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Every array of the group ``store_url/stem`` as numpy (path inside the group → array), plus ``attrs``."""
    import zarr

    try:
        group = zarr.open_group(join(store_url, stem), mode="r", storage_options=storage_options or None)
        out: dict = {"attrs": dict(group.attrs)}
        for path, arr in group.arrays():
            out[path] = arr[...]
        for name, sub in group.groups():
            for path, arr in sub.arrays():
                out[f"{name}/{path}"] = arr[...]
        return out
    except ShardError:
        raise
    except Exception as exc:
        raise ShardError(f"{join(store_url, stem)}: unreadable Zarr group ({type(exc).__name__}: {exc})") from exc
