"""End to end with the real writer: ``pipeline.build.build_shards`` output streamed and read map-style."""

from __future__ import annotations

import pytest
import torch

from flexast.pipeline.datasource import open_source
from flexast.pipeline.loader import make_stream
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.zarr_chunks import layout, read_meta
from tests.factories import build_small_shards


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_shards(tmp_path_factory.mktemp("built"), n=8, shifts_ms=(10.0, 20.0), fmt="both")


def test_built_shards_stream_every_clip_once_and_match_zarr(built):
    out, index = built.out, built.index
    cfg = StreamConfig(budget_tokens=128 * 400, patches=[[1, 1]], train=False)  # no clip is cut
    batches = list(make_stream(cfg, out))
    assert batches[0].n_mels == 128 and index["total_samples"] == 8
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == index["total_samples"] == len(set(keys))
    zarr = open_source(out, format="zarr")
    values = f"{zarr.shards[0].url}/s10/values"
    assert layout(values, read_meta(values)) is not None, "the writer's layout: read chunk by chunk, not via zarr"
    from_zarr = list(make_stream(cfg, zarr))
    assert [b.keys for b in from_zarr] == [b.keys for b in batches]
    for a, b in zip(from_zarr, batches, strict=True):
        assert torch.equal(a.frames, b.frames)


def test_built_shards_train_stream_with_random_shifts(built):
    cfg = StreamConfig(budget_tokens=256, patches=[[16, 4], [8, 8]], resolution={"kind": "random"}, time_mask=20)
    batches = list(make_stream(cfg, built.out))
    assert sum(b.n_clips for b in batches) == built.index["total_samples"]
    assert {float(s) for b in batches for s in b.frame_shift_ms} <= {10.0, 20.0}
    assert all(b.total_tokens <= 256 for b in batches)


def test_zstd_chunks_of_earlier_builds_and_raw_chunks_read_alike(built, tmp_path):
    import shutil

    import numpy as np
    import zarr

    out = str(tmp_path / "copy")
    shutil.copytree(built.out, out)
    first = open_source(out, format="zarr").shards[0].url
    group = zarr.open_group(first, mode="r+")
    values = np.asarray(group["s10/values"][...])
    del group["s10/values"]
    arr = group.create_array(
        "s10/values", shape=values.shape, dtype=values.dtype, chunks=(256, 128), shards=(256 * 64, 128), fill_value=None
    )  # zarr's default compressor: zstd
    arr[...] = values
    meta = read_meta(f"{first}/s10/values")
    assert layout(f"{first}/s10/values", meta).compressed
    cfg = StreamConfig(budget_tokens=128 * 400, patches=[[1, 1]], train=False)
    a = list(make_stream(cfg, open_source(out, format="zarr")))
    b = list(make_stream(cfg, open_source(built.out, format="tar")))
    assert [x.keys for x in a] == [x.keys for x in b]
    assert all(torch.equal(x.frames, y.frames) for x, y in zip(a, b, strict=True))
