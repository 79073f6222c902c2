"""The map-style Zarr reader agrees with the tar shards written from the same data."""

from __future__ import annotations

import functools

import pytest
import torch

from flexast.pipeline.errors import ConfigError
from flexast.pipeline.loader import make_stream
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.zarr_dataset import ZarrClipDataset, collate_packed
from tests.factories import write_shard_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("zarr")
    write_shard_folder(out, n_shards=3, per_shard=5, zarr_store=True)
    return str(out)


def test_zarr_items_equal_the_streamed_eval_clips(folder):
    ds = ZarrClipDataset(folder, shift_ms=10.0)
    assert len(ds) == 15
    by_key = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    cfg = StreamConfig(budget_tokens=4096, patches=[[1, 1]], train=False)
    for batch in make_stream(cfg, folder):
        for key, x, y in zip(batch.keys, batch.clip_frames(), batch.labels, strict=True):
            torch.testing.assert_close(x, by_key[key]["features"])
            torch.testing.assert_close(y, by_key[key]["labels"])


def test_zarr_crop_collate_and_workers(folder):
    ds = ZarrClipDataset(folder, shift_ms=20.0, max_frames=20)
    full = ZarrClipDataset(folder, shift_ms=20.0)
    a, b = ds[7], full[7]
    start = (b["features"].shape[0] - 20) // 2
    torch.testing.assert_close(a["features"], b["features"][start : start + 20])
    assert a["frame_shift_ms"] == 20.0
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=functools.partial(collate_packed, patch=(4, 4))
    )
    keys = [k for batch in loader for k in batch.keys]
    assert sorted(keys) == sorted(ds[i]["key"] for i in range(len(ds)))
    with pytest.raises(IndexError):
        ds[15]
    with pytest.raises(ConfigError):
        ZarrClipDataset(folder, crop="random")
