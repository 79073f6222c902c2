"""Atomic full-state training checkpoints, and exact resume.

A step checkpoint is the folder ``checkpoints/step_XXXXXXXX/``:
    model.safetensors (+ .json)   weights and model config (``model.checkpoint``: no code execution to load)
    train_state.pt                optimizer state, EMA weights and torch RNG states: tensors and plain
                                  containers only, loaded with ``torch.load(..., weights_only=True)``
    state.json                    step, stage, stage step, epoch, loader position, FLOPs and tokens so far
    config.yaml                   the resolved run config
It is written under ``.tmp-step_XXXXXXXX`` and renamed when complete, so a kill at any moment leaves
either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flexast.model.config import Config, save_config
from flexast.model.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class TrainState:
    """Counters that, with the weights, optimizer and RNG, determine the rest of a run."""

    step: int = 0  # optimizer updates so far (all stages)
    stage: int = 0  # index of the current stage (coarse-to-fine phase)
    stage_step: int = 0  # updates within the stage (drives the lr schedule)
    epoch: int = 0  # epochs completed (counted over all stages; names the epoch_XXXX checkpoints)
    loader: dict = field(default_factory=dict)
    flops: float = 0.0
    tokens: int = 0

    def rng_state(self, device: torch.device) -> dict:
        out = {"torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            out["cuda_rng"] = torch.cuda.get_rng_state(device)
        return out

    def restore_rng(self, saved: dict, device: torch.device) -> None:
        if "torch_rng" in saved:
            torch.set_rng_state(saved["torch_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in saved:
            torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)


def save_train_state(
    root: Path,
    state: TrainState,
    extra: dict,
    save_weights: Callable[[Path], object],
    cfg: Config,
    device: torch.device,
    keep_last: int = 3,
) -> Path:
    """Write ``root/step_<step>`` atomically; keep only the newest ``keep_last`` step checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp)
    torch.save({**extra, **state.rng_state(device)}, tmp / "train_state.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
    save_config(cfg, tmp / "config.yaml")
    for f in tmp.iterdir():  # make the contents durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
        for old in steps[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_step_checkpoint(root: Path) -> Path | None:
    """The newest complete ``step_*`` folder under ``root`` (temporary folders are ignored)."""
    if not root.exists():
        return None
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").exists())
    return steps[-1] if steps else None


def load_train_state(path: Path) -> TrainState:
    """The counters of the step checkpoint folder ``path`` (its ``state.json``).

    Raises:
        CheckpointError: naming the file, when it is missing, not JSON, or holds other keys.
    """
    file = path / "state.json"
    try:
        return TrainState(**json.loads(file.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: not a flexast training state ({type(exc).__name__}: {exc})") from exc


def load_train_extra(path: Path, device: torch.device | str = "cpu") -> dict:
    """Optimizer, EMA and RNG states of the step checkpoint folder ``path`` (its ``train_state.pt``).

    Read with ``torch.load(weights_only=True)``: tensors and plain containers only, never code.

    Raises:
        CheckpointError: naming the file, when it is missing, unreadable, or holds anything else (a pickled
            object: the file was not written by flexast, or was tampered with; do not load it another way).
    """
    file = path / "train_state.pt"
    try:
        state = torch.load(file, map_location=device, weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file}: missing (an incomplete step checkpoint?)") from exc
    except Exception as exc:  # torch's UnpicklingError text advises weights_only=False: never the fix here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{file}: refused, not a plain-tensor training state written by flexast ({type(exc).__name__}"
            + (f": {first[:200]}" if first else "")
            + ")"
        ) from exc
    if not isinstance(state, dict) or "optimizer" not in state:
        raise CheckpointError(f"{file}: not a flexast training state (no 'optimizer' entry)")
    return state
