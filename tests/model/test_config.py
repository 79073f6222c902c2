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
