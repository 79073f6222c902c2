"""The stream over real servers on 127.0.0.1: an ``http.server`` with fault injection, and moto S3 through s3fs."""

from __future__ import annotations

import functools
import http.server
import threading
from typing import ClassVar

import pytest

from flexast.pipeline.errors import ShardError
from flexast.pipeline.loader import make_loader, make_stream
from flexast.pipeline.stream_config import StreamConfig
from tests.factories import write_shard_folder

BASE = {"budget_tokens": 256, "patches": [[4, 4]], "pack_buffer": 24, "shuffle_buffer": 16, "backoff_s": 0.01}


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``faults`` makes every ``every``-th GET of a .tar fail with 503 or a dropped connection."""

    faults: ClassVar[dict] = {}

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        f = self.faults
        if self.path.endswith(".tar") and f.get("every"):
            with f["lock"]:
                f["count"] += 1
                n = f["count"]
            broken = f.get("only") in (None, self.path.rsplit("/", 1)[-1])
            if broken and n % f["every"] == 0:
                f["injected"] = f.get("injected", 0) + 1
                if f["kind"] == "503":
                    self.send_error(503, "injected")
                    return
                path = self.translate_path(self.path)
                with open(path, "rb") as fh:
                    data = fh.read()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 3])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
        super().do_GET()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    index = write_shard_folder(folder, n_shards=4, per_shard=10)
    handler = type("H", (FaultyHandler,), {"faults": {"lock": threading.Lock(), "count": 0}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", index, handler.faults
    finally:
        server.shutdown()
        server.server_close()


def keys_of(loader):
    return [k for b in loader for k in b.keys]


def expected(index):
    return sorted(f"clip{s:03d}{i:04d}" for s in range(len(index["shards"])) for i in range(10))


@pytest.mark.parametrize("kind", ["503", "drop"])
def test_http_faults_are_retried_and_every_sample_arrives_once(served, kind):
    url, index, faults = served
    faults.update(every=2, kind=kind, only=None, count=0, injected=0)
    try:
        keys = keys_of(make_stream(StreamConfig(**BASE), f"{url}/index.json"))
    finally:
        faults.update(every=0)
    assert faults["injected"] >= 3, "faults were injected"
    assert sorted(keys) == expected(index)


def test_http_exhausted_retries_name_the_shard(served):
    url, _, faults = served
    faults.update(every=1, kind="503", only="train-000002.tar", count=0)
    try:
        with pytest.raises(ShardError, match=r"train-000002\.tar.*failed after 2 retries"):
            list(make_stream(StreamConfig(**{**BASE, "retries": 2}), f"{url}/index.json"))
    finally:
        faults.update(every=0)


def test_http_brace_urls_without_index(served):
    url, index, _ = served
    keys = keys_of(
        make_stream(
            StreamConfig(**BASE, norm_mean=-4.0, norm_std=3.0, n_classes=5), f"{url}/train-{{000000..000003}}.tar"
        )
    )
    assert sorted(keys) == expected(index)


def test_s3_through_s3fs(s3_server, tmp_path):
    import boto3
    import s3fs

    # The bucket is made with boto3: s3fs's mkdir sends LocationConstraint=us-east-1, which S3 (and moto) reject.
    boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1").create_bucket(Bucket="stream")
    s3_bucket = "s3://stream"
    write_shard_folder(tmp_path, n_shards=2, per_shard=10)
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    for p in sorted(tmp_path.iterdir()):
        fs.put(str(p), f"{s3_bucket}/ds/{p.name}")
    cfg = StreamConfig(**BASE, storage_options=s3_server["storage_options"], num_workers=2)
    keys = keys_of(make_loader(cfg, f"{s3_bucket}/ds/index.json"))  # two worker processes
    assert sorted(keys) == sorted(f"clip{s:03d}{i:04d}" for s in range(2) for i in range(10))
