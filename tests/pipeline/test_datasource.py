"""One loader, three sources: tar shards, the Zarr store written from the same data, and either cached in
memory give the same steps (clips, patch sizes, augmentation draws) and equal tensors."""

from __future__ import annotations

import pytest
import torch

from flexast.pipeline.datasource import MemorySource, TarSource, ZarrSource, open_source
from flexast.pipeline.errors import ShardError
from flexast.pipeline.loader import make_loader, make_stream
from flexast.pipeline.stream_config import StreamConfig
from tests.factories import write_shard_folder

TRAIN = {
    "budget_tokens": 256,
    "patches": [[4, 4], [8, 8]],
    "pack_buffer": 12,
    "shuffle_buffer": 8,
    "resolution": {"kind": "random"},
    "freq_mask": 4,
    "time_mask": 8,
    "mixup_prob": 0.5,
    "max_frames": 60,
    "num_workers": 2,
    "seed": 5,
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("zarr")
    write_shard_folder(out, n_shards=3, per_shard=5, zarr_store=True)
    return str(out)


def sources(folder):
    tar = open_source(folder)
    zarr = open_source(folder, format="zarr")
    assert isinstance(tar, TarSource) and isinstance(zarr, ZarrSource)
    return {"tar": tar, "zarr": zarr, "memory": MemorySource.cache(open_source(folder)), "zarr-memory":
            MemorySource.cache(zarr)}  # fmt: skip


def steps(loader):
    return [(b.keys, b.patch, b.frames, b.labels, b.frame_shift_ms) for b in loader]


@pytest.mark.parametrize("cfg", [TRAIN, {**TRAIN, "train": False, "mixup_prob": 0.0}], ids=["train", "eval"])
def test_tar_zarr_and_memory_sources_give_identical_steps(folder, cfg):
    got = {name: steps(make_stream(StreamConfig(**cfg), src, epoch=1)) for name, src in sources(folder).items()}
    ref = got["tar"]
    assert sum(len(k) for k, *_ in ref) == 15
    for name, other in got.items():
        assert [s[:2] for s in other] == [s[:2] for s in ref], name
        for a, b in zip(other, ref, strict=True):
            for x, y in zip(a[2:], b[2:], strict=True):
                assert torch.equal(x, y), name  # the same call on equal inputs: bit for bit


def test_worker_processes_give_the_same_steps_from_zarr(folder):
    cfg = StreamConfig(**TRAIN)
    a = steps(make_loader(cfg, open_source(folder, format="zarr")))
    b = steps(make_stream(cfg, open_source(folder)))
    assert [s[:2] for s in a] == [s[:2] for s in b]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(a, b, strict=True))


def test_a_zarr_only_spec_opens_the_store_and_a_missing_store_is_named(folder, tmp_path):
    assert isinstance(open_source(folder + "/store.zarr"), ZarrSource)
    write_shard_folder(tmp_path, n_shards=1, per_shard=2)
    with pytest.raises(ShardError, match="no Zarr store"):
        open_source(str(tmp_path), format="zarr")
