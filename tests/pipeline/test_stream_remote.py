"""The loader over real servers on 127.0.0.1 (``tests/servers.py``): a range-capable HTTP server, a plain
``http.server`` that ignores ``Range``, and moto S3, with a fault-injecting proxy in front.

Everything goes through the public ``make_stream`` / ``make_loader``; the expectations are the keys the
shard factory wrote and the shard files themselves.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import tarfile

import pytest

from flexast.pipeline.errors import ShardError
from flexast.pipeline.loader import make_loader, make_stream
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.tar_index import MEMBERS_SUFFIX, member_index, scan_tar
from tests.factories import write_shard_folder
from tests.servers import FaultProxy, RangeServer, _Server

BASE = {"budget_tokens": 256, "patches": [[4, 4]], "pack_buffer": 24, "shuffle_buffer": 16, "backoff_s": 0.01}
N_SHARDS, PER_SHARD = 4, 10
MANY = 16  # shards of the fault tests: 33+ requests, so that 15 % of them is several faults


def keys_of(loader) -> list[str]:
    return [k for b in loader for k in b.keys]


def expected(n_shards: int = N_SHARDS, per_shard: int = PER_SHARD, drop=()) -> list[str]:
    return sorted(f"clip{s:03d}{i:04d}" for s in range(n_shards) for i in range(per_shard) if (s, i) not in drop)


def member_offsets(path) -> dict[str, int]:
    """Header offset of each sample's first member, by key."""
    out: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            out.setdefault(m.name.split(".", 1)[0], m.offset)
    return out


def cut_before_sample(path, i: int) -> None:
    """Truncate a shard exactly at the member boundary before its sample ``i`` (no end-of-archive blocks)."""
    offset = list(member_offsets(path).values())[i]
    with open(path, "r+b") as f:
        f.truncate(offset)


def keep_first_samples(path, i: int) -> None:
    """Rewrite a shard as a complete tar (end blocks included) holding only its first ``i`` samples."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))[:i]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            if m.name.split(".", 1)[0] in keys:
                out.addfile(m, io.BytesIO(data))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    write_shard_folder(path, n_shards=N_SHARDS, per_shard=PER_SHARD)
    add_member_indexes(path)
    return path


@pytest.fixture(scope="module")
def http_url(folder):
    with RangeServer(folder) as server:
        yield server.url


def add_member_indexes(folder) -> None:
    """``<shard>.members.json`` beside each tar, as ``build-shards`` writes it (features then read by range)."""
    for tar in sorted(folder.glob("*.tar")):
        buf = tar.read_bytes()
        (folder / (tar.name + MEMBERS_SUFFIX)).write_bytes(
            member_index(scan_tar(buf, tar.name), buf).to_bytes(len(buf))
        )


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    path = tmp_path_factory.mktemp("many")
    write_shard_folder(path, n_shards=MANY, per_shard=4)
    add_member_indexes(path)
    with RangeServer(path) as server:
        yield path, server.url


def upload(s3_server, folder, url: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    for p in sorted(folder.iterdir()):
        fs.put(str(p), f"{url}/{p.name}")
    return url


@pytest.fixture
def s3_folder(s3_bucket, s3_server, folder):
    return upload(s3_server, folder, f"{s3_bucket}/ds")


def via(proxy_url: str, s3_server) -> dict:
    so = dict(s3_server["storage_options"])
    so["client_kwargs"] = {**so["client_kwargs"], "endpoint_url": proxy_url}
    return so


def test_http_through_fault_proxy_every_sample_once(many):
    """15 % of GETs and HEADs reset, answered 503, or cut mid-body: retried and resumed, nothing lost or doubled."""
    _, url = many
    with FaultProxy(url, rate=0.15, methods=("GET", "HEAD"), seed=11) as proxy:
        loader = make_stream(StreamConfig(**BASE), f"{proxy.url}/index.json")
        keys = keys_of(loader)
    assert sorted(keys) == expected(MANY, 4)
    assert proxy.faults() >= 3
    read = loader.last_read
    assert read["samples"] == MANY * 4 and read.get("shard_errors", 0) == 0
    assert read["retries"] >= 1 and read["requests"] >= N_SHARDS


def test_s3_through_fault_proxy_with_workers(s3_bucket, s3_server, many):
    """The same through moto S3, read by two DataLoader worker processes, with botocore's own retries off."""
    source = upload(s3_server, many[0], f"{s3_bucket}/many")
    with FaultProxy(
        s3_server["endpoint_url"],
        rate=float(os.environ.get("RATE", 0.15)),
        methods=("GET", "HEAD"),
        only=".tar",
        seed=5,
    ) as proxy:
        so = via(proxy.url, s3_server) | {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
        loader = make_loader(StreamConfig(**BASE, storage_options=so, num_workers=2), f"{source}/index.json")
        keys = keys_of(loader)
    assert sorted(keys) == expected(MANY, 4)
    assert proxy.faults() >= 3
    assert loader.last_read["retries"] >= 1  # summed over both workers' counters
    assert loader.last_read["samples"] == MANY * 4


def test_counters_report_requests_and_bytes(http_url, folder):
    loader = make_stream(StreamConfig(**BASE), f"{http_url}/index.json")
    assert sorted(keys_of(loader)) == expected()
    read = loader.last_read
    assert 0 < read["bytes"] <= sum(p.stat().st_size for p in folder.iterdir())  # no byte fetched twice
    assert read["requests"] >= N_SHARDS
    assert read.get("retries", 0) == 0 and read.get("resumed", 0) == 0


def test_http_exhausted_retries_name_the_shard(http_url):
    with (
        FaultProxy(http_url, rate=1.0, kinds=["503"], only="train-000002.tar") as proxy,
        pytest.raises(ShardError, match=r"train-000002\.tar.*failed after 2 retries"),
    ):
        list(make_stream(StreamConfig(**{**BASE, "retries": 2}), f"{proxy.url}/index.json"))


def test_server_without_range_support(folder):
    """``http.server`` ignores Range: the reader streams one GET per shard, reopened when the proxy cuts it."""
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    with (
        _Server(functools.partial(handler, directory=str(folder))) as plain,
        FaultProxy(plain.url, rate=0.3, kinds=["truncate", "reset"], only=".tar", seed=2) as proxy,
    ):
        cfg = StreamConfig(**BASE, norm_mean=-4.0, norm_std=3.0, n_classes=5)
        loader = make_stream(cfg, f"{proxy.url}/train-{{000000..000003}}.tar")
        keys = keys_of(loader)
    assert sorted(keys) == expected()
    assert proxy.faults() >= 1


@pytest.fixture
def cut_folder(tmp_path):
    """Shards where shard 2 is cut exactly before its sample 6 (6 of 10 samples left, no end-of-archive blocks)."""
    write_shard_folder(tmp_path, n_shards=N_SHARDS, per_shard=PER_SHARD)
    cut_before_sample(tmp_path / "train-000002.tar", 6)
    with RangeServer(tmp_path) as server:
        yield tmp_path, server.url


@pytest.mark.parametrize("spec", ["index.json", "train-{000000..000003}.tar"])
def test_truncated_remote_shard_is_named(cut_folder, spec):
    _, url = cut_folder
    with pytest.raises(ShardError, match=r"train-000002\.tar.* without (the|an) end-of-archive"):
        keys_of(make_stream(StreamConfig(**BASE, norm_mean=-4.0, norm_std=3.0, n_classes=5), f"{url}/{spec}"))


def test_truncated_shard_skipped_and_counted(cut_folder):
    """``on_error: skip``: the other shards arrive whole, the cut one is counted as failed (of its samples,
    at most the whole ones before the cut arrive, each once)."""
    _, url = cut_folder
    loader = make_stream(StreamConfig(**BASE, on_error="skip"), f"{url}/index.json")
    keys = keys_of(loader)
    assert len(keys) == len(set(keys))
    cut = {k for k in keys if k.startswith("clip002")}
    assert sorted(set(keys) - cut) == expected(drop={(2, i) for i in range(PER_SHARD)})
    assert cut <= {f"clip002{i:04d}" for i in range(6)}
    assert loader.last_read["shard_errors"] == 1
    assert loader.last_read["failed_shards"] == [f"{url}/train-000002.tar"]


def test_fewer_samples_than_the_index_lists(tmp_path):
    """A complete tar (end blocks present) with fewer samples than index.json says is reported, not shortened."""
    write_shard_folder(tmp_path, n_shards=2, per_shard=PER_SHARD)
    keep_first_samples(tmp_path / "train-000001.tar", 7)
    with (
        RangeServer(tmp_path) as server,
        pytest.raises(ShardError, match=r"train-000001\.tar: 7 samples .* lists 10"),
    ):
        keys_of(make_stream(StreamConfig(**BASE), f"{server.url}/index.json"))


def test_s3_workers_without_stray_tracebacks(s3_bucket, s3_server, many, capfd):
    """Sessions opened in this process and inherited by forked DataLoader workers are never closed from a
    worker's event loop ('Task exception was never retrieved … attached to a different loop')."""
    source = upload(s3_server, many[0], f"{s3_bucket}/quiet")
    with FaultProxy(s3_server["endpoint_url"]) as proxy:  # a session whose server then goes away
        cfg = StreamConfig(**BASE, storage_options=via(proxy.url, s3_server))
        assert sorted(keys_of(make_loader(cfg, f"{source}/index.json"))) == expected(MANY, 4)
    for workers in (0, 2):  # a session in this process, then workers forked with both
        cfg = StreamConfig(**BASE, storage_options=s3_server["storage_options"], num_workers=workers)
        assert sorted(keys_of(make_loader(cfg, f"{source}/index.json"))) == expected(MANY, 4)
    err = capfd.readouterr().err  # the workers write to the same stderr
    noise = [line for line in err.splitlines() if any(w in line for w in ("Traceback", "Unclosed", "never retrieved"))]
    assert not noise, err
