"""A Dask LocalCluster (2 worker processes) writes exactly the bytes local execution writes."""

from __future__ import annotations

import pytest

from flexast.pipeline.build import build_shards
from flexast.pipeline.build_config import BuildConfig
from tests.factories import write_collection
from tests.pipeline.test_build import tree_bytes


@pytest.mark.slow
def test_dask_local_cluster_equals_local_processes(tmp_path):
    pytest.importorskip("distributed")
    manifest, _ = write_collection(tmp_path, n=6)
    # Planned by size, so the duration probing also runs on the cluster; about 2 clips per shard.
    cfg = BuildConfig(name="dask", shifts_ms=(10.0, 30.0), shard_bytes=50_000, format="both")
    local = build_shards(manifest, str(tmp_path / "local"), cfg, workers=1, progress=False)
    dask = build_shards(manifest, str(tmp_path / "dask"), cfg, dask="local:2", progress=False)
    assert local.shards >= 3
    assert tree_bytes(dask.out) == tree_bytes(local.out)
