"""DDP on 2 CPU processes under gloo: equal steps on both ranks, identical weights, one set of outputs."""

from __future__ import annotations

import json
import os

import torch
import torch.multiprocessing as mp

from tests.conftest import free_port


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from flexast.model.train import Trainer
    from tests.factories import synthetic_clipset
    from tests.model.train_helpers import tiny_config

    data = synthetic_clipset(n_clips=24, seed=2)
    cfg = tiny_config(
        out,
        {"name": "flexiast", "patch_sizes": [8, 16]},
        steps=6,
        run={"ckpt_every": 3},
        optim={"grad_accum_tokens": 300},
    )
    tr = Trainer(cfg, train_data=data)
    tr.setup()
    tr.train()
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "step": tr.state.step,
                "sum": float(flat.double().sum()),
                "first": flat[:50].tolist(),
                "first_clip": tr.loader.plan(0)[0][1].items[0]["key"],
            },
            f,
        )
    tr.cleanup()


def test_ddp_two_gloo_processes(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["step"] == r1["step"] == 6
    assert r0["first"] == r1["first"] and r0["sum"] == r1["sum"]  # gradients were averaged: weights identical
    assert r0["first_clip"] != r1["first_clip"]  # each rank trains on its own share of the steps
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "step_00000006").exists()
