"""DDP on 2 CPU processes under gloo: identical weights and one set of outputs, with equal and unequal step
counts per rank, with and without gradient accumulation."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from flexast.pipeline.loader import StreamLoader
from tests.conftest import start_gloo


def _worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    start_gloo(rank, world, out)  # the trainer's Ranks.start reuses the group
    from flexast.model.train import Trainer
    from tests.factories import synthetic_clipset
    from tests.model.train_helpers import tiny_run_config

    data = synthetic_clipset(n_clips=24, seed=2)
    cfg = tiny_run_config(
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
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["step"] == r1["step"] == 6
    assert r0["first"] == r1["first"] and r0["sum"] == r1["sum"]  # gradients were averaged: weights identical
    assert r0["first_clip"] != r1["first_clip"]  # each rank trains on its own share of the steps
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "step_00000006").exists()


class _ShortOnRank1(StreamLoader):
    """The loader with rank 1's last two steps of every epoch removed: a stub for unequal step counts (the
    loader itself plans every rank the same count), so the trainer's own handling of them is what is tested."""

    def plan(self, epoch):
        cached = self._plan is not None and self._plan[0] == epoch
        steps = super().plan(epoch)
        if self.rank == 1 and not cached:
            steps = steps[: len(steps) - 2]
            self._plan = (epoch, steps, self._plan[2])
            self._lengths[epoch] = len(steps)
        return steps

    batches_seen = 0  # per process, over every loader of the run

    def __iter__(self):
        for batch in super().__iter__():
            _ShortOnRank1.batches_seen += 1
            yield batch


def _unequal_worker(rank: int, world: int, out: str, accum: int) -> None:
    torch.set_num_threads(1)
    start_gloo(rank, world, out)
    from flexast.model.train import Trainer
    from tests.factories import synthetic_clipset
    from tests.model.train_helpers import tiny_run_config

    class ShortTrainer(Trainer):
        def _setup_loader(self, d, phase):
            loader = super()._setup_loader(d, phase)
            loader.__class__ = _ShortOnRank1
            return loader

    data = synthetic_clipset(n_clips=40, seed=3)
    cfg = tiny_run_config(
        out,
        {"name": "flexiast", "patch_sizes": [8, 16]},
        steps=14,
        data={"loader": {"budget_tokens": 96}},
        optim={"grad_accum_tokens": accum},
    )
    tr = ShortTrainer(cfg, train_data=data)
    tr.setup()
    per_epoch = len(tr.loader)
    tr.train()
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "step": tr.state.step,
                "epoch": tr.state.epoch,
                "per_epoch": per_epoch,
                "batches": _ShortOnRank1.batches_seen,
                "params": flat.tolist(),
            },
            f,
        )
    tr.cleanup()


@pytest.mark.parametrize("accum", [0, 400], ids=["one-micro-step", "accumulate"])
def test_ddp_unequal_step_counts_finish_with_identical_weights(tmp_path, accum):
    """Rank 1 has 2 fewer batches per epoch than rank 0: both finish every step, across epoch ends (with
    accumulation an epoch ends before the last micro-step), and their weights stay bitwise identical."""
    mp.spawn(_unequal_worker, args=(2, str(tmp_path), accum), nprocs=2, join=True)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["per_epoch"] == r1["per_epoch"] + 2  # the stub really made the counts unequal
    assert r0["step"] == r1["step"] == 14 and r0["epoch"] == r1["epoch"] >= 1  # at least one epoch end crossed
    assert r1["batches"] < r0["batches"]
    assert r0["params"] == r1["params"]  # every step's gradients were averaged over both ranks
