"""``fetch_ranges`` against slicing the file itself: local, HTTP (range server) and S3 (moto), with and without
a fault-injecting proxy in front."""

from __future__ import annotations

import functools
import http.server
import itertools
import threading

import numpy as np
import pytest

from flexast.pipeline.errors import ShardError
from flexast.pipeline.sources import fetch_many, fetch_object, fetch_ranges, is_transient
from flexast.pipeline.transport import COALESCE_GAP, COALESCE_WASTE, RangeError, coalesce, fetch_tails, submit_many
from tests.conftest import free_port
from tests.servers import FaultProxy, RangeServer, _Server

SIZE = 300_000


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blob")
    data = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    (folder / "blob.bin").write_bytes(data)
    return folder, data


def some_ranges(seed: int = 1, n: int = 40) -> list[tuple[int, int]]:
    """Random ranges: overlapping, adjacent, empty, the whole object, out of order."""
    rng = np.random.default_rng(seed)
    out = [(0, SIZE), (5, 5), (SIZE - 1, SIZE), (1000, 2000), (2000, 3000), (1500, 2500)]
    for _ in range(n):
        a = int(rng.integers(0, SIZE))
        out.append((a, min(SIZE, a + int(rng.integers(0, 70_000)))))
    return out


def spaced_ranges(n: int = 16) -> list[tuple[int, int]]:
    """``n`` ranges of 5000 bytes far enough apart to be ``n`` requests, last first."""
    step = SIZE // n
    return [(i * step, i * step + 5000) for i in reversed(range(n))]


@pytest.fixture(scope="module")
def http_blob(blob):
    folder, data = blob
    with RangeServer(folder) as server:
        yield f"{server.url}/blob.bin", data, server


@pytest.fixture
def s3_blob(s3_bucket, s3_server, blob):
    import s3fs

    _, data = blob
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    fs.pipe(f"{s3_bucket}/blob.bin", data)
    return f"{s3_bucket}/blob.bin", data


def test_coalesce_joins_touching_ranges_and_small_gaps_within_the_waste_budget():
    groups = coalesce([(0, 10), (10, 20), (5, 15), (7, 7), (10**6, 10**6 + 5)])
    assert [(s, e, sorted(i)) for s, e, i in groups] == [(0, 20, [0, 1, 2]), (10**6, 10**6 + 5, [4])]  # 3: empty
    big = 100_000  # gaps of 500 and COALESCE_GAP bytes: 3 % of what is asked for, so joined
    groups = coalesce([(0, big), (big + 500, 2 * big), (2 * big + COALESCE_GAP, 3 * big)])
    assert [(s, e) for s, e, _ in groups] == [(0, 3 * big)]
    # the same gap next to tiny ranges would more than double the bytes: not joined
    assert len(coalesce([(0, 10), (10 + COALESCE_GAP, 20 + COALESCE_GAP)])) == 2


@pytest.mark.parametrize("seed", range(5))
def test_coalesce_covers_every_range_once_within_the_budget(seed):
    """Against the union of the ranges: each range lies in exactly one request, requests do not overlap, and the
    bytes requested are at most (1 + COALESCE_WASTE) times the union's."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 2_000_000, 300)
    ranges = [(int(a), int(a + rng.integers(0, 20_000))) for a in starts]
    groups = coalesce(ranges)
    covered = sorted(i for _, _, idx in groups for i in idx)
    assert covered == [i for i, (a, b) in enumerate(ranges) if a < b]
    for s, e, idx in groups:
        assert all(s <= ranges[i][0] and ranges[i][1] <= e for i in idx)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(groups))  # disjoint, with a gap between
    union = np.zeros(2_100_000, bool)
    for a, b in ranges:
        union[a:b] = True
    assert union.sum() <= sum(e - s for s, e, _ in groups) <= (1 + COALESCE_WASTE) * union.sum()


def test_local_equals_slicing(blob):
    folder, data = blob
    ranges = some_ranges()
    counters: dict = {}
    got = fetch_ranges(str(folder / "blob.bin"), ranges, counters=counters)
    assert got == [data[a:b] for a, b in ranges]
    assert counters["requests"] == len(coalesce(ranges))


def test_local_past_end_and_bad_ranges_name_the_file(blob):
    folder, _ = blob
    path = str(folder / "blob.bin")
    with pytest.raises(ShardError, match=rf"blob\.bin: bytes \[{SIZE - 10}, {SIZE + 10}\) run past the end"):
        fetch_ranges(path, [(SIZE - 10, SIZE + 10)])
    with pytest.raises(ShardError, match=r"blob\.bin.*\(10, 5\)"):
        fetch_ranges(path, [(10, 5)])
    with pytest.raises(ShardError, match=r"missing\.bin"):
        fetch_ranges(str(folder / "missing.bin"), [(0, 1)])


@pytest.mark.parametrize("in_flight", [1, 8])
def test_http_equals_slicing(http_blob, in_flight):
    url, data, _ = http_blob
    ranges = some_ranges(seed=in_flight)
    counters: dict = {}
    assert fetch_ranges(url, ranges, max_in_flight=in_flight, counters=counters) == [data[a:b] for a, b in ranges]
    groups = coalesce(ranges)
    assert counters == {"requests": len(groups), "bytes": sum(e - s for s, e, _ in groups)}


def test_http_past_end_and_missing_are_not_retried(http_blob):
    url, _, _ = http_blob
    counters: dict = {}
    with pytest.raises(RangeError, match=rf"blob\.bin: bytes \[{SIZE}, {SIZE + 1}\) run past the end.*{SIZE} bytes"):
        fetch_ranges(url, [(SIZE, SIZE + 1)], counters=counters)
    with pytest.raises(RangeError, match=rf"blob\.bin: bytes \[0, {SIZE + 1}\) run past the end"):
        fetch_ranges(url, [(0, SIZE + 1)], counters=counters)
    with pytest.raises(RangeError, match=r"nothere\.bin: bytes \[0, 1\) unreadable: FileNotFoundError"):
        fetch_ranges(url.replace("blob.bin", "nothere.bin"), [(0, 1)], counters=counters)
    assert counters.get("retries", 0) == 0 and counters["requests"] == 3


@pytest.mark.parametrize("kind", ["reset", "503", "truncate"])
def test_http_faults_are_retried_and_cut_responses_resumed(http_blob, kind):
    _url, data, server = http_blob
    ranges = spaced_ranges()
    with FaultProxy(server.url, rate=0.5, kinds=[kind], seed=3) as proxy:
        counters: dict = {}
        got = fetch_ranges(proxy.url + "/blob.bin", ranges, backoff_s=0.001, retries=12, counters=counters)
    assert got == [data[a:b] for a, b in ranges]
    assert proxy.counts[kind] >= 3
    # aiohttp itself retries a GET once when a kept-alive connection resets before answering, so not every
    # injected fault reaches us; each one that does costs one retry.
    assert 1 <= counters["retries"] <= proxy.counts[kind]
    assert counters["requests"] == len(coalesce(ranges)) + counters["retries"]
    assert counters["bytes"] == sum(e - s for s, e, _ in coalesce(ranges))  # nothing was fetched twice
    if kind == "truncate":  # a cut response keeps what arrived; the retry asks only for the rest
        assert counters["resumed"] >= 1
    else:
        assert counters.get("resumed", 0) == 0


def test_http_exhausted_retries_name_url_and_range(http_blob):
    _url, _, server = http_blob
    with FaultProxy(server.url, rate=1.0, kinds=["503"]) as proxy:
        counters: dict = {}
        with pytest.raises(ShardError, match=r"blob\.bin: bytes \[100, 200\) failed after 2 retries.*503") as err:
            fetch_ranges(proxy.url + "/blob.bin", [(100, 200)], backoff_s=0.001, retries=2, counters=counters)
    assert counters == {"requests": 3, "retries": 2, "resumed": 0, "bytes": 0}
    assert not is_transient(err.value)


def test_s3_equals_slicing(s3_blob, s3_server):
    url, data = s3_blob
    ranges = some_ranges(seed=3)
    counters: dict = {}
    got = fetch_ranges(url, ranges, s3_server["storage_options"], counters=counters)
    assert got == [data[a:b] for a, b in ranges]
    assert counters["requests"] == len(coalesce(ranges))


def test_s3_past_end_and_missing_key(s3_blob, s3_server):
    url, _ = s3_blob
    so = s3_server["storage_options"]
    with pytest.raises(RangeError, match=rf"blob\.bin: bytes \[0, {SIZE + 1}\) run past the end.*{SIZE} bytes"):
        fetch_ranges(url, [(0, SIZE + 1)], so)
    with pytest.raises(RangeError, match=rf"blob\.bin: bytes \[{SIZE}, {SIZE + 1}\) run past the end"):
        fetch_ranges(url, [(SIZE, SIZE + 1)], so)  # S3 answers InvalidRange: nothing of the range exists
    with pytest.raises(RangeError, match=r"nothere\.bin: bytes \[0, 1\) unreadable: FileNotFoundError"):
        fetch_ranges(url.replace("blob.bin", "nothere.bin"), [(0, 1)], so)


def s3_options_via(proxy_url: str, s3_server) -> dict:
    """s3fs options that reach moto through a proxy, with botocore's own retries off (ours are tested)."""
    so = dict(s3_server["storage_options"])
    so["client_kwargs"] = {**so["client_kwargs"], "endpoint_url": proxy_url}
    so["config_kwargs"] = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
    so["skip_instance_cache"] = True
    return so


@pytest.mark.parametrize("kind", ["reset", "503", "truncate"])
def test_s3_faults_through_proxy(s3_blob, s3_server, kind):
    url, data = s3_blob
    ranges = spaced_ranges()
    with FaultProxy(s3_server["endpoint_url"], rate=0.4, kinds=[kind], seed=1) as proxy:
        counters: dict = {}
        so = s3_options_via(proxy.url, s3_server)
        got = fetch_ranges(url, ranges, so, backoff_s=0.001, retries=12, counters=counters)
    assert got == [data[a:b] for a, b in ranges]
    assert proxy.faults() >= 5 and 1 <= counters["retries"] <= proxy.faults()
    assert counters["requests"] == len(ranges) + counters["retries"]
    assert (counters["resumed"] >= 1) == (kind == "truncate")


def test_s3_endpoint_connection_error_is_retried(s3_blob, s3_server):
    """Nothing listens on the endpoint at first (botocore's EndpointConnectionError); it comes up after a retry."""
    import botocore.exceptions

    url, data = s3_blob
    port = free_port()
    so = s3_options_via(f"http://127.0.0.1:{port}", s3_server)
    assert is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url=so["client_kwargs"]["endpoint_url"]))

    counters: dict = {}
    with pytest.raises(ShardError, match=r"blob\.bin: bytes \[0, 10\) failed after 1 retries.*EndpointConnectionError"):
        fetch_ranges(url, [(0, 10)], so, backoff_s=0.001, retries=1, counters=counters)
    assert counters["retries"] == 1

    proxies = []

    def start_when_retried():  # the endpoint comes up once the first attempt has failed
        while not counters.get("retries"):
            threading.Event().wait(0.002)
        proxies.append(FaultProxy(s3_server["endpoint_url"], port=port))

    counters = {}
    starter = threading.Thread(target=start_when_retried, daemon=True)
    starter.start()
    try:
        got = fetch_ranges(url, [(0, 10), (SIZE - 5, SIZE)], so, backoff_s=0.05, retries=8, counters=counters)
    finally:
        starter.join(5)
        for p in proxies:
            p.close()
    assert got == [data[:10], data[-5:]]
    assert counters["retries"] >= 1


def test_fetch_object_local_http_s3(blob, http_blob, s3_blob, s3_server):
    folder, data = blob
    assert fetch_object(str(folder / "blob.bin")) == data
    url, _, _ = http_blob
    counters: dict = {}
    assert fetch_object(url, block=64 << 10, counters=counters) == data
    assert counters == {"requests": 1 + -(-SIZE // (64 << 10)), "bytes": SIZE}  # one HEAD, then the blocks
    s3_url, _ = s3_blob
    assert fetch_object(s3_url, s3_server["storage_options"], block=100_000) == data


def test_fetch_object_from_a_server_without_ranges(blob):
    """``http.server`` ignores Range: after the first block, one plain GET, resumed (by reading up to where it
    stopped) when the proxy cuts it. The first two responses are cut in half: the first block (64 KiB) is
    whole within the first half; the rest breaks off at 150 kB and resumes there."""
    folder, data = blob
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    with (
        _Server(functools.partial(handler, directory=str(folder))) as plain,
        FaultProxy(plain.url, rate=1.0, kinds=["truncate"], max_faults=2) as proxy,
    ):
        counters: dict = {}
        got = fetch_object(f"{proxy.url}/blob.bin", block=64 << 10, backoff_s=0.001, retries=12, counters=counters)
    assert got == data
    assert counters["unranged"] == 3 and counters["resumed"] == 1 and counters["retries"] == 1
    assert counters["requests"] == 4  # HEAD, first block, the rest, its resumption
    assert proxy.counts["truncate"] == 2


def test_fetch_many_equals_fetch_ranges_per_object(blob, http_blob, s3_blob, s3_server):
    """Several objects in one call (their requests share the in-flight slots): the same bytes as one call each."""
    folder, data = blob
    url, _, _ = http_blob
    a, b = some_ranges(seed=8), spaced_ranges()
    counters: dict = {}
    got = fetch_many([(url, a), (url.replace("blob.bin", "blob.bin?copy"), b), (url, [])], counters=counters)
    assert got == [[data[x:y] for x, y in a], [data[x:y] for x, y in b], []]
    assert counters["requests"] == len(coalesce(a)) + len(coalesce(b))
    local = str(folder / "blob.bin")
    assert fetch_many([(local, b), (local, a)]) == [[data[x:y] for x, y in b], [data[x:y] for x, y in a]]
    s3_url, _ = s3_blob
    assert fetch_many([(s3_url, b), (s3_url, a)], s3_server["storage_options"], max_in_flight=3) == [
        [data[x:y] for x, y in b],
        [data[x:y] for x, y in a],
    ]


def test_submit_many_reads_ahead_and_reports_errors(http_blob):
    url, data, _ = http_blob
    a, b = spaced_ranges(), [(SIZE - 10, SIZE + 10)]
    counters: dict = {}
    first = submit_many([(url, a)], counters=counters)  # started before anything waits for it
    second = submit_many([(url, b)])
    assert first.result(timeout=60) == [[data[x:y] for x, y in a]]
    assert counters["requests"] == len(a)
    with pytest.raises(RangeError, match=r"blob\.bin: bytes \[299990, 300010\) run past the end"):
        second.result(timeout=60)


TAILS = (1, 1028, 70_000, SIZE + 50)  # the last one is longer than the object: all of it


def test_fetch_tails_local_http_s3(blob, http_blob, s3_blob, s3_server):
    """The last n bytes of each object, one request each, the same bytes locally, over HTTP and from S3."""
    folder, data = blob
    want = [data[-n:] for n in TAILS]
    for url, so in ((str(folder / "blob.bin"), None), (http_blob[0], None), (s3_blob[0], s3_server["storage_options"])):
        counters: dict = {}
        assert fetch_tails([(url, n) for n in TAILS], so, counters=counters) == want
        assert counters == {"requests": len(TAILS), "bytes": sum(len(w) for w in want)}


def test_fetch_tails_send_one_suffix_range_each(http_blob):
    """No HEAD first: the proxy logs exactly one ``Range: bytes=-n`` GET per object, all in flight together."""
    _, data, server = http_blob
    with FaultProxy(server.url, latency_s=0.05) as proxy:
        got = fetch_tails([(f"{proxy.url}/blob.bin?{i}", 1028) for i in range(8)])
    assert got == [data[-1028:]] * 8
    assert sorted(proxy.log) == sorted(("GET", f"/blob.bin?{i}", "bytes=-1028") for i in range(8))
    assert proxy.counts["max_in_flight"] > 1


@pytest.mark.parametrize("kind", ["reset", "503", "truncate"])
def test_fetch_tails_retry_faults_and_name_what_is_missing(http_blob, kind):
    _, data, server = http_blob
    with FaultProxy(server.url, rate=0.5, kinds=[kind], seed=4) as proxy:
        counters: dict = {}
        asks = [(f"{proxy.url}/blob.bin", n) for n in TAILS * 4]
        assert fetch_tails(asks, backoff_s=0.001, retries=12, counters=counters) == [data[-n:] for _, n in asks]
    assert proxy.counts[kind] >= 3 and counters["retries"] >= 1
    with pytest.raises(RangeError, match=r"nothere\.bin: last 4 bytes unreadable: FileNotFoundError"):
        fetch_tails([(f"{server.url}/nothere.bin", 4)])
    with pytest.raises(RangeError, match=r"nothere\.bin: cannot read its last 4 bytes"):
        fetch_tails([("/nonexistent/nothere.bin", 4)])
