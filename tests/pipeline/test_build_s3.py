"""Building into s3:// (moto server over real HTTP, through s3fs), and decoding audio from s3://."""

from __future__ import annotations

import numpy as np
import s3fs

from flexast.pipeline.audio import load_audio
from flexast.pipeline.build import build_shards
from flexast.pipeline.build_config import BuildConfig
from flexast.pipeline.shard_report import load_index, verify
from tests.factories import write_collection
from tests.pipeline.test_build import tree_bytes


def test_build_into_s3_matches_a_local_build_and_verifies(tmp_path, s3_server, s3_bucket):
    opts = s3_server["storage_options"]
    manifest, rows = write_collection(tmp_path, n=5)
    cfg = BuildConfig(name="s3", shifts_ms=(10.0, 20.0), shard_samples=2, format="both")
    remote = build_shards(manifest, f"{s3_bucket}/out", cfg, workers=1, progress=False, storage_options=opts)
    local = build_shards(manifest, str(tmp_path / "local"), cfg, workers=1, progress=False)
    assert remote.index == local.index and load_index(f"{s3_bucket}/out", opts) == local.index

    fs = s3fs.S3FileSystem(**opts)
    fs.invalidate_cache()
    prefix = f"{s3_bucket[5:]}/out/"
    remote_files = {p[len(prefix) :]: fs.cat_file(p) for p in fs.find(prefix)}
    assert remote_files == tree_bytes(local.out)  # the same objects, byte for byte; no temp objects left behind

    report = verify(f"{s3_bucket}/out", opts)
    assert report.ok, report.problems
    assert report.samples == 5

    # Audio can come from the bucket too (fsspec file objects into soundfile).
    fs.put_file(str(tmp_path / rows[1]["path"]), f"{s3_bucket[5:]}/in/clip.ogg")
    from_s3 = load_audio(f"{s3_bucket}/in/clip.ogg", storage_options=opts)
    np.testing.assert_array_equal(from_s3.waveform, load_audio(str(tmp_path / rows[1]["path"])).waveform)
