"""Member indexes: a remote epoch fetches only the byte ranges of the shift it uses, each shard's bytes at most
once; ``pipeline verify`` catches a flipped byte inside an array; shards without an index still load."""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from typing import ClassVar

import pytest
import torch

from flexast.pipeline.loader import make_stream
from flexast.pipeline.shard_report import verify
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.tar_index import MEMBERS_SUFFIX, read_member_index
from tests.factories import build_small_shards, write_shard_folder


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with HTTP ``Range`` support and counts the body bytes sent per file."""

    sent: ClassVar[dict] = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        rng = self.headers.get("Range")
        if not rng or not os.path.isfile(path):
            with self.sent["lock"]:
                self.sent.setdefault(self.path, []).append(os.path.getsize(path) if os.path.isfile(path) else 0)
            return super().do_GET()
        start, _, stop = rng.removeprefix("bytes=").partition("-")
        size = os.path.getsize(path)
        start, stop = int(start), min(int(stop) + 1 if stop else size, size)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(stop - start)
        with self.sent["lock"]:
            self.sent.setdefault(self.path, []).append(len(body))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_small_shards(tmp_path_factory.mktemp("ranged"), n=9, shifts_ms=(10.0, 20.0, 40.0), shard_samples=3)


@pytest.fixture
def served(built):
    handler = type("H", (RangeHandler,), {"sent": {"lock": threading.Lock()}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=built.out))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.sent
    finally:
        server.shutdown()
        server.server_close()


def test_a_remote_epoch_fetches_only_the_members_it_uses(built, served):
    url, sent = served
    cfg = StreamConfig(budget_tokens=128 * 400, patches=[[16, 16]], train=False, resolution={"shift_ms": 20.0})
    remote = [(b.keys, b.frames) for b in make_stream(cfg, f"{url}/index.json")]
    local = [(b.keys, b.frames) for b in make_stream(cfg, built.out)]
    assert [k for k, _ in remote] == [k for k, _ in local]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(remote, local, strict=True))
    used = 0  # the bytes of the s20 members: what the steps use
    for shard in built.index["shards"]:
        doc = read_member_index(os.path.join(built.out, shard["name"]))
        used += sum(s["members"]["s20.npy"][1] for s in doc["samples"])
        tar = sum(sent.get("/" + shard["name"], []))
        assert tar <= shard["bytes"], "no byte of a shard is fetched twice"
    fetched = sum(sum(v) for k, v in sent.items() if k.endswith(".tar"))
    assert fetched == used, "only the members of the shift in use cross the wire"


def test_verify_catches_a_flipped_byte_inside_an_array(tmp_path):
    report = build_small_shards(tmp_path, n=4, shifts_ms=(10.0,), shard_samples=2)
    assert verify(report.out).ok
    name = report.index["shards"][1]["name"]
    path = os.path.join(report.out, name)
    doc = read_member_index(path)
    key = doc["samples"][1]["key"]
    offset, size, _ = doc["samples"][1]["members"]["s10.npy"]
    with open(path, "r+b") as f:  # one byte in the middle of the float16 values, a finite value still
        f.seek(offset + size - size // 3)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    problems = verify(report.out).problems
    assert any(name in p and f"{key}.s10.npy" in p and "checksum" in p for p in problems), problems


def test_shards_without_a_member_index_still_load_and_a_stale_index_is_named(tmp_path):
    write_shard_folder(tmp_path, n_shards=2, per_shard=3)  # written without member indexes
    cfg = StreamConfig(budget_tokens=4096, patches=[[4, 4]], train=False)
    keys = [k for b in make_stream(cfg, str(tmp_path)) for k in b.keys]
    assert len(keys) == 6
    (tmp_path / ("train-000000.tar" + MEMBERS_SUFFIX)).write_text(
        json.dumps({"version": 1, "bytes": 10240, "samples": []})
    )
    with pytest.raises(Exception, match=r"train-000000\.tar\.members\.json.*rebuild"):
        list(make_stream(cfg, str(tmp_path)))
