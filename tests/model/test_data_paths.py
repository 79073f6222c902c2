"""The model side of the one data path: data paths that name nothing fail before any step; a Zarr-only build
trains, evaluates and predicts; eval and predict score a clip alike; labels are matched by name; and an
epoch-driven run killed mid-epoch resumes to the same steps and weights from every source."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flexast.model.ast import ASTModel
from flexast.model.checkpoint import load_checkpoint
from flexast.model.data import norm_table, open_data, shifts_of
from flexast.model.evaluate import GridSpec, run_eval, score_source
from flexast.model.predict import Predictor
from flexast.model.run_dir import read_labels
from flexast.model.train import Trainer
from flexast.pipeline.datasource import MemorySource
from flexast.pipeline.errors import ConfigError
from tests.factories import build_small_shards, synthetic_clipset, write_shard_folder
from tests.model.model_helpers import tiny_config
from tests.model.train_helpers import tiny_run_config
from tests.tolerances import EPS16, assert_close_ulps

SMALL = {"n_mels": 16, "base_patch": [4, 4]}


def run_cfg(out, train, **data):
    return tiny_run_config(
        out,
        {"name": "ast", "patch": [4, 4]},
        steps=2,
        data={"train": train, "loader": {"label_mode": "multi_hot", "budget_tokens": 96, "max_frames": 40}, **data},
        model=SMALL,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("paths")
    write_shard_folder(out, n_shards=2, per_shard=8, shifts_ms=(10.0,), n_mels=16, n_classes=5, zarr_store=True)
    return str(out)


# ---- data paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["train", "valid"])
def test_a_data_path_naming_nothing_fails_before_any_step(folder, tmp_path, key):
    missing = str(tmp_path / "no_such_shards")
    data = {"valid": missing} if key == "valid" else {}
    tr = Trainer(run_cfg(tmp_path / "run", folder if key == "valid" else missing, **data))
    with pytest.raises(ConfigError, match=f"data.{key}=.*no_such_shards.*does not exist"):
        tr.setup()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_build_with_no_clips_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "index.json").write_text(json.dumps({"shards": [], "labels": {"names": ["a"]}}))
    with pytest.raises(ConfigError, match=r"data.train=.*empty.*lists no shards"):
        Trainer(run_cfg(tmp_path / "run", str(empty))).setup()


def test_an_epoch_without_steps_is_an_error_not_a_loop(tmp_path):
    short = str(tmp_path / "short")  # every clip 1 to 2 frames long, shorter than one 4-frame patch: no step
    write_shard_folder(short, n_shards=2, per_shard=3, shifts_ms=(10.0,), n_mels=16, min_seconds=0.03, max_seconds=0.04)
    cfg = run_cfg(tmp_path / "run", short)
    cfg.optim.steps, cfg.optim.epochs = 0, 2
    tr = Trainer(cfg)
    with pytest.raises(Exception, match="yields no step"):
        tr.setup()
        tr.train()
    assert not list((tmp_path / "run").glob("checkpoints/epoch_*"))


# ---- labels by name, training statistics ------------------------------------------------------------------


def relabelled(source: MemorySource, names: list[str], keep, rename=None) -> MemorySource:
    """The clips of ``source`` whose labels all satisfy ``keep``, under the vocabulary ``names`` (labels renamed
    by ``rename``)."""
    old = [(rename or {}).get(n, n) for n in source.label_names]
    shards = {}
    for sh in source.shards:
        recs = [r for r in source.records(sh) if all(keep(old[i]) for i in r["meta"]["label_ids"])]
        shards[sh.url] = [
            {**r, "meta": {**r["meta"], "label_ids": [names.index(old[i]) for i in r["meta"]["label_ids"]]}}
            for r in recs
        ]
    index = {**source.index, "labels": {"names": names, "counts": [1] * len(names)}}
    return MemorySource("held-out", index, shards)


def test_held_out_labels_are_matched_by_name():
    full = synthetic_clipset(n_clips=16, n_classes=4, n_mels=32, seed=3)
    torch.manual_seed(0)
    model = ASTModel(tiny_config(num_classes=4, n_mels=32, max_frames=128, embed_dim=16, depth=1, pool="mean"))
    vocab = full.label_names  # class0 … class3
    subset = relabelled(full, ["class3", "class1", "class2"], lambda n: n != "class0")  # no class0, other ids
    a = score_source(model, full, patch=(8, 8), max_frames=64, vocab=vocab, single=True)
    b = score_source(model, subset, patch=(8, 8), max_frames=64, vocab=vocab, single=True)
    assert 0 < len(b["keys"]) < len(a["keys"])
    pos = {k: i for i, k in enumerate(a["keys"])}
    order = [pos[k] for k in b["keys"]]
    np.testing.assert_array_equal(b["targets"], a["targets"][order])  # the model's ids, not the subset's
    # the subset packs its clips into other batches, whose matmul shapes may round one float32 ulp apart by CPU
    assert_close_ulps(b["scores"], a["scores"][order], ulps=16)
    unknown = relabelled(full, ["class9", "class1", "class2", "class3"], lambda n: True, {"class0": "class9"})
    with pytest.raises(ConfigError, match="class9"):
        score_source(model, unknown, patch=(8, 8), max_frames=64, vocab=vocab, single=True)
    tr = Trainer(tiny_run_config("/tmp/unused", {"name": "ast", "patch": [8, 8]}), train_data=full, valid_data=unknown)
    with pytest.raises(ConfigError, match=r"data.valid=.*\['class9'\]"):
        tr.setup()  # before any step


# ---- a Zarr-only build: train, evaluate, predict ------------------------------------------------------------


@pytest.fixture(scope="module")
def zarr_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("zarr_only")
    report = build_small_shards(root, n=6, shifts_ms=(10.0,), shard_samples=3, fmt="zarr")
    assert not list(Path(report.out).glob("*.tar"))
    return root, report


def test_a_zarr_only_build_trains_evaluates_and_predicts_alike(zarr_only, tmp_path):
    root, report = zarr_only
    cfg = tiny_run_config(
        tmp_path / "run",
        {"name": "ast", "patch": [16, 16]},
        steps=3,
        data={"train": report.out, "valid": report.out, "source": "stream",
              "loader": {"label_mode": "index", "budget_tokens": 1024, "max_frames": 128}},
        model={"n_mels": 128, "base_patch": [16, 16]},
    )  # fmt: skip
    tr = Trainer(cfg)
    tr.setup()
    result = tr.train()
    tr.cleanup()
    assert result["steps"] == 3 and result["valid"]["n_clips"] == report.index["total_samples"] == 6
    final = tmp_path / "run" / "final"
    ev = run_eval([str(final)], report.out, tmp_path / "ev", GridSpec(patch_sizes=(16,)))
    assert [r["n_clips"] for r in ev["rows"]] == [6]
    # The same clip gets the same scores from eval (shards, float16) and predict (audio, float32).
    info = read_labels(final)
    source = open_data(report.out, "--data", "stream")
    model = load_checkpoint(final)
    scored = score_source(model, source, patch=(16, 16), max_frames=10**4, vocab=info["names"], single=True,
                          norm=norm_table(info, shifts_of(source)))  # fmt: skip
    files = sorted(str(p) for p in (Path(root) / "audio").iterdir())
    preds = Predictor(final, "cpu").predict(files, patch=(16, 16), top_k=len(info["names"]))
    assert all(p.error is None for p in preds), [p.error for p in preds]
    for p in preds:
        key = os.path.basename(p.path).rsplit(".", 1)[0]
        got = dict((name, s) for name, _, s in p.labels)
        want = scored["scores"][scored["keys"].index(key)]
        assert_close_ulps([got[n] for n in info["names"]], want, ulps=4, eps=EPS16)


# ---- epoch-driven kill and resume, every source -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar", "zarr", "memory"])
def test_epoch_run_killed_mid_epoch_resumes_to_the_same_steps_and_weights(folder, tmp_path, kind):
    train = folder + "/store.zarr" if kind == "zarr" else folder
    loader = "memory" if kind == "memory" else "stream"

    def cfg(out):
        c = run_cfg(out, train, source=loader)
        c.optim.steps, c.optim.epochs, c.run.ckpt_every = 0, 2.5, 1
        return c

    full = Trainer(cfg(tmp_path / "full"))
    full.setup()
    total = full.total_steps
    full.train()
    full.cleanup()
    assert full.state.step == total and total > 4
    part = Trainer(cfg(tmp_path / "part"))
    part.setup()
    part.train(stop_after=total // 2 + 1)
    part.cleanup()
    resumed = Trainer(cfg(tmp_path / "part"), resume=True)
    resumed.setup()
    assert resumed.total_steps == total, "the run's length does not depend on the interruption"
    resumed.train()
    resumed.cleanup()
    assert resumed.state.step == total
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(v, resumed.model.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)
