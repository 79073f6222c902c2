"""The one config engine: typed coercion, every problem at once with its path, the class's own checks collected."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from flexast.model.ast import ModelConfig
from flexast.model.errors import ModelConfigError
from flexast.pipeline.config_schema import apply_override, build, from_mapping, raise_all
from flexast.pipeline.errors import ConfigError


@dataclass
class Inner:
    size: tuple[int, int] = (1, 1)
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    rate: float = 0.5
    names: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    on: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1:
            raise ConfigError(f"rate={self.rate} must be in [0, 1]")


def test_values_are_coerced_to_the_declared_types():
    obj = from_mapping(Outer, {"rate": "0.25", "names": ("x", 3), "inner": {"size": [2, "3"]}, "on": "yes"}, "keys")
    assert obj == Outer(rate=0.25, names=["x", "3"], inner=Inner(size=(2, 3)), on=True)
    assert isinstance(obj.inner.size, tuple)


def test_every_problem_is_reported_at_once_with_its_path():
    errors: list[str] = []
    build(Outer, {"rate": "fast", "bogus": 1, "inner": {"size": [1, 2, 3], "mode": "c", "nope": 0}}, "sec", errors)
    text = "\n".join(errors)
    for needle in (
        "sec.rate: expected a number, got 'fast'",
        "sec.bogus: unknown key",
        "sec.inner.size: expected 2 values, got [1, 2, 3]",
        "sec.inner.mode: 'c' is not one of ['a', 'b']",
        "sec.inner.nope: unknown key",
    ):
        assert needle in text, text
    assert len(errors) == 5
    with pytest.raises(ConfigError, match=r"src: 5 config error\(s\)"):
        raise_all(errors, "src")


def test_the_class_own_checks_are_collected_with_unknown_keys():
    with pytest.raises(ConfigError) as err:
        from_mapping(Outer, {"rate": 3, "colour": "red", "names": {"a": 1}}, "Outer keys")
    msg = str(err.value)
    assert "unknown Outer keys: ['colour']" in msg and "names: expected a list" in msg and "rate=3" in msg


def test_text_overrides_are_typed():
    obj, errors = Outer(), []
    apply_override(obj, "names", "a, b", errors)
    apply_override(obj, "inner.size", "4,5", errors)
    apply_override(obj, "inner.mode", "z", errors)
    apply_override(obj, "inner.deep.x", "1", errors)
    assert obj.names == ["a", "b"] and obj.inner.size == (4, 5)
    assert errors == [
        "inner.mode: 'z' is not one of ['a', 'b']",
        "--set inner.deep: unknown key (valid keys: ['mode', 'size'])",
    ]


def test_model_config_reads_through_the_same_engine():
    cfg = ModelConfig(num_classes=3, embed_dim=64, num_heads=4, base_patch=(16, 8))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # base_patch comes back a tuple
    with pytest.raises(ModelConfigError) as err:
        ModelConfig.from_dict({"width": 3, "depth": "deep", "num_heads": 5})
    msg = str(err.value)
    assert "unknown ModelConfig keys: ['width']" in msg and "depth: expected an integer" in msg
    assert "not divisible by num_heads=5" in msg
    assert isinstance(err.value, ConfigError)
