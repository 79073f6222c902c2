"""Weight averaging (AST: the mean of the per-epoch checkpoints from epoch a to b) and an EMA of the weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flexast.model.checkpoint import load_state_dict
from flexast.model.errors import CheckpointError


class EMA:
    """Exponential moving average of every floating-point parameter and buffer: ``s ← d·s + (1 − d)·w``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1.0 - self.decay)

    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        model.load_state_dict({k: self.shadow.get(k, v).to(v.dtype) for k, v in state.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.float().clone() for k, v in state.items()}


@torch.no_grad()
def average_checkpoints(model: nn.Module, paths: list[Path]) -> None:
    """Load the element-wise mean of the weights saved at ``paths`` into ``model`` (shapes must agree)."""
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        state = load_state_dict(path)
        for k, v in state.items():
            if k in total and total[k].shape != v.shape:
                raise CheckpointError(
                    f"cannot average {path}: {k} has shape {tuple(v.shape)} vs {tuple(total[k].shape)}"
                )
            total[k] = total.get(k, 0) + v.double()
    current = model.state_dict()
    model.load_state_dict(
        {k: (total[k] / len(paths)).to(current[k].dtype) if k in total else v for k, v in current.items()}
    )
