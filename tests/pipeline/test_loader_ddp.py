"""Two gloo processes, uneven shards, every source: equal steps per rank, every clip exactly once, and the
loader's one collective never interleaves with the trainer's own all-reduces (the hang of issue 16)."""

from __future__ import annotations

import json
import os

import pytest
import torch.multiprocessing as mp

from tests.conftest import start_gloo

CFG = {
    "budget_tokens": 96,
    "patches": [[4, 4], [8, 8]],
    "pack_buffer": 6,
    "shuffle_buffer": 4,
    "max_frames": 80,
    "resolution": {"kind": "random"},
    "num_workers": 2,
    "seed": 3,
}
KINDS = ("tar", "zarr", "memory")


def _rank(rank: int, world: int, folder: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    start_gloo(rank, world, out)
    from flexast.pipeline.datasource import MemorySource, open_source
    from flexast.pipeline.loader import make_stream

    for kind in KINDS:
        source = open_source(folder, format="zarr" if kind == "zarr" else "tar")
        if kind == "memory":
            source = MemorySource.cache(source)
        # two workers' slots, run in this process (DataLoader workers give the same sequence: test_stream.py)
        loader = make_stream(CFG, source, rank=rank, world_size=world)
        result = {"announced": [], "steps": []}
        for epoch in range(2):
            result["announced"].append(loader.steps_in_epoch(epoch))
            keys = []
            for batch in loader:  # the trainer's own collective after every step, as in model.train
                t = torch.tensor([batch.total_tokens], dtype=torch.float64)
                dist.all_reduce(t)
                keys.append(batch.keys)
            result["steps"].append(keys)
        with open(os.path.join(out, f"{kind}-{rank}.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    from tests.factories import write_shard_folder

    out = tmp_path_factory.mktemp("uneven")
    # 5 shards for 2 ranks x 2 workers: one rank reads 3 shards, the other 2, of clips 0.3 to 3 s long.
    index = write_shard_folder(out, n_shards=5, per_shard=5, max_seconds=3.0, zarr_store=True, seed=4)
    keys = sorted(f"clip{s:03d}{i:04d}" for s in range(5) for i in range(5))
    return str(out), index, keys


def test_two_gloo_processes_equal_steps_every_clip_once(uneven, tmp_path):
    folder, _, keys = uneven
    mp.spawn(_rank, args=(2, folder, str(tmp_path)), nprocs=2, join=True)
    first = None
    for kind in KINDS:
        r = [json.loads((tmp_path / f"{kind}-{k}.json").read_text()) for k in range(2)]
        for epoch in range(2):
            a, b = r[0]["steps"][epoch], r[1]["steps"][epoch]
            assert len(a) == len(b) == r[0]["announced"][epoch] == r[1]["announced"][epoch], kind
            seen = [k for step in a + b for k in step]
            assert sorted(seen) == keys, f"{kind}: every clip exactly once over the two ranks"
        assert r[0]["steps"][0] != r[0]["steps"][1], "a new epoch, a new order"
        first = first or r
        assert r == first, f"{kind} gives the tar source's steps"
