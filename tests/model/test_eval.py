"""``model eval``: shard reading, sweeps, CSV, the Table-1-shaped Markdown table and the PNG plots."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from flexast.model.ast import ASTModel
from flexast.model.checkpoint import save_checkpoint
from flexast.model.cli import main
from flexast.model.data import eval_config, open_data
from flexast.model.evaluate import GridSpec, run_eval, score_source
from flexast.model.metrics import classification_metrics
from flexast.pipeline.loader import make_stream
from flexast.pipeline.resolution import TimeScale
from tests.factories import write_shard_folder
from tests.model.model_helpers import tiny_config


def tiny_model(base=(4, 4), seed=0, n_classes=5):
    """A 16-wide, 1-deep mean-pooled model on 16 mel bins, strides equal to the patch."""
    torch.manual_seed(seed)
    strides = dict(base_patch=base, fstride=base[0], tstride=base[1])
    return ASTModel(tiny_config(num_classes=n_classes, n_mels=16, embed_dim=16, depth=1, pool="mean", **strides))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    index = write_shard_folder(out, n_shards=2, per_shard=6, shifts_ms=(10.0, 20.0), n_mels=16, n_classes=5)
    return out, index


def test_open_data_in_memory_matches_the_index(shards):
    out, index = shards
    data = open_data(str(out), "--data", "memory")
    recs = [r for sh in data.shards for r in data.records(sh)]
    assert len(recs) == index["total_samples"] == data.n_clips
    assert data.label_names == index["labels"]["names"] and data.index["n_mels"] == 16
    assert sum(r["loc"]["s10"].shape[0] for r in recs) == sum(s["frames"]["s10"] for s in index["shards"])


def test_eval_loader_cuts_never_pads_and_covers_every_clip(shards):
    data = open_data(str(shards[0]), "--data", "memory")
    frames = {r["key"]: r["meta"]["frames"]["s10"] for sh in data.shards for r in data.records(sh)}
    opts = eval_config((4, 4), TimeScale(10.0), 40, 16, single=False, budget=64)
    seen = []
    for b in make_stream(opts, data):
        seen += b.keys
        for k, n in zip(b.keys, b.n_frames.tolist(), strict=True):
            assert n == max(4, min(40, frames[k]) // 4 * 4)  # cut to the cap, trimmed to whole patches, never longer
    assert sorted(seen) == sorted(frames)


def test_scores_do_not_depend_on_packing(shards):
    data = open_data(str(shards[0]), "--data", "stream")
    model = tiny_model()
    a = score_source(model, data, patch=(4, 4), max_frames=40, budget=40)
    b = score_source(model, data, patch=(4, 4), max_frames=40, budget=100000)
    order = [b["keys"].index(k) for k in a["keys"]]
    np.testing.assert_allclose(a["scores"], b["scores"][order], atol=1e-5)
    m = classification_metrics(a["scores"], a["targets"])
    assert 0.0 <= m["mAP"] <= 1.0


def test_run_eval_writes_csv_table_and_plots(shards, tmp_path):
    data_dir = str(shards[0])
    for name, seed in (("a", 0), ("b", 1)):
        save_checkpoint(tiny_model(seed=seed), tmp_path / name / "final" / "model.safetensors")
    spec = GridSpec(
        patch_sizes=(4, 8, 16), shifts_ms=(10.0, 20.0), pool_factors=(2,), max_lengths=(20, 50), base_max_frames=60
    )
    out = run_eval(
        [str(tmp_path / "a" / "final"), str(tmp_path / "b" / "final")],
        data_dir,
        tmp_path / "ev",
        spec,
        names=["AST-a", "FlexiAST-b"],
    )
    rows = list(csv.DictReader((tmp_path / "ev" / "results.csv").read_text().splitlines()))
    assert len(rows) == 2 * (3 + 2 + 1 + 2)
    assert {r["model"] for r in rows} == {"AST-a", "FlexiAST-b"}
    table = (tmp_path / "ev" / "table.md").read_text()
    header = table.splitlines()[0]
    assert header.startswith("| mAP by patch size |") and "| 4 | 8 | 16 |" in header
    assert "| AST-a |" in table and "| FlexiAST-b |" in table and "| chance |" in table
    for name in ("metric_vs_patch.png", "metric_vs_resolution.png", "metric_vs_length.png"):
        png = (tmp_path / "ev" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert out["metric"] == "mAP"


def test_eval_cli(shards, tmp_path, capsys):
    save_checkpoint(tiny_model(), tmp_path / "m" / "final" / "model.safetensors")
    code = main(
        [
            "eval",
            "--checkpoint",
            str(tmp_path / "m" / "final"),
            "--data",
            str(shards[0]),
            "--out",
            str(tmp_path / "ev"),
            "--patches",
            "4,8",
            "--lengths",
            "30",
            "--max-frames",
            "60",
        ]
    )
    assert code == 0
    assert "mAP by patch size" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "ev" / "results.csv").read_text().splitlines()))
    assert [r["sweep"] for r in rows] == ["patch", "patch", "length"]
    json.dumps(rows)
