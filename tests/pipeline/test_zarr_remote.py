"""The Zarr source over HTTP and S3 with the real writer's layout (``pipeline.build.build_shards``): the same
steps as the local tar source, planning that reads every group at once, and steps whose reads are one round
of feature ranges. The expectations are the local tar source's steps and the proxy's own log of requests."""

from __future__ import annotations

import pytest
import torch

from flexast.pipeline.datasource import open_source
from flexast.pipeline.errors import ShardError
from flexast.pipeline.loader import make_loader, make_stream
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.transport import COALESCE_GAP
from tests.factories import build_small_shards
from tests.servers import FaultProxy, RangeServer

WHOLE = {"budget_tokens": 128 * 400, "patches": [[1, 1]], "train": False}  # every clip whole, in one order
SHIFTS = (10.0, 20.0)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """12 clips in 4 shards (tar and Zarr, the writer's sharded raw layout)."""
    return build_small_shards(tmp_path_factory.mktemp("zr"), n=12, shifts_ms=SHIFTS, shard_samples=3, fmt="both")


@pytest.fixture(scope="module")
def served(built):
    with RangeServer(built.out) as server:
        yield server.url


def assert_same_steps(a, b) -> None:
    assert [x.keys for x in a] == [y.keys for y in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.frames, y.frames)  # the same float16 bytes through the same ops and shapes: bitwise
        assert torch.equal(x.n_frames, y.n_frames)


@pytest.mark.parametrize("resolution", [{"kind": "fixed", "shift_ms": 10.0}, {"kind": "random"}])
def test_http_zarr_gives_the_local_tar_steps(built, served, resolution):
    cfg = StreamConfig(**WHOLE, resolution=resolution)
    tar = list(make_stream(cfg, built.out))
    zarr = list(make_stream(cfg, open_source(f"{served}/index.json", format="zarr")))
    assert sum(b.n_clips for b in tar) == built.index["total_samples"] == 12
    assert_same_steps(zarr, tar)


def test_s3_zarr_gives_the_local_tar_steps(built, s3_bucket, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.put(str(built.out), f"{s3_bucket}/ds", recursive=True)
    cfg = StreamConfig(**WHOLE, resolution={"kind": "random"}, storage_options=s3_server["storage_options"])
    zarr = make_stream(cfg, open_source(f"{s3_bucket}/ds/index.json", cfg.storage_options, format="zarr"))
    assert_same_steps(list(zarr), list(make_stream(cfg, built.out)))
    assert zarr.last_read["requests"] >= 1 and zarr.last_read.get("retries", 0) == 0


def test_planning_reads_every_group_at_once(served, built):
    """With 30 ms per request, the groups' arrays are read concurrently: the proxy holds more requests at once
    than there are groups (reading group after group, array after array, it would hold one)."""
    with FaultProxy(served, latency_s=0.03) as proxy:
        source = open_source(f"{proxy.url}/index.json", format="zarr")
        source.prefetch(source.shards)
        records = [r for shard in source.shards for r in source.records(shard)]
    assert len(source.shards) == 4
    assert [r["key"] for r in records] == [r["key"] for s in open_source(built.out).shards for r in _records(s)]
    assert proxy.counts["max_in_flight"] > len(source.shards)


def spans(log) -> list[tuple[int, int]]:
    """``(first, last)`` byte of each logged ``Range: bytes=first-last`` request."""
    return [tuple(int(v) for v in r.removeprefix("bytes=").split("-")) for _, _, r in log]


def _records(shard):
    return open_source(shard.url.rsplit("/", 1)[0] + "/index.json").records(shard)


@pytest.mark.parametrize("resolution", [{"kind": "fixed", "shift_ms": 10.0}, {"kind": "random"}])
def test_step_reads_are_feature_ranges_only(served, resolution):
    """Planning fetches each touched shard object's chunk index with one suffix-range GET (no HEAD); after
    that every request (as the proxy logs it) is a range of feature bytes, at most one per clip; their total
    is the bytes of the frames the steps hold plus, per clip joined to a neighbour's request, a gap of at
    most ``COALESCE_GAP``; and ``last_read`` counts what the proxy saw."""
    cfg = StreamConfig(**WHOLE, resolution=resolution, read_ahead_steps=2)
    with FaultProxy(served) as proxy:
        source = open_source(f"{proxy.url}/index.json", format="zarr")
        loader = make_loader(cfg, source, in_process=True)
        source.prefetch(source.shards)
        before = len(proxy.log)  # the groups' arrays, read through zarr
        loader.plan(0)
        planned = len(proxy.log)
        batches = list(loader)
        log = list(proxy.log)
        read = loader.last_read
        again = list(loader)  # the next epoch: only the indexes of shard objects not touched before
    tails, data = log[before:planned], log[planned:]
    assert tails and all(m == "GET" and r.startswith("bytes=-") and "/values/c/" in p for m, p, r in tails)
    assert len({p for _, p, _ in tails}) == len(tails)  # each shard object's index once
    assert all(m == "GET" and r and not r.startswith("bytes=-") and "/values/c/" in p for m, p, r in data)
    assert {p for _, p, _ in data} <= {p for _, p, _ in tails}
    spans_ = spans(data)
    used = sum(b.frames.shape[0] * b.n_mels * 2 for b in batches)  # float16 bytes of every frame stepped on
    clips = sum(b.n_clips for b in batches)
    assert clips == 12 and len(data) <= clips
    assert used <= sum(b - a + 1 for a, b in spans_) <= used + COALESCE_GAP * (clips - len(data))
    assert read["requests"] == len(tails) + len(data) and "retries" not in read
    assert sorted(k for b in again for k in b.keys) == sorted(k for b in batches for k in b.keys)
    later = proxy.log[len(log) :]
    new_tails = [p for _, p, r in later if r.startswith("bytes=-")]
    assert not set(new_tails) & {p for _, p, _ in tails}
    assert loader.last_read["requests"] == len(later) and "retries" not in loader.last_read
    if resolution["kind"] == "fixed":
        assert_same_steps(again, batches)
        assert not new_tails and len(later) == len(data)


def test_neighbouring_steps_share_requests(served):
    """Evaluation order reads a group's clips one after another: the clips of steps fetched together lie
    back to back in ``s10/values``, so read-ahead (steps fetched in groups) sends fewer requests than one
    fetch per step, for the same steps and exactly the same bytes (no gap was needed to join them)."""
    cfg = {**WHOLE, "budget_tokens": 128 * 100}  # a few clips per step
    runs = {}
    for k in (0, 8):
        with FaultProxy(served) as proxy:
            source = open_source(f"{proxy.url}/index.json", format="zarr")
            loader = make_loader(StreamConfig(**cfg, read_ahead_steps=k), source, in_process=True)
            loader.plan(0)
            start = len(proxy.log)
            runs[k] = (list(loader), proxy.log[start:])
    (off, log_off), (on, log_on) = runs[0], runs[8]
    assert len(off) >= 4
    assert_same_steps(on, off)
    sent = {k: sum(b - a + 1 for a, b in spans(log)) for k, (_, log) in runs.items()}
    assert sent[8] == sent[0] == sum(b.frames.shape[0] * b.n_mels * 2 for b in off)
    assert len(log_on) < len(log_off)


def test_worker_processes_read_http_zarr_with_the_parents_chunk_indexes(served):
    """Two DataLoader workers over HTTP give the in-process steps; the chunk indexes fetched while the parent
    planned travel into the workers, which then only send feature ranges (the proxy's log)."""
    cfg = {**WHOLE, "resolution": {"kind": "random"}, "budget_tokens": 128 * 100}
    here = list(make_stream(StreamConfig(**cfg, num_workers=2), open_source(f"{served}/index.json", format="zarr")))
    with FaultProxy(served) as proxy:
        source = open_source(f"{proxy.url}/index.json", format="zarr")
        loader = make_loader(StreamConfig(**cfg, num_workers=2), source)
        loader.plan(0)
        planned = len(proxy.log)
        procs = list(loader)
        after = proxy.log[planned:]
    assert_same_steps(procs, here)
    assert after and not [r for _, _, r in after if r.startswith("bytes=-")]


def test_an_unreadable_remote_group_is_named(built, tmp_path):
    """A group whose ``keys`` array is gone: the error names that group, raised when the planner reaches it."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(built.out, out)
    shutil.rmtree(out / "store.zarr" / "train-000002" / "keys")
    with RangeServer(out) as server, pytest.raises(ShardError, match=r"store\.zarr/train-000002: unreadable Zarr"):
        list(make_stream(StreamConfig(**WHOLE), open_source(f"{server.url}/index.json", format="zarr")))
