"""Config schema: every error at once with key paths, typed --set overrides, every shipped YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexast.model.config import Config, from_dict, load_config, save_config
from flexast.pipeline.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_all_errors_reported_at_once_with_paths():
    raw = {"optim": {"lrr": 1e-4, "betas": [0.9]}, "modle": {}, "model": {"depth": "deep"}}
    with pytest.raises(ConfigError) as info:
        from_dict(raw, ["data.nope=3", "recipe.name=bogus"])
    msg = str(info.value)
    for needle in (
        "optim.lrr: unknown key",
        "modle: unknown key",
        "model.depth: expected an integer",
        "--set data.nope: unknown key",
        "recipe.name: 'bogus' is not one of",
        "optim.betas",
    ):
        assert needle in msg, msg
    assert "6 config error(s)" in msg


def test_overrides_are_coerced_to_field_types():
    cfg = from_dict(
        {"recipe": {"name": "coarse_to_fine", "phases": [{"method": "pool", "factor": 2, "steps": 5}]}},
        [
            "optim.lr=1e-4",
            "recipe.patch_sizes=8,16,32",
            "run.compile=true",
            "optim.steps=7",
            "run.out_dir=runs/x",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.recipe.patch_sizes == [8, 16, 32]
    assert cfg.run.compile is True and cfg.optim.steps == 7 and cfg.run.out_dir == "runs/x"
    assert cfg.recipe.phases[0].method == "pool"
    with pytest.raises(ConfigError, match="key=value"):
        from_dict({}, ["optim.lr"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="coarse_to_fine needs at least one phase"):
        from_dict({"recipe": {"name": "coarse_to_fine"}})
    with pytest.raises(ConfigError, match=r"recipe.phases\[0\]: give epochs"):
        from_dict({"recipe": {"name": "coarse_to_fine", "phases": [{"method": "fshift", "factor": 2}]}})


def test_resolved_config_round_trips(tmp_path):
    cfg = from_dict({"optim": {"lr": 3e-4}}, ["model.preset=small"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and isinstance(again, Config)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "model train --config" in path.read_text().split("\n\n")[0], path
    load_config(path)


def test_the_expected_recipes_exist():
    names = {p.name for p in CONFIGS}
    expected = {
        "ast_b16_audioset.yaml",
        "ast_esc50.yaml",
        "flexiast_vggsound.yaml",
        "flexiast_voxceleb_time_only.yaml",
        "elasticast_voxceleb_native.yaml",
        "elasticast_audioset_mixed_res.yaml",
        "c2f_fshift_4to1.yaml",
        "c2f_pool_421.yaml",
        "demo.yaml",
    }
    assert expected <= names, expected - names


def test_train_cli_reports_config_errors_and_exits_2(tmp_path, capsys):
    from flexast.model.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("# model train --config bad.yaml\nrun: {out_dir: x}\noptim: {lr: -1, warmup: 3}\n")
    assert main(["train", "--config", str(bad), "--set", "model.depth=two"]) == 2
    err = capsys.readouterr().err
    assert "optim.warmup: unknown key" in err and "optim.lr: must be > 0" in err and "model.depth" in err


# --- issue 12 item 9: values that must fail, each with one line naming the key or the file -------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan"])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, capsys, value):
    from flexast.model.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(f"run: {{out_dir: {tmp_path / 'run'}}}\n")
    assert main(["train", "--config", str(path), "--set", f"optim.lr={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.lr: expected a finite number" in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=r"optim.grad_clip: expected a finite number, got inf"):
        from_dict({"optim": {"grad_clip": float("inf")}})


def test_scalar_set_for_a_list_is_a_one_element_list():
    cfg = from_dict({}, ["optim.average=", "recipe.patch_sizes=16", "eval.patch_sizes="])
    assert cfg.optim.average == [] and cfg.recipe.patch_sizes == [16] and cfg.eval.patch_sizes == []
    with pytest.raises(ConfigError, match=r"recipe.patch_sizes: expected a list"):  # a YAML file says what it means
        from_dict({"recipe": {"patch_sizes": 16}})


class Payload:  # not a tensor: torch.load(weights_only=True) refuses to build it
    pass


def test_poisoned_train_state_names_the_file(tmp_path, capsys):
    import torch
    import yaml

    from flexast.model.cli import main
    from flexast.model.run_dir import RunDir
    from tests.factories import build_small_shards
    from tests.model.train_helpers import TINY_MODEL

    shards = build_small_shards(tmp_path / "data", n=6, shard_samples=3, features={"num_mel_bins": 32}).out
    out = tmp_path / "run"
    raw = {
        "run": {"out_dir": str(out), "progress": False, "tensorboard": False, "threads": 1, "ckpt_every": 1},
        "data": {"train": shards, "loader": {"label_mode": "index", "max_frames": 64, "budget_tokens": 256}},
        "model": dict(TINY_MODEL, pool="mean"),
        "recipe": {"name": "ast", "patch": [8, 8]},
        "optim": {"lr": 1e-3, "steps": 2, "warmup_steps": 1, "schedule": "constant", "epochs": 0},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path)]) == 0
    ckpt = RunDir(out).latest_step()
    poisoned = ckpt / "train_state.pt"
    torch.save({"optimizer": Payload()}, poisoned)
    before = poisoned.read_bytes()
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--resume", "--set", "optim.steps=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(poisoned) in err and "CheckpointError" in err and "weights_only=False" not in err, err
    assert poisoned.read_bytes() == before  # left as it was, for the user to look at


def test_the_data_section_is_the_loader_config():
    from flexast.pipeline.stream_config import StreamConfig

    cfg = from_dict({"data": {"loader": {"budget_tokens": 512, "label_mode": "index"}}})
    assert isinstance(cfg.data.loader, StreamConfig)
    # keys a YAML leaves out keep the run's defaults (pack_buffer 64, max_frames 1024), not only the loader's own
    assert (cfg.data.loader.budget_tokens, cfg.data.loader.pack_buffer, cfg.data.loader.max_frames) == (512, 64, 1024)
    with pytest.raises(ConfigError) as err:
        from_dict({"data": {"loader": {"mode": "diag", "mixup": 0.5}}}, ["data.loader.crop=sideways"])
    msg = str(err.value)
    assert "data.loader.mixup: unknown key" in msg and "mode='diag'" in msg and "crop='sideways'" in msg
