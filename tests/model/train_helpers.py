"""Shared pieces of the training tests: a tiny run config and a held-out loss to compare before/after."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexast.model.config import from_dict
from flexast.model.data import eval_config
from flexast.pipeline.loader import make_stream
from flexast.pipeline.resolution import TimeScale
from tests.model.model_helpers import tiny_config

_TINY = tiny_config()  # the one tiny model of the tests, as a run config's model section
TINY_MODEL = {
    "preset": "custom",
    "embed_dim": _TINY.embed_dim,
    "depth": _TINY.depth,
    "num_heads": _TINY.num_heads,
    "n_mels": _TINY.n_mels,
    "base_patch": list(_TINY.base_patch),
}


def tiny_run_config(out_dir, recipe: dict, steps: int = 30, **sections) -> object:
    raw = {
        "run": {
            "out_dir": str(out_dir),
            "progress": False,
            "tensorboard": False,
            "log_every": 1,
            "seed": 0,
            "threads": 1,
        },
        "data": {
            "loader": {
                "label_mode": "index",
                "max_frames": 64,
                "budget_tokens": 256,
                "resolution": {"kind": "fixed", "shift_ms": 10.0},
            }
        },
        "model": dict(TINY_MODEL, pool="mean"),
        "recipe": recipe,
        "optim": {"lr": 2e-3, "steps": steps, "warmup_steps": 2, "schedule": "cosine", "epochs": 0},
    }
    for name, values in sections.items():
        _merge(raw.setdefault(name, {}), values)
    return from_dict(raw)


def _merge(into: dict, values: dict) -> None:
    """``values`` over ``into``, mapping by mapping (``data={"loader": {...}}`` keeps the other loader keys)."""
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict) and k != "resolution":
            _merge(into[k], v)
        else:
            into[k] = v


@torch.no_grad()
def mean_loss(model, data, patch=(8, 8), max_frames=64) -> float:
    """Cross-entropy of ``model`` over every clip of ``data`` (eval mode, centre cuts, 10 ms)."""
    model.eval()
    n_mels = int(data.index["n_mels"])
    loader = make_stream(eval_config(patch, TimeScale(10.0), max_frames, n_mels, single=True, budget=100000), data)
    total, n = 0.0, 0
    for b in loader:
        total += float(F.cross_entropy(model(b), b.labels, reduction="sum"))
        n += b.n_clips
    model.train()
    return total / n
