"""``model eval``: metrics of one or more checkpoints over grids of patch size, resolution and length.

Notation: ``N`` clips, ``C`` classes, ``(p_f, p_t)`` patch, ``R`` pool factor, shifts in ms, lengths in
frames at the clip's own resolution.

Three sweeps, each around the model's operating point (its native kernel, the base 10 ms shift and
the full length):

* patch sizes (FlexiAST Table 1), each a width ``p`` (``patch_embed.patch_of``): ``(p, p)`` for a square
  kernel, the kernel's shape at width ``p`` otherwise, ``(p0_f, p)`` for time-only models;
* resolution: stored frame shifts, or avg/max pooling factors of the base shift;
* max length: clips longer than the cap are cut (centre), shorter ones are never padded.

A clip shorter than one patch is padded to one patch (its tokens would otherwise be zero); this is the
only padding and it is counted in ``padded_clips``. Outputs: ``results.csv``, ``table.md`` (rows = models,
columns = patch sizes, like FlexiAST's Table 1, plus resolution and length tables) and PNG plots
``metric_vs_patch.png``, ``metric_vs_resolution.png``, ``metric_vs_length.png`` with one line per model.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flexast.model.checkpoint import load_checkpoint
from flexast.model.config import Config
from flexast.model.data import eval_config, model_input, norm_table, open_data, shifts_of, training_norm
from flexast.model.metrics import chance_metrics, classification_metrics
from flexast.model.patch_embed import patch_of
from flexast.model.run_dir import read_labels
from flexast.pipeline.datasource import Source
from flexast.pipeline.errors import ConfigError
from flexast.pipeline.loader import make_stream
from flexast.pipeline.resolution import TimeScale

DEFAULT_PATCHES = (8, 10, 12, 16, 20, 24, 30, 32, 40, 48)


def is_single_label(source: Source) -> bool:
    """Whether every clip of the source has exactly one label (then top-1 and softmax, else mAP and sigmoid)."""
    return all(len(r["meta"].get("label_ids", [])) == 1 for sh in source.shards for r in source.records(sh))


@torch.no_grad()
def score_source(
    model,
    source: Source,
    *,
    patch: tuple[int, int],
    resolution: TimeScale | None = None,
    max_frames: int = 1024,
    norm=None,
    vocab: Sequence[str] | None = None,
    single: bool | None = None,
    pool_mode: str = "avg",
    budget: int = 16384,
    device: torch.device | str = "cpu",
    pad_to: int = 0,
) -> dict:
    """Scores ``(N, C)`` (sigmoid or softmax follows the labels), targets and timing for every clip.

    Args:
        norm: ``(mean, std)`` or ``{shift_name: (mean, std)}``: the *training* statistics (default: the
            source's own, for a model trained on it).
        vocab: the model's label names; the source's labels are matched to them by name.
    """
    resolution = resolution or TimeScale()
    single = is_single_label(source) if single is None else single
    c = model.config
    stride = (c.fstride, c.tstride)
    opts = eval_config(
        tuple(patch), resolution, max_frames, c.n_mels, single=single, pool_mode=pool_mode, budget=budget,
        pad_to=pad_to, stride=stride,
    )  # fmt: skip
    loader = make_stream(opts, source, vocab=list(vocab) if vocab is not None else None, norm=norm)
    was_training = model.training
    model.eval()
    scores, targets, keys, tokens = [], [], [], 0
    t0 = time.perf_counter()
    for batch in loader:
        batch = batch.to(device)
        logits = model(model_input(batch, bool(pad_to))).float()
        prob = torch.softmax(logits, 1) if single else torch.sigmoid(logits)
        scores.append(prob.cpu().numpy())
        targets.append(batch.labels.cpu().numpy())
        keys.extend(batch.keys)
        tokens += batch.total_tokens
    model.train(was_training)
    return {
        "scores": np.concatenate(scores) if scores else np.zeros((0, c.num_classes)),
        "targets": np.concatenate(targets) if targets else np.zeros((0,)),
        "keys": keys,
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
        "single": single,
    }


def evaluate_source(model, source: Source, cfg: Config, *, patch, resolution, max_frames, device, vocab, norm) -> dict:
    """Metrics dict (mAP, AUC, d_prime, top1, n_clips, tokens, seconds) of ``model`` on ``source``."""
    lc = cfg.data.loader
    out = score_source(
        model,
        source,
        patch=tuple(patch),
        resolution=resolution,
        max_frames=max_frames,
        norm=norm,
        vocab=vocab,
        single=lc.label_mode == "index",
        pool_mode=lc.policy().pool_mode,
        device=device,
        pad_to=lc.target_frames or 0,
    )
    m = classification_metrics(out["scores"], out["targets"]) if len(out["keys"]) else {}
    return {**m, "n_clips": len(out["keys"]), "tokens": out["tokens"], "seconds": round(out["seconds"], 3)}


def evaluate_phase(model, valid: Source, train: Source, cfg: Config, phase, device) -> dict:
    """:func:`evaluate_source` of a training phase (a :class:`model.recipes.Phase`): its eval patch, its first
    resolution, ``data.eval_max_frames`` (or the phase's frames), and the training data's vocabulary and
    normalisation (as ``model predict`` and ``model eval`` normalise)."""
    return evaluate_source(
        model,
        valid,
        cfg,
        patch=phase.eval_patch,
        resolution=phase.resolution.choices()[0],
        max_frames=cfg.data.eval_max_frames or phase.max_frames,
        device=device,
        vocab=train.label_names,
        norm=training_norm(train, cfg.data.loader),
    )


@dataclass
class GridSpec:
    """What to sweep; empty lists skip a sweep."""

    patch_sizes: Sequence[int] = DEFAULT_PATCHES
    shifts_ms: Sequence[float] = ()
    pool_factors: Sequence[int] = ()
    pool_mode: str = "avg"
    max_lengths: Sequence[int] = ()
    base_max_frames: int = 1024
    base_shift_ms: float = 10.0


def eval_grid(
    models: dict[str, object],
    data: Source,
    spec: GridSpec,
    device: torch.device | str = "cpu",
    progress: bool = True,
    infos: dict[str, dict] | None = None,
) -> list[dict]:
    """One row per (model, sweep, value) with every metric; see the module docstring for the sweeps.

    ``infos[name]`` is the model's ``labels.json`` (vocabulary, label mode, training statistics):
    labels are matched by name and features normalised with the training statistics, as ``model
    predict`` does. Without it the held-out set's own vocabulary and statistics are used.
    """
    rows = []
    for name, model in models.items():
        info = (infos or {}).get(name) or {}
        vocab = info.get("names")
        single = {"single": True, "multi": False}.get(info.get("labels")) if info else None
        norm = norm_table(info, shifts_of(data)) if info else None
        model = model.to(device)
        native = tuple(model.config.base_patch)
        points = []
        for p in spec.patch_sizes:
            patch = patch_of(native, model.config.resize_axes, p)
            points.append(("patch", p, patch, TimeScale(spec.base_shift_ms), spec.base_max_frames))
        for s in spec.shifts_ms:
            mf = max(1, int(spec.base_max_frames * spec.base_shift_ms / s))
            points.append(("shift", s, native, TimeScale(float(s)), mf))
        for r in spec.pool_factors:
            mf = max(1, spec.base_max_frames // r)
            points.append(("pool", r, native, TimeScale(spec.base_shift_ms, int(r)), mf))
        for n in spec.max_lengths:
            points.append(("length", n, native, TimeScale(spec.base_shift_ms), int(n)))
        for sweep, value, patch, res, mf in points:
            if patch[0] > model.config.n_mels:
                continue
            out = score_source(
                model, data, patch=patch, resolution=res, max_frames=mf, pool_mode=spec.pool_mode, device=device,
                norm=norm, vocab=vocab, single=single,
            )  # fmt: skip
            m = classification_metrics(out["scores"], out["targets"])
            row = {
                "model": name,
                "sweep": sweep,
                "value": value,
                "patch_f": patch[0],
                "patch_t": patch[1],
                "shift_ms": res.frame_shift_ms,
                "pool": res.pool,
                "max_frames": mf,
                "n_clips": len(out["keys"]),
                **{k: round(v, 6) for k, v in m.items()},
                "tokens": out["tokens"],
                "seconds": round(out["seconds"], 3),
            }
            rows.append(row)
            if progress:
                print(
                    f"  {name:>16} {sweep:>6}={value:<6} patch={patch} mAP={m['mAP']:.3f} "
                    f"top1={m['top1']:.3f} tokens={out['tokens']}",
                    flush=True,
                )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def markdown_tables(rows: list[dict], metric: str, chance: float | None = None) -> str:
    """One Markdown table per sweep: rows are models, columns the swept values (FlexiAST Table 1 layout)."""
    titles = {
        "patch": "patch size",
        "shift": "frame shift (ms)",
        "pool": "pool factor R",
        "length": "max length (frames)",
    }
    out = []
    for sweep, title in titles.items():
        sel = [r for r in rows if r["sweep"] == sweep]
        if not sel:
            continue
        values = list(dict.fromkeys(r["value"] for r in sel))
        models = list(dict.fromkeys(r["model"] for r in sel))
        head = f"| {metric} by {title} | " + " | ".join(f"{v:g}" for v in values) + " |"
        out += [head, "|" + "---|" * (len(values) + 1)]
        for m in models:
            cells = []
            for v in values:
                hit = [r for r in sel if r["model"] == m and r["value"] == v]
                cells.append(f"{hit[0][metric]:.3f}" if hit else "–")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        if chance is not None:
            out.append("| chance | " + " | ".join(f"{chance:.3f}" for _ in values) + " |")
        out.append("")
    return "\n".join(out)


def plot_sweeps(rows: list[dict], metric: str, out_dir: Path, chance: float | None = None) -> list[Path]:
    """``metric_vs_{patch,resolution,length}.png``: one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = {
        "patch": (["patch"], "patch size (time frames per patch)"),
        "resolution": (["shift", "pool"], "effective frame shift (ms)"),
        "length": (["length"], "max length (frames, cut only)"),
    }
    for fname, (sweeps, xlabel) in groups.items():
        sel = [r for r in rows if r["sweep"] in sweeps]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in dict.fromkeys(r["model"] for r in sel):
            for sweep in sweeps:
                pts = [r for r in sel if r["model"] == m and r["sweep"] == sweep]
                if not pts:
                    continue
                xs = [r["shift_ms"] if fname == "resolution" else r["value"] for r in pts]
                label = m if len(sweeps) == 1 or len({r["sweep"] for r in sel}) == 1 else f"{m} ({sweep})"
                ax.plot(xs, [r[metric] for r in pts], marker="o", label=label)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", label="chance")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"metric_vs_{fname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def run_eval(
    checkpoints: Sequence[str],
    data: str | Source,
    out_dir: str | Path,
    spec: GridSpec,
    names: Sequence[str] | None = None,
    device: str = "auto",
    max_clips: int = 0,
) -> dict:
    """Library entry point of ``model eval``: load checkpoints, sweep, write CSV, tables and plots."""
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    source = open_data(data, "--data", "memory", max_clips) if isinstance(data, str) else data
    names = list(names) if names else [_default_name(c) for c in checkpoints]
    if len(names) != len(checkpoints):
        raise ConfigError(f"--name: {len(names)} names for {len(checkpoints)} checkpoints")
    models = {n: load_checkpoint(c, dev) for n, c in zip(names, checkpoints, strict=True)}
    infos = {n: read_labels(c) for n, c in zip(names, checkpoints, strict=True)}
    rows = eval_grid(models, source, spec, dev, infos=infos)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = infos[names[0]]
    single = first["labels"] == "single" if first.get("labels") else is_single_label(source)
    metric = "top1" if single else "mAP"
    chance = chance_metrics(*label_targets(source, single, first.get("names")))[metric]
    write_csv(rows, out / "results.csv")
    table = markdown_tables(rows, metric, chance)
    (out / "table.md").write_text(table + "\n")
    plots = plot_sweeps(rows, metric, out, chance)
    return {"rows": rows, "table": table, "plots": plots, "metric": metric, "chance": chance}


def label_targets(source: Source, single: bool, vocab: Sequence[str] | None = None) -> tuple[np.ndarray, int]:
    """``(targets, n_classes)`` of every clip: class indices (single) or ``(N, C)`` multi-hot, in ``vocab``'s ids."""
    from flexast.pipeline.datasource import label_map

    names = source.label_names
    vocab = list(vocab) if vocab else names
    ids = label_map(names, vocab, source.spec, source.index.get("labels", {}).get("counts"))
    recs = [r for sh in source.shards for r in source.records(sh)]
    if single:
        return np.array([ids[r["meta"]["label_ids"][0]] for r in recs]), len(vocab)
    y = np.zeros((len(recs), len(vocab)))
    for i, r in enumerate(recs):
        y[i, [ids[j] for j in r["meta"].get("label_ids", [])]] = 1
    return y, len(vocab)


def _default_name(path: str) -> str:
    p = Path(path)
    if p.suffix == ".safetensors":
        p = p.parent
    return p.parent.name + "/" + p.name if p.name in ("final", "averaged", "ema") else p.name
