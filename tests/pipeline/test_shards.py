"""Shard writers: the tar writer's bytes equal tarfile's, a shard is invisible until closed, readers name the shard."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from flexast.pipeline.errors import ShardError
from flexast.pipeline.shards import TarShardWriter, _tarinfo, npy_bytes, tar_header
from flexast.pipeline.tar_index import iter_tar, member_index, read_member_index, scan_tar


@pytest.mark.parametrize(("name", "size"), [("a.json", 0), ("k" * 95 + ".json", 123456789), ("x.s12p5.npy", 1 << 33),
                                            ("é.json", 5), ("k" * 120 + ".json", 7)])  # fmt: skip
def test_header_equals_tarfile(name, size):
    assert tar_header(name, size) == _tarinfo(name, size).tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def test_writer_bytes_equal_tarfile_and_appear_only_on_close(tmp_path):
    a = np.arange(24, dtype=np.float16).reshape(6, 4)
    members = [("k1", [("json", b'{"key": "k1"}'), ("s10.npy", a)]), ("k2", [("json", b"{}"), ("s10.npy", a[:1])])]
    url = str(tmp_path / "train-000000.tar")
    writer = TarShardWriter(url)
    for key, ms in members:
        writer.add(key, ms)
    assert not os.path.exists(url) and os.listdir(tmp_path) == [f".train-000000.tar.tmp-{os.getpid()}"]
    size = writer.close()
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, ms in members:
            for ext, data in ms:
                data = npy_bytes(data) if isinstance(data, np.ndarray) else data
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    with open(url, "rb") as f:
        assert f.read() == expected.getvalue() and size == len(expected.getvalue())
    assert [k for k, _ in iter_tar(url)] == ["k1", "k2"]
    # The member index written beside it equals one derived from the tar's own bytes (offsets, sizes, CRC-32).
    data = expected.getvalue()
    assert read_member_index(url) == json.loads(member_index(scan_tar(data, url), data).to_bytes(len(data)))

    aborted = TarShardWriter(str(tmp_path / "b.tar"))
    aborted.add("k", [("json", b"{}")])
    aborted.abort()
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar", "train-000000.tar.members.json"]
    with pytest.raises(ShardError, match="contains"):
        TarShardWriter(str(tmp_path / "c.tar")).add("a.b", [])
    with pytest.raises(ShardError, match=r"b\.tar: shard missing"):
        list(iter_tar(str(tmp_path / "b.tar")))
