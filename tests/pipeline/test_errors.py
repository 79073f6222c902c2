"""One error root: every typed error of either half is a FlexastError, and both CLIs report it and exit 2."""

from __future__ import annotations

import inspect

import pytest

from flexast.model import errors as model_errors
from flexast.model.cli import main as model_main
from flexast.pipeline import errors as pipeline_errors
from flexast.pipeline.batch import PackedBatch
from flexast.pipeline.cli import main as pipeline_main
from flexast.pipeline.errors import BatchError, ConfigError, FlexastError, PackingError
from flexast.pipeline.packing import plan_packs


def _classes(module):
    return [c for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, Exception)]


def test_every_error_class_of_both_halves_derives_from_the_root():
    classes = _classes(model_errors) + _classes(pipeline_errors)
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, FlexastError), cls
    assert issubclass(model_errors.ModelConfigError, ConfigError)
    assert issubclass(model_errors.ModelConfigError, model_errors.ModelError)


def test_the_seam_and_the_packer_raise_typed_errors():
    import torch

    with pytest.raises(BatchError, match="'tiny'"):
        PackedBatch.from_clips([torch.zeros(3, 16)], torch.zeros(1, 2), ["tiny"], (16, 16))
    with pytest.raises(PackingError, match="budget must be positive, got 0"):
        plan_packs([4], 0)


def test_both_clis_report_a_config_error_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: fast}\n")
    assert model_main(["train", "--config", str(bad)]) == 2
    assert "ConfigError" in capsys.readouterr().err
    assert (
        pipeline_main(["build-shards", str(tmp_path / "none.csv"), "--out", str(tmp_path / "out"), "--shifts", "x"])
        == 2
    )
    assert "ConfigError" in capsys.readouterr().err
