"""The demo's outputs: ``claims.json``, ``report.md``, ``results.csv`` and PNG plots with 95% error bars.

Input rows come from :func:`model.demo.evaluate_runs`: one per (row, seed, sweep point) with top-1, its
95% Wilson interval (``lo``, ``hi``), the clips and the mean seconds of audio each clip was seen for.
With several seeds a cell is the mean over seeds and its interval is the Wilson interval of the pooled
predictions (sampling error only); the seed spread is reported beside it.

Claims (``claims.json``, thresholds are targets, not assertions): ids and ``measured`` fields as issue 13
names them; ``holds`` says whether the target is met, ``interval`` carries the 95% bounds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from flexast.model.metrics import wilson_interval
from flexast.model.report import human_flops

MAIN_ROWS = ("ast", "flexiast", "elasticast", "flexi_elastic")
OWN = {"shift": 10.0, "length": 256}  # the fixed AST's own shift and length; its patch: own_patch(rows)


def own_patch(rows: list[dict]) -> int:
    """The fixed AST's own patch width (frames): the value of the operating point every row is scored at."""
    return next(r["value"] for r in rows if r["sweep"] == "operating")


def cell(rows: list[dict], row: str, sweep: str, value) -> dict | None:
    """Seed-mean top-1 of one point with the pooled Wilson interval, per-seed values and seconds seen."""
    hit = [r for r in rows if r["row"] == row and r["sweep"] == sweep and r["value"] == value]
    if not hit:
        return None
    n = sum(r["n_clips"] for r in hit)
    k = sum(round(r["top1"] * r["n_clips"]) for r in hit)
    lo, hi = wilson_interval(k, n)
    return {
        "top1": k / n,
        "lo": lo,
        "hi": hi,
        "per_seed": [r["top1"] for r in hit],
        "seconds": hit[0]["seconds"],
        "padded": hit[0]["padded"],
        "spectral": float(np.mean([r.get("top1_spectral", np.nan) for r in hit])),  # the 8 spectral classes' top-1
        "temporal": float(np.mean([r.get("top1_temporal", np.nan) for r in hit])),  # the 4 temporal classes'
    }


def _r(x: float) -> float:
    return round(float(x), 4)


def _spread(values: list[float]) -> float:
    return max(values) - min(values)


def claims(rows: list[dict], runs: dict, info: dict, seeds: list[int]) -> dict:
    """The five claims of issue 13 with what was measured and whether each target holds."""
    out = []
    base_p = own_patch(rows)
    fixed_b, flex_b = cell(rows, "ast", "patch", base_p), cell(rows, "flexiast", "patch", base_p)
    out.append(
        {
            "id": "flexiast_base_patch",
            "target": "FlexiAST only is within 2 points of the fixed AST at the fixed AST's own patch",
            "measured": {"fixed": _r(fixed_b["top1"]), "flexible": _r(flex_b["top1"]), "patch": base_p},
            "interval": {
                "fixed": [_r(fixed_b["lo"]), _r(fixed_b["hi"])],
                "flexible": [_r(flex_b["lo"]), _r(flex_b["hi"])],
            },
            "holds": bool(flex_b["top1"] >= fixed_b["top1"] - 0.02),
        }
    )
    patches = sorted({r["value"] for r in rows if r["sweep"] == "patch" and r["value"] != base_p})
    fx = [cell(rows, "ast", "patch", p) for p in patches]
    fl = [cell(rows, "flexiast", "patch", p) for p in patches]
    out.append(
        {
            "id": "flexiast_other_patches",
            "target": "at every other patch, FlexiAST's lower 95% bound is above the fixed AST's upper bound",
            "measured": {
                "patches": patches,
                "fixed": [_r(c["top1"]) for c in fx],
                "flexible": [_r(c["top1"]) for c in fl],
                "flexible_lo": [_r(c["lo"]) for c in fl],
                "fixed_hi": [_r(c["hi"]) for c in fx],
            },
            "holds": bool(all(a["lo"] > b["hi"] for a, b in zip(fl, fx, strict=True))),
        }
    )
    for cid, sweep, key, unit in (
        ("elastic_shifts", "shift", "shifts_ms", "frame shifts"),
        ("elastic_lengths", "length", "frames", "lengths"),
    ):
        values = sorted({r["value"] for r in rows if r["sweep"] == sweep})
        el = [cell(rows, "elasticast", sweep, v) for v in values]
        fx = [cell(rows, "ast", sweep, v) for v in values]
        own = fx[values.index(OWN[sweep])]["top1"]
        spread = _spread([c["top1"] for c in el])
        worst_drop = max(own - c["top1"] for c in fx)
        out.append(
            {
                "id": cid,
                "target": f"ElasticAST's spread across {unit} is within 3 points, while the fixed AST loses more "
                f"than 10 points away from its own ({OWN[sweep]:g})",
                "measured": {key: values, "elastic": [_r(c["top1"]) for c in el], "fixed": [_r(c["top1"]) for c in fx]},
                "interval": {
                    "elastic": [[_r(c["lo"]), _r(c["hi"])] for c in el],
                    "fixed": [[_r(c["lo"]), _r(c["hi"])] for c in fx],
                },
                "seconds_seen": {"elastic": [_r(c["seconds"]) for c in el], "fixed": [_r(c["seconds"]) for c in fx]},
                "elastic_spread": _r(spread),
                "elastic_by_family": {f: [_r(c[f]) for c in el] for f in ("spectral", "temporal")},
                "elastic_spread_by_family": {f: _r(_spread([c[f] for c in el])) for f in ("spectral", "temporal")},
                "fixed_worst_drop": _r(worst_drop),
                "holds": bool(spread <= 0.03 and worst_drop > 0.10),
            }
        )
    base, c2f, short = (cell(rows, r, "operating", base_p) for r in ("ast", "c2f", "ast_short"))
    fl = {
        r: float(np.mean([v["flops"] for (row, _), v in runs.items() if row == r])) for r in ("ast", "c2f", "ast_short")
    }
    out.append(
        {
            "id": "c2f_flops",
            "target": "coarse-to-fine reaches the baseline's accuracy (within its 95% interval) with at least 25% "
            "fewer training FLOPs",
            "measured": {
                "baseline_flops": fl["ast"],
                "c2f_flops": fl["c2f"],
                "baseline": _r(base["top1"]),
                "c2f": _r(c2f["top1"]),
            },
            "interval": {"baseline": [_r(base["lo"]), _r(base["hi"])], "c2f": [_r(c2f["lo"]), _r(c2f["hi"])]},
            "flop_matched_baseline": {
                "flops": fl["ast_short"],
                "top1": _r(short["top1"]),
                "interval": [_r(short["lo"]), _r(short["hi"])],
            },
            "holds": bool(c2f["top1"] >= base["lo"] and fl["c2f"] <= 0.75 * fl["ast"]),
        }
    )
    return {"n_eval_clips": info["n_eval"], "seeds": list(seeds), "claims": out}


def _fmt(c: dict | None) -> str:
    if c is None:
        return "–"
    s = f"{c['top1']:.3f} ({c['lo']:.3f}–{c['hi']:.3f})"
    if len(c["per_seed"]) > 1:
        s += " [" + " / ".join(f"{v:.3f}" for v in c["per_seed"]) + "]"
    return s


def sweep_table(rows: list[dict], sweep: str, title: str, model_names: dict[str, str]) -> str:
    values = sorted({r["value"] for r in rows if r["sweep"] == sweep})
    lines = [f"| top-1 by {title} | " + " | ".join(f"{v:g}" for v in values) + " |", "|" + "---|" * (len(values) + 1)]
    for row in MAIN_ROWS:
        lines.append(f"| {model_names[row]} | " + " | ".join(_fmt(cell(rows, row, sweep, v)) for v in values) + " |")
    secs = []
    for v in values:
        a, b = cell(rows, "elasticast", sweep, v), cell(rows, "ast", sweep, v)
        secs.append(f"{a['seconds']:.2f} / {b['seconds']:.2f}" if a and b else "–")
    lines.append("| seconds seen (packed / fixed AST) | " + " | ".join(secs) + " |")
    return "\n".join(lines)


def _save(fig, ax, path: Path, xlabel: str, ylabel: str, legend_size: int) -> Path:
    """Label, grid and legend ``ax``, write ``fig`` to ``path`` as PNG and close it."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sweeps(rows: list[dict], out: Path, chance: float, model_names: dict[str, str], bins: int) -> list[Path]:
    """``top1_vs_{patch,shift,length}.png``: one line per model, 95% Wilson error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = {**OWN, "patch": own_patch(rows)}
    paths = []
    for sweep, xlabel in (
        ("patch", f"patch width p (frames; patches {bins}×p)"),
        ("shift", f"frame shift (ms), {2.56:.2f} s of audio each"),
        ("length", "max length (frames at 10 ms)"),
    ):
        values = sorted({r["value"] for r in rows if r["sweep"] == sweep})
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, row in enumerate(MAIN_ROWS):
            cells = [cell(rows, row, sweep, v) for v in values]
            y = np.array([c["top1"] for c in cells])
            err = np.array([[c["top1"] - c["lo"] for c in cells], [c["hi"] - c["top1"] for c in cells]])
            xs = np.array(values, dtype=float) * (1 + 0.01 * (k - 1.5))  # nudge so error bars do not overlap
            ax.errorbar(xs, y, yerr=err, marker="o", capsize=3, label=model_names[row])
        ax.axhline(chance, color="grey", linestyle="--", label="chance")
        ax.axvline(own[sweep], color="black", alpha=0.2, linewidth=4, label="fixed AST's own")
        if sweep != "patch":
            ax.set_xscale("log", base=2)
            ax.set_xticks(values, [f"{v:g}" for v in values])
        ax.set_ylim(0, 1.02)
        paths.append(_save(fig, ax, out / f"top1_vs_{sweep}.png", xlabel, "top-1 (95% Wilson interval)", 7))
    return paths


def _losses(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    steps, losses = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            steps.append(row["step"])
            losses.append(row["loss"])
    return np.array(steps), np.array(losses)


def _valid_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, top-1)`` of the validation evaluations logged during training."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "valid"]
    return np.array([r["step"] for r in rows], dtype=float), np.array([r["top1"] for r in rows])


def plot_training(runs: dict, rows: list[dict], out: Path, model_names: dict[str, str]) -> list[Path]:
    """``loss_curves.png`` (training loss by step, every run) and ``c2f_flops.png`` (top-1 against FLOPs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (row, seed), run in runs.items():
        s, loss = _losses(run["dir"])
        k = min(10, len(loss)) or 1  # running mean over 10 logged steps: the trend, not the per-step noise
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")  # (n - k + 1,)
        ax.plot(s[k - 1 :] + run.get("start_step", 0), smooth, label=f"{model_names[row]} (seed {seed})", lw=1)
    ax.set_yscale("log")
    ylabel = "training loss (running mean of 10 logs; KD rows: CE + KL)"
    loss_path = _save(fig, ax, out / "loss_curves.png", "optimizer step", ylabel, 6)

    fig, ax = plt.subplots(figsize=(6, 4))
    base_p = own_patch(rows)
    for k, row in enumerate(("ast", "ast_short", "c2f")):
        c = cell(rows, row, "operating", base_p)
        flops = np.mean([v["flops"] for (r, _), v in runs.items() if r == row]) / 1e12
        for (r, _), run in runs.items():  # validation top-1 during training; a step costs about flops / steps
            if r == row:
                vs, vt = _valid_curve(run["dir"])
                ax.plot(vs * flops / run["steps"], vt, color=f"C{k}", alpha=0.35, lw=1)
        ax.errorbar([flops], [c["top1"]], yerr=[[c["top1"] - c["lo"]], [c["hi"] - c["top1"]]], marker="o", capsize=4,
                    color=f"C{k}", label=f"{model_names[row]}: held-out")  # fmt: skip
    xlabel, ylabel = (
        "training compute (TFLOP, forward + backward)",
        "top-1 (held-out with 95% interval; thin: validation)",
    )
    return [loss_path, _save(fig, ax, out / "c2f_flops.png", xlabel, ylabel, 8)]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def verdict(item: dict) -> str:
    """One sentence with the numbers that decide a claim (what the report says when a target is missed)."""
    m = item["measured"]
    if item["id"] == "flexiast_base_patch":
        return f"FlexiAST − fixed at patch {m['patch']}: {m['flexible'] - m['fixed']:+.3f} (target ≥ −0.020)"
    if item["id"] == "flexiast_other_patches":
        gaps = [f"{p}: {lo - hi:+.3f}" for p, lo, hi in zip(m["patches"], m["flexible_lo"], m["fixed_hi"], strict=True)]
        return "FlexiAST's lower bound − fixed AST's upper bound by patch: " + ", ".join(gaps) + " (target > 0)"
    if item["id"] in ("elastic_shifts", "elastic_lengths"):
        key = "shifts_ms" if item["id"] == "elastic_shifts" else "frames"
        low = m[key][int(np.argmin(m["elastic"]))]
        fam = item.get("elastic_spread_by_family", {})
        by_family = (
            f" (spectral classes {fam['spectral']:.3f}, temporal {fam['temporal']:.3f})"
            if fam and not any(np.isnan(v) for v in fam.values())
            else ""
        )
        return (
            f"ElasticAST's spread {item['elastic_spread']:.3f}{by_family} (target ≤ 0.030, lowest at {low:g}); "
            f"the fixed AST's worst drop {item['fixed_worst_drop']:.3f} (target > 0.100)"
        )
    saving = 1 - m["c2f_flops"] / m["baseline_flops"]
    short = item["flop_matched_baseline"]["top1"]
    return (
        f"c2f − baseline: {m['c2f'] - m['baseline']:+.3f} (baseline's interval {item['interval']['baseline'][0]:.3f}–"
        f"{item['interval']['baseline'][1]:.3f}) at {saving:.0%} fewer FLOPs (target ≥ 25%); the FLOP-matched "
        f"baseline scores {short:.3f}"
    )


def _claims_table(c: dict) -> str:
    lines = ["| claim | measured | target met | deciding numbers |", "|---|---|---|---|"]
    for item in c["claims"]:
        m = json.dumps(item["measured"]).replace("|", "/")
        lines.append(f"| `{item['id']}` | {m} | {'yes' if item['holds'] else '**no**'} | {verdict(item)} |")
    return "\n".join(lines)


def training_text(plan, patch: tuple[int, int]) -> str:
    """How many steps each row trains and from what (``plan``: a ``model.demo.DemoPlan``; ``patch`` the base)."""
    s1, s2 = plan.c2f_steps
    el = plan.row_steps("elasticast")
    flex = plan.row_steps("flexiast")
    same = el == plan.steps
    text = (
        f"The fixed AST trains {plan.steps} optimizer steps on the same {plan.n_train_collection * 5 // 6} clips"
        + (", and so does ElasticAST" if same else f"; ElasticAST, which learns three frame shifts, {el}")
        + f". Coarse-to-fine and the FLOP-matched baseline train {plan.short_steps} steps each. Every step packs the "
        "same token budget, so a step costs about the same FLOPs whatever the row: rows are compared at the steps "
        "and FLOPs listed below. Coarse-to-fine's phase 1 trains on frames avg-pooled by "
        f"{plan.c2f_factor} (256 → {256 // plan.c2f_factor} frames, {256 // plan.c2f_factor // patch[1]} token "
        f"columns at patch {patch[0]}×{patch[1]}) for {s1} steps, which carry as many clips as "
        f"{round(plan.steps * plan.c2f_phase1)} "
        f"full-resolution steps; phase 2 trains {s2} steps at full resolution. Positions are interpolated and the "
        "optimizer and lr schedule reset between phases, as in the paper. "
    )
    start = "final weights" if plan.flex_init == "final" else "weights at half its steps"
    text += (
        f"The FlexiAST rows fine-tune their parent row's {start} (FlexiAST fine-tunes a trained AST) for {flex} "
        f"more steps at lr {plan.flex_lr:g} with a patch width drawn per step from "
        + ("the recipe's sizes" if not plan.flex_patches else "{" + ", ".join(map(str, plan.flex_patches)) + "}")
        + (
            f", distilling the parent's final weights (KL weight {plan.flex_kd:g}, the teacher at the base patch; "
            "FlexiAST's knowledge distillation)"
            if plan.flex_kd > 0
            else ""
        )
        + "; their steps and FLOPs include the parent's."
    )
    return text


def write_report(
    out: Path, plan, runs: dict, rows: list[dict], info: dict, timings: dict, names: dict[str, str]
) -> dict:
    """Write every output of the demo into ``out``; returns the claims, the claims table and timings.

    ``names``: display name of each row (``model.demo.ROWS``).
    """
    seeds = sorted({s for _, s in runs})
    c = claims(rows, runs, info, seeds)
    for item in c["claims"]:
        item["deciding"] = verdict(item)
    (out / "claims.json").write_text(json.dumps(c, indent=1))
    write_csv(rows, out / "results.csv")
    cfg = next(iter(runs.values()))["config"]
    bins, base_p = cfg.model.base_patch[0], own_patch(rows)
    plots = plot_sweeps(rows, out, info["chance"], names, bins) + plot_training(runs, rows, out, names)
    table = _claims_table(c)
    train_lines = []
    for row in names:
        mine = [v for (r, _), v in runs.items() if r == row]
        losses = [float(np.mean(_losses(v["dir"])[1][-5:])) for v in mine]
        op = cell(rows, row, "operating", base_p)
        valid = " / ".join(f"{v.get('valid', {}).get('top1', float('nan')):.3f}" for v in mine)
        flops = human_flops(float(np.mean([v["flops"] for v in mine])))
        train_lines.append(
            f"| {names[row]} | {mine[0]['steps']} | {flops} | {' / '.join(f'{x:.3f}' for x in losses)} | {valid} | "
            f"{_fmt(op)} | {np.mean([v['wall_s'] for v in mine]):.0f} s |"
        )
    shift_c = next(x for x in c["claims"] if x["id"] == "elastic_shifts")
    lines = [
        "# flexast demo report",
        "",
        "Written by `model demo`. Each row below is a tiny Audio Spectrogram Transformer "
        f"({cfg.model.embed_dim} wide, {cfg.model.depth} blocks,",
        f"{cfg.model.n_mels} mel bins, patches of {bins} bins × {base_p} frames) trained on the same demo "
        f"sounds ({len(info['classes'])} classes: {', '.join(info['classes'])}),",
        "and evaluated on a held-out set generated from its own seed:",
        f"**{info['n_eval']} clips**, normalised with the training statistics, labels matched by name.",
        f"Seeds: {', '.join(map(str, seeds))}. Every number carries its 95% Wilson interval in brackets"
        + (
            " and the per-seed values in square brackets."
            if len(seeds) > 1
            else ". One training seed: `model demo --full` trains two, and docs/demo.md states the seed spread "
            "measured that way."
        ),
        "",
        "## Claims",
        "Targets, not assertions (see `claims.json`):",
        "",
        table,
        "",
        "## Training (steps and the measured FLOPs of every row)",
        training_text(plan, tuple(cfg.model.base_patch)),
        "",
        "| row | steps | training FLOPs | final train loss | validation top-1 | held-out top-1 (own patch, 10 ms, 256) "
        "| wall |",
        "|---|---|---|---|---|---|---|",
        *train_lines,
        "",
        "Loss curves: [loss_curves.png](loss_curves.png). Accuracy against training compute: "
        "[c2f_flops.png](c2f_flops.png).",
        "",
        "## Sweeps (held-out top-1, 95% interval)",
        "The fixed AST is evaluated as a fixed-length model: inputs shorter than its 256 frames are padded to",
        "256 (longer ones are cut). The others see the same frames without padding. The last line of each table",
        "gives the mean seconds of audio a clip was seen for, by a packed model and by the fixed AST.",
        "",
        sweep_table(rows, "patch", f"patch width p (patches {bins}×p, 10 ms, 256 frames)", names),
        "",
        sweep_table(rows, "shift", "frame shift in ms (2.56 s each)", names),
        "",
        sweep_table(rows, "length", "max length in frames at 10 ms (cut only)", names),
        "",
        f"ElasticAST's spread across shifts: {shift_c['elastic_spread']:.3f}; the fixed AST's worst drop: "
        f"{shift_c['fixed_worst_drop']:.3f}. Chance is {info['chance']:.3f}.",
        "",
        "## Plots",
        *[f"- [{p.name}]({p.name})" for p in plots],
        "",
        "## Time",
        f"Data {timings['data_s']:.0f} s, training {timings['train_s']:.0f} s, evaluation {timings['eval_s']:.0f} s; "
        f"whole demo {timings['total_s']:.0f} s.",
        "",
        "## Files",
        "- `claims.json`: the claims above; `results.csv`: every evaluated point (top-1, interval, seconds seen).",
        "- `runs/<row>_s<seed>/`: config, `metrics.jsonl`, `report.md` and `final/` weights of each run.",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return {**c, "table": table, "timings": timings}
