"""The run folder ``run.out_dir``: the one owner of every file's path, and of its reads and writes.

Layout::

    config.yaml                 the resolved run config
    metrics.jsonl               one JSON row per logged step and per evaluation (``metric_log``)
    tb/                         TensorBoard events, when TensorBoard is importable and ``run.tensorboard``
    checkpoints/step_XXXXXXXX/  full training state, atomic (below); the newest ``run.keep_last`` are kept
    checkpoints/epoch_XXXX/     weights at the end of each epoch (AST weight averaging reads them)
    phaseN/                     weights at the end of phase N (a one-phase recipe writes phase1/)
    final/  ema/  averaged/     weights to evaluate or predict with; EMA and epoch-averaged weights if asked for
    report.md  result.json      the human report and the final numbers

A *weights folder* (``final/``, ``epoch_*``, …) holds ``model.safetensors`` (+ ``model.json``, the format of
:mod:`model.checkpoint`), ``config.yaml`` (the run config) and ``labels.json`` (class names and the feature
recipe ``model predict`` needs). A *step checkpoint* is a weights folder plus:

    train_state.pt   optimizer state, EMA weights and torch RNG states: tensors and plain containers only,
                     loaded with ``torch.load(..., weights_only=True)``
    state.json       step, phase, phase step, epoch, loader position, FLOPs and tokens so far

It is written under ``.tmp-step_XXXXXXXX`` and renamed when complete, so a kill at any moment leaves either
the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from flexast.model.checkpoint import WEIGHTS, save_checkpoint, weights_path
from flexast.model.config import Config, save_config
from flexast.model.errors import CheckpointError

_OLD_NAMES = {"stage": "phase", "stage_step": "phase_step"}
STEP_DIR = re.compile(r"^step_(\d{8})$")
LABELS = "labels.json"


@dataclass
class TrainState:
    """Counters that, with the weights, optimizer and RNG, determine the rest of a run."""

    step: int = 0  # optimizer updates so far (all phases)
    phase: int = 0  # index of the current phase (:func:`model.recipes.plan_phases`)
    phase_step: int = 0  # updates within the phase (drives the lr schedule)
    epoch: int = 0  # epochs completed (counted over all phases; names the epoch_XXXX checkpoints)
    loader: dict = field(default_factory=dict)
    flops: float = 0.0
    tokens: int = 0


def rng_state(device: torch.device) -> dict:
    """The torch (and CUDA) generator states, to store in ``train_state.pt``."""
    out = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda_rng"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(saved: dict, device: torch.device) -> None:
    """Set the generators back to what :func:`rng_state` stored."""
    if "torch_rng" in saved:
        torch.set_rng_state(saved["torch_rng"].cpu())
    if device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)


def read_labels(checkpoint: str | Path) -> dict:
    """The ``labels.json`` saved with a checkpoint (beside its weights, or one folder up), or ``{}``."""
    folder = weights_path(checkpoint).parent
    for candidate in (folder / LABELS, folder.parent / LABELS):
        if candidate.exists():
            return json.loads(candidate.read_text())
    return {}


def save_weights(
    folder: str | Path, model: nn.Module, labels: dict, cfg: Config | None = None, extra: dict | None = None
) -> Path:
    """A weights folder: ``model.safetensors`` (+ ``.json``, with ``extra`` metadata), ``labels.json``, and
    ``config.yaml`` when the run config is given. Returns the safetensors path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(model, folder / WEIGHTS, extra)
    if cfg is not None:
        save_config(cfg, folder / "config.yaml")
    (folder / LABELS).write_text(json.dumps(labels, indent=1))
    return path


class RunDir:
    """Paths, reads and writes of one run folder (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.tensorboard = self.root / "tb"
        self.report = self.root / "report.md"
        self.result = self.root / "result.json"
        self.final = self.root / "final"
        self.ema = self.root / "ema"
        self.averaged = self.root / "averaged"

    def epoch(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}"

    def phase(self, index: int) -> Path:
        """Weights at the end of phase ``index`` (0-based; the folder is named from 1)."""
        return self.root / f"phase{index + 1}"

    def step(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    # ---- writes ---------------------------------------------------------------------------------

    def create(self, cfg: Config) -> None:
        """Make the folder and write the resolved config."""
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.config)

    def save_weights(self, folder: Path, model: nn.Module, cfg: Config, labels: dict) -> Path:
        """A weights folder of this run (see :func:`save_weights`)."""
        return save_weights(folder, model, labels, cfg)

    def save_step(
        self,
        state: TrainState,
        model: nn.Module,
        cfg: Config,
        labels: dict,
        extra: dict,
        device: torch.device,
        keep_last: int = 3,
    ) -> Path:
        """Write ``checkpoints/step_<step>`` atomically; keep only the newest ``keep_last`` step checkpoints.

        Args:
            extra: optimizer (and EMA) states for ``train_state.pt``; the RNG states are added here.
        """
        final = self.step(state.step)
        tmp = final.with_name(f".tmp-{final.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.save_weights(tmp, model, cfg, labels)
        torch.save({**extra, **rng_state(device)}, tmp / "train_state.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
        for f in tmp.iterdir():  # make the contents durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for old in self.step_checkpoints()[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def write_result(self, result: dict) -> None:
        self.result.write_text(json.dumps(result, indent=1, default=float))

    def remove(self) -> None:
        """Delete the whole folder (the demo starts each run clean)."""
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- reads ----------------------------------------------------------------------------------

    def step_checkpoints(self) -> list[Path]:
        """Every ``step_*`` folder, oldest first (temporary folders are ignored)."""
        if not self.checkpoints.exists():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if STEP_DIR.match(p.name))

    def latest_step(self) -> Path | None:
        """The newest complete step checkpoint, or ``None``."""
        steps = [p for p in self.step_checkpoints() if (p / "state.json").exists()]
        return steps[-1] if steps else None

    def epochs(self, first: int, last: int) -> list[Path]:
        """The epoch checkpoints ``first..last`` that exist."""
        return [p for p in (self.epoch(e) for e in range(first, last + 1)) if p.exists()]


def load_train_state(path: Path) -> TrainState:
    """The counters of the step checkpoint folder ``path`` (its ``state.json``).

    Raises:
        CheckpointError: naming the file, when it is missing, not JSON, or holds other keys.
    """
    file = path / "state.json"
    try:
        saved = json.loads(file.read_text())
        for old, new in _OLD_NAMES.items():  # checkpoints written before "stage" became "phase"
            if old in saved:
                saved[new] = saved.pop(old)
        if "stage_first_epoch" in saved.get("loader", {}):
            saved["loader"]["phase_first_epoch"] = saved["loader"].pop("stage_first_epoch")
        return TrainState(**saved)
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


def restore_train_extra(path: Path, device: torch.device, optimizer: torch.optim.Optimizer, ema=None) -> None:
    """Resume from the step checkpoint folder ``path``: its optimizer (and EMA, when both have one) states into
    ``optimizer`` / ``ema``, and its RNG states (:func:`load_train_extra`, :func:`restore_rng`)."""
    saved = load_train_extra(path, device)
    optimizer.load_state_dict(saved["optimizer"])
    if ema is not None and "ema" in saved:
        ema.load_state_dict(saved["ema"])
    restore_rng(saved, device)
