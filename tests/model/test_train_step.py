"""One optimizer step: host↔device syncs counted per micro-step, and the non-finite guard (NaN in a shard, a huge
learning rate) through the real ``model train`` command."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from flexast.model import step as step_io
from flexast.model.cli import main
from flexast.model.config import save_config
from flexast.model.train import Trainer
from tests.factories import synthetic_clipset, write_shard_folder
from tests.model.sync_counter import CountedBatches, SyncCounter
from tests.model.train_helpers import tiny_run_config

RECIPES = {
    "flexiast": ({"name": "flexiast", "patch_sizes": [8, 16]}, {}),
    "elasticast": (  # attention pooling, token dropout, a factorised table, long clips beyond max_frames
        {"name": "elasticast", "patch": [8, 8]},
        {"model": {"pos_embed": "factorized", "pool": "attn", "token_dropout": 0.1}},
    ),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_one_host_sync_per_optimizer_step(name, tmp_path, monkeypatch):
    """A step of several micro-steps reads back from the device exactly once (loss and gradient norm together):
    no read per micro-step."""
    recipe, sections = RECIPES[name]
    cfg = tiny_run_config(
        tmp_path,
        recipe,
        steps=4,
        **{**sections, "data": {"loader": {"budget_tokens": 96}}, "optim": {"grad_accum_tokens": 250}},
    )
    tr = Trainer(cfg, train_data=synthetic_clipset(n_clips=40, seed=3))
    tr.setup()
    batches = list(iter(tr.loader))
    counter = SyncCounter(tr.model)
    monkeypatch.setattr(step_io, "to_device", counter.marking(step_io.to_device))
    tr.optimizer.step = counter.paused(tr.optimizer.step)
    steps = 0
    src = CountedBatches(batches)
    with counter:
        while src.drawn < len(batches) - 3:
            before = counter.count
            assert tr._update(src, tr.phases[0])
            steps += 1
            assert counter.count - before == 1, counter.where
    assert src.drawn >= 2 * steps  # several micro-steps per step: the one read is per step, not per micro-step
    assert counter.where[0].startswith("tolist at") and "step.py" in counter.where[0]


def _poison_shard(folder, key: str) -> None:
    """Write NaN into the 10 ms features of clip ``key`` inside its tar shard (as a corrupt build would)."""
    index = json.loads((folder / "index.json").read_text())
    for shard in index["shards"]:
        path = folder / shard["name"]
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        if not any(m.name.startswith(key + ".") for m, _ in members):
            continue
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for m, data in members:
                if m.name.startswith(key + ".") and m.name.endswith(".npy"):
                    a = np.load(io.BytesIO(data))
                    a[::4] = np.nan  # every 4th frame: any crop holds some
                    buf = io.BytesIO()
                    np.lib.format.write_array(buf, a, allow_pickle=False)
                    data = buf.getvalue()
                    m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
        return
    raise AssertionError(f"no clip {key}")


def _stream_cfg(shards, out, **optim):
    return tiny_run_config(
        out,
        {"name": "ast", "patch": [4, 4]},
        steps=30,
        data={
            "train": str(shards),
            "source": "stream",
            "loader": {"label_mode": "multi_hot", "budget_tokens": 48, "max_frames": 40},
        },
        model={"n_mels": 16, "base_patch": [4, 4]},
        optim=optim,
    )


def test_nan_in_a_shard_stops_training_naming_step_and_clip(tmp_path, capsys):
    shards = tmp_path / "shards"
    write_shard_folder(shards, n_shards=2, per_shard=6, shifts_ms=(10.0,), n_mels=16, n_classes=5)
    _poison_shard(shards, "clip0010002")
    save_config(_stream_cfg(shards, tmp_path / "run"), tmp_path / "cfg.yaml")
    assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NonFiniteError" in err and "step " in err and "clip0010002" in err, err
    assert not (tmp_path / "run" / "final").exists()  # no weights written from a poisoned run


def test_huge_learning_rate_stops_at_the_step_it_diverges(tmp_path, capsys):
    shards = tmp_path / "shards"
    write_shard_folder(shards, n_shards=2, per_shard=6, shifts_ms=(10.0,), n_mels=16, n_classes=5)
    save_config(
        _stream_cfg(shards, tmp_path / "run", lr=1e30, warmup_steps=0, schedule="constant"), tmp_path / "c.yaml"
    )
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "NonFiniteError: step 2:" in err, err  # step 1 is finite, and its update makes step 2's logits inf/NaN
    assert not (tmp_path / "run" / "final").exists()


def test_read_step_names_the_micro_step_when_logits_are_finite():
    import torch

    micro = [
        step_io.micro_record(["a", "b"], torch.tensor(0.5), torch.zeros(2, 3)),
        step_io.micro_record(["c"], torch.tensor(float("inf")), torch.zeros(1, 3)),
    ]
    with pytest.raises(step_io.NonFiniteError, match=r"step 7: the loss is inf \(clips of the micro-step: c\)"):
        step_io.read_step(7, torch.tensor(float("inf")), torch.tensor(1.0), micro)
    with pytest.raises(step_io.NonFiniteError, match=r"step 7: the gradient norm is nan \(clips of the step: a, b, c"):
        ok = step_io.micro_record(["c"], torch.tensor(0.1), torch.zeros(1, 3))
        step_io.read_step(7, torch.tensor(1.0), torch.tensor(float("nan")), [micro[0], ok])
