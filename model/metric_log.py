"""What a training run tells the world while it runs: ``metrics.jsonl``, TensorBoard and the progress bar.

One row per logged step (``loss``, ``lr``, ``tokens``, ``fill``, ``tokens_per_s``, ``step``, ``phase``,
``epoch``) and per evaluation (``split: valid`` and the metrics). Only the main rank logs; on the others
every method is a no-op.
"""

from __future__ import annotations

import json
from pathlib import Path


class MetricLog:
    """Rows appended to ``metrics.jsonl`` (and TensorBoard scalars when importable), and a tqdm bar per phase."""

    def __init__(self, metrics: Path | None, tensorboard: Path | None = None, progress: bool = False):
        """``metrics=None`` (a rank other than the main one): log nothing."""
        self.file = open(metrics, "a") if metrics is not None else None  # noqa: SIM115 - closed in close()
        self.progress = progress and metrics is not None
        self.tb = None
        self.bar = None
        if tensorboard is not None and metrics is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard))
            except ImportError:
                self.tb = None

    def write(self, row: dict) -> None:
        """Append ``row`` (its numbers also go to TensorBoard under ``split/name``)."""
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row["step"])

    def start_phase(self, name: str, total: int, done: int, estimated: bool = False) -> None:
        """A progress bar for a phase of ``total`` steps (``estimated``: from the token budget), ``done`` already."""
        if self.progress and self.bar is None:
            from tqdm import tqdm

            desc = f"{name} (~{total} steps, estimated)" if estimated else name
            self.bar = tqdm(total=total, initial=done, desc=desc, dynamic_ncols=True)

    def step(self, info: dict) -> None:
        """Advance the bar by one step and show its loss, throughput, fill and lr."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{info['loss']:.4f}",
                tok_s=f"{info['tokens_per_s']:.0f}",
                fill=f"{info['fill']:.3f}",
                lr=f"{info['lr']:.2e}",
            )

    def end_phase(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.end_phase()
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
