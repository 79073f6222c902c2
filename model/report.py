"""The training ``report.md``: what was trained, how long it took, the FLOPs spent and the held-out metrics."""

from __future__ import annotations

from pathlib import Path

from flexast.model.config import Config


def human_flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def metrics_line(m: dict) -> str:
    if not m:
        return "no held-out set was given (`data.valid`)"
    keys = [k for k in ("mAP", "AUC", "d_prime", "top1") if k in m]
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys) + f" on {m.get('n_clips', '?')} clips"


def write_train_report(path: Path, cfg: Config, result: dict, history: list[dict]) -> None:
    """Write a short Markdown report of a finished run."""
    losses = [h["loss"] for h in history if "loss" in h]
    first = sum(losses[:5]) / max(1, len(losses[:5])) if losses else float("nan")
    last = sum(losses[-5:]) / max(1, len(losses[-5:])) if losses else float("nan")
    lines = [
        f"# Training report: {cfg.recipe.name}",
        "",
        f"- Run folder: `{cfg.run.out_dir}`; resolved config: `config.yaml`; per-step log: `metrics.jsonl`.",
        f"- Optimizer steps: {result['steps']}; wall time {result['wall_s']:.1f} s.",
        f"- Training compute (forward + backward, analytic): {human_flops(result['flops'])}.",
        f"- Training loss: {first:.4f} over the first steps → {last:.4f} over the last steps.",
        f"- Held-out: {metrics_line(result.get('valid', {}))}.",
    ]
    if "valid_ema" in result:
        lines.append(f"- Held-out with EMA weights (`ema/`): {metrics_line(result['valid_ema'])}.")
    if "valid_averaged" in result:
        lines.append(f"- Held-out with averaged weights (`averaged/`): {metrics_line(result['valid_averaged'])}.")
    lines += ["", "Weights to evaluate or predict with: `final/` (plus `ema/`, `averaged/` when enabled).", ""]
    path.write_text("\n".join(lines))
