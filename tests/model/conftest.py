"""Fixtures of the model tests: peers (timm's patch_embed module, transformers' AST) loaded without torchvision."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def timm_patch_embed():
    """timm's own ``timm/layers/patch_embed.py``, loaded without running ``timm/__init__`` or ``timm/layers/__init__``.

    Those package inits import torchvision, whose compiled ops fail against the CPU torch here. Stub parent
    packages whose ``__path__`` points at the real folders let the module's relative imports (``.format``,
    ``.helpers``, ``.trace_utils``) load the real sibling files.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    saved = {k: sys.modules.get(k) for k in ("timm", "timm.layers")}
    try:
        for name, path in (("timm", root), ("timm.layers", root / "layers")):
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]
            sys.modules[name] = stub
        file = root / "layers" / "patch_embed.py"
        mod_spec = importlib.util.spec_from_file_location("timm.layers.patch_embed", file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # any failure: the peer is unavailable
        pytest.skip(f"could not load timm/layers/patch_embed.py without timm's package init: {exc!r}")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k in [k for k in sys.modules if k.startswith("timm.layers.")]:
            sys.modules.pop(k, None)
    return module


@pytest.fixture(scope="session")
def hf_ast():
    """transformers' AST classes, imported with torchvision hidden.

    transformers imports torchvision when it is installed, and torchvision's compiled ops fail against the CPU
    torch here (``operator torchvision::nms does not exist``). Hiding it for the import (``sys.modules`` entry
    None makes ``find_spec`` report it absent) lets the AST modules load; the entry is restored afterwards.
    """
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    hide = "torchvision" not in sys.modules
    if hide:
        sys.modules["torchvision"] = None
    try:
        import transformers
        from transformers.utils import import_utils

        import_utils.is_torchvision_available.cache_clear()  # another test may have imported transformers first

        classes = types.SimpleNamespace(
            ASTConfig=transformers.ASTConfig, ASTForAudioClassification=transformers.ASTForAudioClassification
        )
    except Exception as exc:  # any failure: the peer is unavailable
        pytest.skip(f"could not import transformers' ASTForAudioClassification: {exc!r}")
    finally:
        if hide:
            sys.modules.pop("torchvision", None)
    return classes
