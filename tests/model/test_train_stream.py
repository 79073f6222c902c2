"""``data.source: stream``: training from shards through pipeline.loader, with exact resume."""

from __future__ import annotations

import pytest
import torch

from flexast.model.train import Trainer
from tests.factories import write_shard_folder
from tests.model.train_helpers import tiny_run_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream_shards")
    write_shard_folder(out, n_shards=2, per_shard=10, shifts_ms=(10.0, 20.0), n_mels=16, n_classes=5)
    return str(out)


def cfg_for(shards, out):
    return tiny_run_config(
        out,
        {"name": "flexiast", "patch_sizes": [4, 8]},
        steps=8,
        data={
            "train": shards,
            "source": "stream",
            "loader": {
                "label_mode": "multi_hot",
                "budget_tokens": 48,
                "max_frames": 40,
                "resolution": {"kind": "random", "shifts_ms": [10, 20]},
            },
        },
        model={"n_mels": 16, "base_patch": [4, 4]},
        run={"ckpt_every": 3},
    )


def test_stream_training_runs_and_resumes_exactly(shards, tmp_path):
    full = Trainer(cfg_for(shards, tmp_path / "full"))
    full.setup()
    result = full.train()
    full.cleanup()
    assert result["steps"] == 8 and result["flops"] > 0
    part = Trainer(cfg_for(shards, tmp_path / "part"))
    part.setup()
    part.train(stop_after=4)  # killed after step 4; the checkpoint is at step 3
    part.cleanup()
    resumed = Trainer(cfg_for(shards, tmp_path / "part"), resume=True)
    resumed.setup()
    assert resumed.state.step == 3
    resumed.train()
    resumed.cleanup()
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(v, resumed.model.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)
