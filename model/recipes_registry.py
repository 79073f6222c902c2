"""Built-in recipes: the YAML files of ``configs/``, shipped in the wheel as ``flexast.configs``.

``--config X`` resolves as torchtune resolves its configs: ``X`` is a file if one exists at that path,
otherwise the name of a built-in recipe (``demo`` or ``demo.yaml``). ``configs/`` in the repository is the
only copy; a wheel carries it as package data, so the same names work from any directory.

    model ls                       list the built-in recipes and their first header line
    model cp NAME DEST             copy one out for editing (DEST a file or a folder)
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from flexast.pipeline.errors import ConfigError

PACKAGE = "flexast.configs"
SUFFIX = ".yaml"


def _folder() -> Path:
    """The folder holding the built-in recipes (an installed package is always a plain folder here)."""
    return Path(str(resources.files(PACKAGE)))


def builtin_recipes() -> list[str]:
    """Names of the built-in recipes, sorted (``demo``, ``ast_esc50``, ...), without ``.yaml``."""
    return sorted(p.name[: -len(SUFFIX)] for p in _folder().glob("*" + SUFFIX))


def builtin_recipe(name: str) -> Path:
    """The file of built-in recipe ``name`` (``demo`` or ``demo.yaml``).

    Raises:
        ConfigError: ``name`` is not a built-in recipe; the message lists the names there are.
    """
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    names = builtin_recipes()
    if stem not in names:
        raise ConfigError(f"{name!r} is not a built-in recipe; built-in recipes: {names} (or give a YAML file path)")
    return _folder() / (stem + SUFFIX)


def resolve_config(path_or_name: str | Path) -> Path:
    """``path_or_name`` if such a file exists, else the built-in recipe of that name.

    Raises:
        ConfigError: neither a file nor a built-in recipe; names the argument and lists the built-in recipes.
    """
    path = Path(path_or_name)
    if path.is_file():
        return path
    text = str(path_or_name)
    if "/" not in text and "\\" not in text and text.removesuffix(SUFFIX) in builtin_recipes():
        return builtin_recipe(text)
    raise ConfigError(
        f"config file not found: {text} (not a file, and not a built-in recipe; built-in recipes: "
        f"{builtin_recipes()}; `model ls` lists them)"
    )


def describe_recipes() -> list[tuple[str, str]]:
    """``(name, first header line)`` of every built-in recipe: the run command its header starts with."""
    out = []
    for name in builtin_recipes():
        first = (builtin_recipe(name).read_text().splitlines() or [""])[0]
        out.append((name, first.lstrip("# ").strip()))
    return out


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> Path:
    """Copy built-in recipe ``name`` to ``dest`` (a folder gets ``NAME.yaml`` inside); returns the written file.

    Raises:
        ConfigError: unknown name, or ``dest`` exists and ``force`` is false.
    """
    src = builtin_recipe(name)
    folder = str(dest).endswith(("/", "\\"))
    dest = Path(dest)
    if folder or dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not force:
        raise ConfigError(f"{dest} already exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest
