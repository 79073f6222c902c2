"""One engine that reads every flexast config: dataclasses from plain data, coerced, all errors at once.

Every config in the package is a dataclass: the run config (``model.config``, nested sections), the model
config (``model.ast.ModelConfig``), the build, stream and fbank options. They are read from YAML, JSON,
``--set key=value`` text or keyword arguments through this module, which

* coerces each value to the field's declared type (``"1e-4"`` → ``1e-4`` for a float, ``"8,16"`` → ``[8, 16]``
  for a list from text, a list → a tuple), recursing into nested dataclasses;
* collects every unknown key, wrong type and bad value, with its dotted path, instead of stopping at the first;
* then raises one :class:`~pipeline.errors.ConfigError` (or a subclass the caller names) listing them all.

A dataclass's own ``__post_init__`` checks run when it is built; the :class:`ConfigError` they raise is
collected like the rest.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from flexast.pipeline.errors import ConfigError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def unknown_keys(cls, given) -> tuple[list[str], list[str]]:
    """``(unknown, known)``: the keys of ``given`` that are not fields of dataclass ``cls``, and the fields."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    return sorted(set(given) - set(known), key=str), known


def check_known_keys(cls, given, what: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` naming every key of ``given`` that is not a field of dataclass ``cls``, and the known ones."""
    unknown, known = unknown_keys(cls, given)
    if unknown:
        raise error(f"unknown {what}: {unknown} (known: {known})")


def coerce(value: Any, tp: Any, path: str, errors: list[str], from_text: bool = False, base: Any = None) -> Any:
    """``value`` converted to type ``tp``; problems are appended to ``errors`` with ``path``.

    ``from_text`` (a ``--set`` value): a comma-separated string is a list, an empty value the empty list.
    ``base``: for a nested dataclass, the instance whose values stand for the keys ``value`` leaves out.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            errors.append(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
            return _default(tp)
        return build(tp, value, path, errors, base=base)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], path, errors, from_text)
    if origin is Literal:
        if value not in args:
            errors.append(f"{path}: {value!r} is not one of {list(args)}")
            return args[0]
        return value
    if origin in (list, tuple):
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        elif from_text and value is None:  # `--set data.shifts_ms=`: the empty list
            value = []
        elif from_text and not isinstance(value, (list, tuple, dict)):  # `--set data.shifts_ms=10`: one element
            value = [value]
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected a list, got {type(value).__name__} {value!r}")
            return [] if origin is list else ()
        if not args:
            return list(value) if origin is list else tuple(value)
        if origin is list or args[-1] is Ellipsis:  # list[X] or tuple[X, ...]: every element an X
            items = [coerce(v, args[0], f"{path}[{i}]", errors, from_text) for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if len(value) != len(args):  # tuple[X, Y]: exactly that many
            errors.append(f"{path}: expected {len(args)} values, got {list(value)!r}")
            return tuple(value)
        pairs = zip(value, args, strict=True)
        return tuple(coerce(v, a, f"{path}[{i}]", errors, from_text) for i, (v, a) in enumerate(pairs))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        errors.append(f"{path}: expected true/false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, bool):
            errors.append(f"{path}: expected an integer, got {value!r}")
            return 0
        if isinstance(value, int):
            return value
        try:
            f = float(value)
            if f.is_integer():
                return int(f)
        except (TypeError, ValueError):
            pass
        errors.append(f"{path}: expected an integer, got {value!r}")
        return 0
    if tp is float:
        if isinstance(value, bool):
            errors.append(f"{path}: expected a number, got {value!r}")
            return 0.0
        try:
            number = float(value)
        except (TypeError, ValueError):
            errors.append(f"{path}: expected a number, got {value!r}")
            return 0.0
        if not math.isfinite(number):  # nan passes every range check; inf trains to a NaN loss
            errors.append(f"{path}: expected a finite number, got {value!r}")
            return 0.0
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            errors.append(f"{path}: expected a string, got {type(value).__name__} {value!r}")
            return ""
        return "" if value is None else str(value)
    return value


def _default(cls):
    """``cls()`` when its defaults are valid (keeps collecting errors after a bad section), else ``None``."""
    try:
        return cls()
    except (ConfigError, TypeError):
        return None


def _field_default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def build(cls, raw: Mapping, path: str, errors: list[str], what: str = "", base: Any = None):
    """An instance of dataclass ``cls`` from ``raw``, every problem appended to ``errors``.

    Args:
        cls: the dataclass.
        raw: field values by name (nested dataclass fields take mappings).
        path: dotted path of ``raw`` in the whole config ('' at the top), prefixed to every message.
        errors: where problems go.
        what: when given, unknown keys are reported in one line ``unknown {what}: [...]``; otherwise one
            line per key with its path.
        base: an instance whose values stand for the keys ``raw`` leaves out (a section's defaults in its
            parent, e.g. the run config's loader defaults), instead of ``cls``'s own defaults.
    """
    hints = typing.get_type_hints(cls)
    unknown, known = unknown_keys(cls, raw)
    if unknown and what:
        errors.append(f"unknown {what}: {unknown} (known: {known})")
    for key in unknown if not what else ():
        where = f"{path}.{key}" if path else str(key)
        errors.append(f"{where}: unknown key (valid keys of {path or 'the top level'}: {known})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key in known:
            inner = _field_default(fields[key]) if dataclasses.is_dataclass(hints[key]) else None
            kwargs[key] = coerce(value, hints[key], f"{path}.{key}" if path else str(key), errors, base=inner)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as exc:  # the dataclass's own checks, all at once
        errors.append(f"{path}: {exc}" if path else str(exc))
        return base if base is not None else _default(cls)


def parse_overrides(pairs: list[str]) -> list[tuple[str, str]]:
    """``["optim.lr=1e-4", …]`` as ``[(path, text), …]``; a pair without ``=`` is a ConfigError."""
    out, bad = [], []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            bad.append(pair)
        else:
            out.append((key.strip(), value.strip()))
    if bad:
        raise ConfigError(f"--set expects key=value (e.g. optim.lr=1e-4); got {bad}")
    return out


def apply_override(obj, path: str, text: str, errors: list[str]) -> None:
    """Set the field at dotted ``path`` of ``obj`` from ``--set`` text, coerced to the field's type."""
    import yaml

    parts = path.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(obj):
            errors.append(f"--set {path}: {'.'.join(parts[:i])} is not a section")
            return
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names:
            errors.append(f"--set {where}: unknown key (valid keys: {sorted(names)})")
            return
        if i == len(parts) - 1:
            tp = typing.get_type_hints(type(obj))[part]
            try:
                raw = text if tp is str else yaml.safe_load(text)
            except yaml.YAMLError as exc:
                errors.append(f"--set {where}: cannot parse {text!r}: {exc}")
                return
            setattr(obj, part, coerce(raw, tp, where, errors, from_text=True))
        else:
            obj = getattr(obj, part)


def revalidate(obj, path: str, errors: list[str]) -> None:
    """Run the own checks of ``obj``'s nested dataclasses again (after ``--set`` changed fields in place)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            where = f"{path}.{f.name}" if path else f.name
            revalidate(value, where, errors)
            if hasattr(value, "__post_init__"):
                try:
                    dataclasses.replace(value)
                except ConfigError as exc:
                    errors.append(f"{where}: {exc}")


def raise_all(errors: list[str], source: str = "", error: type[Exception] = ConfigError) -> None:
    """Raise one ``error`` listing every message of ``errors`` (nothing when there are none)."""
    prefix = f"{source}: " if source else ""
    if len(errors) == 1:  # one problem, one line
        raise error(f"{prefix}config error: {errors[0]}" if source else errors[0])
    if errors:
        lines = "\n  - ".join(errors)
        raise error(f"{prefix}{len(errors)} config error(s):\n  - {lines}")


def from_mapping(cls, raw: Mapping, what: str, error: type[Exception] = ConfigError):
    """Dataclass ``cls`` from ``raw``; unknown keys, wrong types and the class's own checks in one ``error``."""
    errors: list[str] = []
    obj = build(cls, raw, "", errors, what=what)
    raise_all(errors, error=error)
    return obj
