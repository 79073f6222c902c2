"""Local tar shards cut short, read through a glob (no index): reported, never silently shortened."""

from __future__ import annotations

import pytest

from flexast.pipeline.errors import ShardError
from flexast.pipeline.loader import make_stream
from flexast.pipeline.stream_config import StreamConfig
from tests.factories import write_shard_folder
from tests.pipeline.test_stream_remote import BASE, cut_before_sample, expected, keys_of, member_offsets

GLOB_CFG = {**BASE, "norm_mean": -4.0, "norm_std": 3.0, "n_classes": 5}


def test_glob_with_a_shard_cut_at_a_member_boundary_is_an_error(tmp_path):
    """20 shards of 10 through a glob; one cut before its sample 6 (18 members: json + 2 shifts each): an error."""
    write_shard_folder(tmp_path, n_shards=20, per_shard=10)
    cut_before_sample(tmp_path / "train-000013.tar", 6)
    with pytest.raises(ShardError, match=r"train-000013\.tar.* without (the|an) end-of-archive"):
        keys_of(make_stream(StreamConfig(**GLOB_CFG), str(tmp_path / "*.tar")))


def test_skip_counts_the_cut_shard(tmp_path):
    """``on_error: skip``: the other shards arrive whole; of the cut one at most its whole samples before the cut."""
    write_shard_folder(tmp_path, n_shards=3, per_shard=10)
    cut_before_sample(tmp_path / "train-000001.tar", 6)
    loader = make_stream(StreamConfig(**{**GLOB_CFG, "on_error": "skip"}), str(tmp_path / "*.tar"))
    keys = keys_of(loader)
    cut = {k for k in keys if k.startswith("clip001")}
    assert len(keys) == len(set(keys))
    assert sorted(set(keys) - cut) == expected(3, 10, drop={(1, i) for i in range(10)})
    assert cut <= {f"clip001{i:04d}" for i in range(6)}
    assert loader.last_read["shard_errors"] == 1


def test_one_end_block_is_enough_and_padding_is_ignored(tmp_path):
    """Readers stop at the first zero block; tar pads to 10 KiB records, which must not matter."""
    write_shard_folder(tmp_path, n_shards=2, per_shard=5)
    path = tmp_path / "train-000000.tar"
    end = max(member_offsets(path).values())  # the last sample's first member; its members follow
    data = path.read_bytes()
    first_zero = next(o for o in range(end, len(data), 512) if data[o : o + 512] == b"\0" * 512)
    path.write_bytes(data[: first_zero + 512])  # exactly one end-of-archive block
    assert sorted(keys_of(make_stream(StreamConfig(**GLOB_CFG), str(tmp_path / "*.tar")))) == expected(2, 5)


def test_cut_inside_a_member_is_an_error(tmp_path):
    write_shard_folder(tmp_path, n_shards=2, per_shard=5)
    path = tmp_path / "train-000001.tar"
    offsets = list(member_offsets(path).values())
    with open(path, "r+b") as f:
        f.truncate(offsets[3] + 700)  # inside the json of sample 3
    with pytest.raises(ShardError, match=r"train-000001\.tar.*truncated"):
        keys_of(make_stream(StreamConfig(**GLOB_CFG), str(tmp_path / "*.tar")))
