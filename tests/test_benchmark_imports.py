"""Every name the benchmark scripts import from flexast exists: their imports sit inside functions, so a rename in
the package would otherwise surface only when someone next runs that section."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))


def flexast_imports(path: Path) -> list[tuple[str, str, int]]:
    """``(module, name, line)`` of every ``from flexast... import name`` anywhere in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flexast"):
            out += [(node.module, alias.name, node.lineno) for alias in node.names]
    return out


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_imports_resolve(path):
    missing = []
    for module, name, line in flexast_imports(path):
        mod = importlib.import_module(module)
        if not hasattr(mod, name):
            try:  # a submodule: from flexast.model import step
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{path.name}:{line}: {module}.{name}")
    assert not missing, missing


def test_the_check_sees_function_level_imports():
    """The walk finds imports inside functions (where the benchmarks keep theirs)."""
    found = flexast_imports(Path(__file__).parent.parent / "benchmarks" / "stream.py")
    assert ("flexast.model.recipes", "plan_phases") in [(m, n) for m, n, _ in found]  # in memory_demo_section
