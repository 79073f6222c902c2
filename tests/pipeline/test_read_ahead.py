"""Reading steps ahead (``read_ahead_steps``): the stage on plain lists, then the loader over a real HTTP server
(``tests/servers.py``) for tar and Zarr, where the expectation is the same loader with read-ahead off."""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch

from flexast.pipeline.datasource import open_source
from flexast.pipeline.errors import ConfigError, ShardError
from flexast.pipeline.loader import make_loader, make_stream
from flexast.pipeline.stream import group_steps, read_ahead
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.transport import COALESCE_WASTE
from tests.factories import write_shard_folder
from tests.servers import FaultProxy, RangeServer

BASE = {"budget_tokens": 256, "patches": [[4, 4]], "pack_buffer": 24, "shuffle_buffer": 16, "backoff_s": 0.01}
BASE_AUG = {**BASE, "freq_mask": 8, "time_mask": 16, "mixup_prob": 0.5, "resolution": {"kind": "random"}}


def started_future(log: list, item) -> Future:
    log.append(item)
    fut: Future = Future()
    fut.set_result(item * 10)
    return fut


@pytest.mark.parametrize("k", [0, 1, 3, 20])
def test_read_ahead_keeps_order_and_bounds_the_window(k):
    """Items come out in order with their own results; when item i is handed out, exactly items
    ≤ i + k have been started (never more: the memory bound)."""
    started: list = []
    out = []
    for item, fut in read_ahead(range(10), lambda i: started_future(started, i), k):
        assert started == list(range(min(10, item + k + 1)))
        out.append((item, fut.result()))
    assert out == [(i, i * 10) for i in range(10)]


@pytest.mark.parametrize("k", [0, 2, 5])
def test_read_ahead_holds_at_most_k_plus_one_units(k):
    """Items of several units (steps) each: while item i is handed out, the items started and not yet passed
    hold at most k + 1 units (or i alone, whatever its size); every item is started once, in order."""
    sizes = [1, 3, 1, 2, 1, 4, 1, 1]
    started: list = []
    out = []
    for item, fut in read_ahead(range(len(sizes)), lambda i: started_future(started, i), k, sizes.__getitem__):
        held = sum(sizes[j] for j in started if j >= item)
        assert held <= k + 1 or started[-1] == item
        out.append(fut.result())
    assert started == list(range(len(sizes))) and out == [i * 10 for i in range(len(sizes))]


def test_group_steps_joins_only_touching_neighbours():
    """Steps as (position, plan) with plan.items' (url, loc): a step joins the group before it only when
    ``touching`` says so, and never beyond ``most`` steps."""
    plan = lambda *ids: SimpleNamespace(items=[{"url": "u", "loc": i} for i in ids])  # noqa: E731
    steps = [(0, plan(1, 2)), (1, plan(3)), (2, plan(10)), (3, plan(11, 12)), (4, plan(13)), (5, plan(14))]
    touching = lambda a, b: any(abs(x[1] - y[1]) == 1 for x in a for y in b)  # noqa: E731
    groups = group_steps(steps, touching, most=2)
    assert [[pos for pos, _ in g] for g in groups] == [[0, 1], [2, 3], [4, 5]]
    assert [[pos for pos, _ in g] for g in group_steps(steps, touching, most=1)] == [[i] for i in range(6)]
    assert len(group_steps(steps, lambda a, b: False, most=8)) == 6


def test_tar_members_touch_across_one_json_member(tmp_path):
    """A one-shift tar: clip i's .npy and clip i+1's .npy have a header, a json member and a header between them."""
    from flexast.pipeline.datasource import TarSource

    source = TarSource("x", {}, [])
    a = [("s.tar", (1024, 5000))]
    assert source.touching(a, [("s.tar", (1024 + 5000 + 400 + 3 * 512, 7000))])
    assert not source.touching(a, [("s.tar", (1024 + 5000 + 100_000, 7000))])
    assert not source.touching(a, [("t.tar", (1024 + 5000 + 512, 7000))])
    assert source.touching([("s.tar", (20_000, 100))], [*a, ("s.tar", (19_000, 500))])  # b ends just before a


def test_read_ahead_cancels_what_the_consumer_leaves():
    """A consumer that stops after one item leaves k pending futures: they are cancelled, no more are made."""
    futs: list[Future] = []

    def start(i):
        futs.append(Future())  # pending, as a fetch still queued on the pool
        return futs[-1]

    gen = read_ahead(range(100), start, 4)
    first, _ = next(gen)
    gen.close()
    assert first == 0 and len(futs) == 5  # the first item and four ahead, no more
    assert [f.cancelled() for f in futs] == [False] + [True] * 4


def test_read_ahead_steps_is_validated():
    with pytest.raises(ConfigError, match=r"read_ahead_steps=-1"):
        StreamConfig(read_ahead_steps=-1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Four tar shards with member indexes and the same clips as a Zarr store, served with byte ranges."""
    from tests.pipeline.test_stream_remote import add_member_indexes

    path = tmp_path_factory.mktemp("ahead")
    write_shard_folder(path, n_shards=4, per_shard=10, zarr_store=True)
    add_member_indexes(path)
    with RangeServer(path) as server:
        yield path, server.url


def epoch(cfg: StreamConfig, source, epochs: int = 1):
    loader = make_stream(cfg, source)
    batches = [b for _ in range(epochs) for b in loader]
    return batches, loader.last_read


def assert_same_steps(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys == y.keys
        assert x.patch == y.patch
        assert torch.equal(x.n_frames, y.n_frames)
        assert torch.equal(x.frames, y.frames)  # same call, same shapes: bitwise
        assert torch.equal(x.labels, y.labels)


@pytest.mark.parametrize("fmt", ["tar", "zarr"])
def test_same_steps_with_and_without_read_ahead(served, fmt):
    """Tar by byte range and Zarr over HTTP, with augmentation and mixup: read-ahead 0 and 3 give the same
    steps and tensors; reading two steps per request group joins neighbouring ranges (fewer requests), with
    at most COALESCE_WASTE more bytes (gaps between them, fetched and dropped) and nothing fetched twice."""
    _, url = served
    source = open_source(f"{url}/index.json", format=fmt)
    assert source.remote
    off, read_off = epoch(StreamConfig(**BASE_AUG, read_ahead_steps=0), source, epochs=2)
    on, read_on = epoch(StreamConfig(**BASE_AUG, read_ahead_steps=3), source, epochs=2)
    assert len(off) > 4  # more steps than the window
    assert_same_steps(off, on)
    assert 0 < read_off["bytes"] <= read_on["bytes"] <= (1 + COALESCE_WASTE) * read_off["bytes"]
    assert read_on.get("requests", 0) <= read_off.get("requests", 0)


def test_read_ahead_holds_at_most_k_steps_ahead(served):
    """Over HTTP, while the consumer has received h steps, the fetches begun cover at most h + k + 1 steps
    (before the first step arrives: k + 1), so at most k steps of features wait beside the one being built;
    each fetch covers whole steps, in order, every clip once."""
    _, url = served
    source = open_source(f"{url}/index.json", format="tar")
    for k in (2, 5):
        fetched, handed = [], [0]
        fetch = source.fetch

        def logged(wanted, counters=None, fetch=fetch, fetched=fetched, handed=handed):
            fetched.append((handed[0], len(wanted)))  # steps the consumer had when this fetch began; its clips
            return fetch(wanted, counters)

        source.fetch = logged
        loader = make_stream(StreamConfig(**BASE, read_ahead_steps=k), source)
        for _ in loader:
            handed[0] += 1
        del source.fetch
        clips = [len(plan.items) for _, plan in loader.plan(0)]
        assert len(clips) > k + 2
        bounds = list(itertools.accumulate(clips))  # clips fetched once the first j + 1 steps are
        begun = list(itertools.accumulate(n for _, n in fetched))
        assert begun[-1] == bounds[-1]  # every clip fetched once
        for (n_handed, _), total in zip(fetched, begun, strict=True):
            assert total in bounds  # whole steps
            assert bounds.index(total) + 1 <= n_handed + k + 1


def test_resume_is_unchanged_by_read_ahead(served):
    """state_dict counts handed-out steps, not fetched ones: a resumed loader finishes the epoch exactly."""
    _, url = served
    cfg = StreamConfig(**BASE_AUG, read_ahead_steps=4)
    full = list(make_stream(cfg, f"{url}/index.json"))
    first = make_stream(cfg, f"{url}/index.json")
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state["position"] == 3
    resumed = make_stream(cfg, f"{url}/index.json")
    resumed.load_state_dict(state)
    assert_same_steps(full, head + list(resumed))


def test_workers_with_read_ahead_give_the_same_steps(served):
    """Two DataLoader worker processes reading ahead give the in-process sequence and the same counters."""
    _, url = served
    cfg = StreamConfig(**BASE_AUG, num_workers=2, read_ahead_steps=3)
    procs = make_loader(cfg, f"{url}/index.json")
    here = make_stream(StreamConfig(**{**BASE_AUG, "num_workers": 2, "read_ahead_steps": 0}), f"{url}/index.json")
    assert_same_steps(list(here), list(procs))
    assert here.last_read["bytes"] <= procs.last_read["bytes"] <= (1 + COALESCE_WASTE) * here.last_read["bytes"]


def test_read_ahead_error_surfaces_at_its_step(served):
    """A shard that stays unreadable is named when its step is reached, as without read-ahead."""
    _, url = served
    with (
        FaultProxy(url, rate=1.0, kinds=["503"], only="train-000002.tar") as proxy,
        pytest.raises(ShardError, match=r"train-000002\.tar.*failed after 1 retries"),
    ):
        list(make_stream(StreamConfig(**{**BASE, "retries": 1, "read_ahead_steps": 4}), f"{proxy.url}/index.json"))
