"""``model demo``: each paper's effect, measured on one data set with one model size, with 95% intervals.

1. generate the demo audio (:mod:`pipeline.demo_sounds`: 8 spectral and 4 temporal classes on non-stationary
   backgrounds): a training collection (seed 0) split into ``train`` and ``valid`` (for tuning), and a
   held-out collection from its own seed (1) of at least 800 clips;
2. build log-mel shards (``model.n_mels`` of the recipe: 64 bins) at 10, 20 and 40 ms frame shifts, with one
   shared vocabulary;
3. train the rows of :data:`ROWS` (two processes at a time, one torch thread each), all from
   ``configs/demo.yaml`` with a few overrides; every step packs the same token budget, so a step costs
   about the same FLOPs whatever the row (the measured FLOPs are reported). A patch spans all 64 mel bins
   and 16 frames (``model.base_patch``); a patch *size* in the FlexiAST draw and the patch sweep is a
   width in frames (``recipe.time_only``, FlexiAST's speaker setting):

   - ``ast``: the classic fixed AST: one patch (64×16), one shift (10 ms), one length (256 frames: every
     training clip is longer and is cut to it; in evaluation shorter inputs are padded to it);
   - ``flexiast``: FlexiAST only: the ``ast`` row's final weights (the paper fine-tunes a trained AST)
     fine-tuned for half as many steps again with a patch width drawn per step (PI-resize), distilling
     the ``ast`` row (FlexiAST's knowledge distillation);
   - ``elasticast``: packed native lengths, a frame shift drawn per clip (40 ms for half), factorised positions,
     attention pooling, token dropout (ElasticAST only, fixed patch), trained twice as many steps as
     ``ast`` (it learns three frame shifts, and converges later);
   - ``flexi_elastic``: both: the ``elasticast`` row fine-tuned with random patches as ``flexiast`` is;
   - ``c2f``: coarse-to-fine on the ``ast`` row: phase 1 on frames avg-pooled by 4 (4 token columns per
     clip, not 1) for as many clips as a quarter of the baseline's steps carry (the paper's phase 1, in
     1/R of the steps), then full resolution for ``c2f_phase2`` of the baseline's steps; ``ast_short``:
     the ``ast`` row with c2f's step count, which matches c2f's training FLOPs;

4. evaluate on the held-out set (normalised with the *training* statistics, labels matched by name): the
   patch sweep, the frame-shift sweep (every shift sees the same 2.56 s) and the length sweep;
5. write ``report.md`` (tables with intervals, loss curves, claims), ``results.csv``, PNG plots with
   95% error bars and ``claims.json`` (:mod:`model.demo_report`).

``--full`` trains every row with two seeds; ``--quick`` is a smoke test of the whole path (tiny data, a few
steps, in this process). Finished data and shards are reused when the command is run again with the same
``--out``; the training runs start fresh each time.

Units: frames at the clip's own shift, shifts in ms, seconds of audio.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from flexast.model.config import Config, PhaseConfig, load_config, save_config
from flexast.model.errors import ModelError
from flexast.model.recipes_registry import builtin_recipe

CONFIG = builtin_recipe("demo")
SHIFTS_MS = (10.0, 20.0, 40.0)
BASE_PATCH = load_config(CONFIG).recipe.patch[1]  # the fixed AST's patch width (frames); heights: patch_of
SWEEP_SECONDS = 2.56  # every shift of the shift sweep sees this much audio: 256 / 128 / 64 frames
TRAIN_SEED, HELD_OUT_SEED = 0, 1

_FIXED = [
    "data.loader.resolution={kind: fixed, shift_ms: 10}",
    "model.pos_embed=grid",
    "model.pool=cls",
    "model.token_dropout=0",
]
_ELASTIC = [  # 40 ms drawn for half the clips (the paper draws uniformly): its worst shift, chosen on validation
    "data.loader.resolution={kind: random, shifts_ms: [10, 20, 40, 40]}",
    "model.pos_embed=factorized",
    "model.pool=attn",
    "model.token_dropout=0.1",
]
ROWS: dict[str, tuple[str, list[str]]] = {
    "ast": ("AST (fixed patch, shift, length)", ["recipe.name=ast", *_FIXED]),
    "flexiast": ("FlexiAST only", ["recipe.name=flexiast", *_FIXED]),
    "elasticast": ("ElasticAST only", ["recipe.name=elasticast", *_ELASTIC]),
    "flexi_elastic": ("FlexiAST+ElasticAST", ["recipe.name=flexiast", *_ELASTIC]),
    "c2f": ("coarse-to-fine (pool 4 → 1)", ["recipe.name=coarse_to_fine", *_FIXED]),
    "ast_short": ("AST, FLOP-matched to c2f", ["recipe.name=ast", *_FIXED]),
}
"""Row name → (display name, overrides of ``configs/demo.yaml``)."""
WARM_START = {"flexiast": "ast", "flexi_elastic": "elasticast"}
"""FlexiAST rows fine-tune their parent row's weights (``DemoPlan.flex_init``: final, or at half its steps) with
random patches for half the plan's steps (the paper fine-tunes a trained AST); their totals include the parent's."""
PADDED_ROWS = ("ast", "ast_short", "c2f")  # fixed-length models: evaluated padded (or cut) to their one length


@dataclass(frozen=True)
class DemoPlan:
    """How big the demo is: data, steps, seeds, sweep grids."""

    n_train_collection: int = 576  # seed 0: 5/6 train, 1/6 valid
    n_held_out: int = 816  # seed 1: all held out (68 per class)
    steps: int = 3600  # optimizer steps of the fixed AST row (the FlexiAST rows add half of it to their parent's)
    elastic_steps: int = 4800  # steps of the ElasticAST row (packed, three shifts: slower to converge); 0 = steps
    c2f_factor: int = 4  # phase 1 pools frames by R: 256 → 64 frames, 4 token columns at patch width 16
    c2f_phase1: float = 0.25  # share of the baseline's clips c2f sees pooled (in 1/R of the steps): the paper's
    c2f_phase2: float = 0.625  # share of the baseline's steps that c2f trains at full resolution
    flex_lr: float = 2e-3  # peak lr of the FlexiAST fine-tuning (the recipe's own lr)
    flex_init: str = "final"  # the FlexiAST rows start from their parent's "final" weights or those at "half" its steps
    flex_kd: float = 1.0  # > 0: the FlexiAST rows distil their parent's final weights (KL weight; FlexiAST's KD)
    flex_patches: tuple[int, ...] = (8, 12, 16, 16, 16, 24, 32, 48)  # patch width drawn per step: 16 in 3 of 8
    seeds: tuple[int, ...] = (0,)
    patches: tuple[int, ...] = (8, 12, 16, 24, 32, 48)  # patch widths (frames) of the patch sweep
    lengths: tuple[int, ...] = (64, 128, 256, 512)  # frames at 10 ms
    in_process: bool = False  # train in this process (no subprocess start-up: the quick smoke test)

    @property
    def c2f_steps(self) -> tuple[int, int]:
        """Steps of c2f's two phases: a pooled step packs R times the clips for the same tokens."""
        return round(self.steps * self.c2f_phase1 / self.c2f_factor), round(self.steps * self.c2f_phase2)

    def row_steps(self, row: str) -> int:
        """Optimizer steps ``row`` trains itself; a FlexiAST row's come on top of its parent's (``flex_init``)."""
        if row in ("c2f", "ast_short"):
            return self.short_steps
        if row in WARM_START:
            return self.steps - self.steps // 2
        return (self.elastic_steps or self.steps) if row == "elasticast" else self.steps

    @property
    def short_steps(self) -> int:
        """Steps of the FLOP-matched baseline: as many as c2f takes (every step packs the same token budget)."""
        return sum(self.c2f_steps)


PLANS = {
    "quick": DemoPlan(
        n_train_collection=72,
        n_held_out=48,
        steps=8,
        elastic_steps=16,
        seeds=(0,),
        patches=(8, 16),
        lengths=(128, 256),
        in_process=True,
    ),
    "default": DemoPlan(),
    "full": DemoPlan(seeds=(0, 1)),
}


# ---- data ---------------------------------------------------------------------------------------


def make_data(out: Path, plan: DemoPlan, jobs: int = 1, log=print) -> dict[str, str]:
    """Audio and shards of the train/valid (seed 0) and held-out (seed 1) sets; returns shard folders by split."""
    from flexast.pipeline.build import build_shards
    from flexast.pipeline.build_config import BuildConfig
    from flexast.pipeline.demo_sounds import Layout, write_demo

    n_mels = load_config(CONFIG).model.n_mels  # the shards carry the bins the demo model expects
    t = time.perf_counter()
    collections = {
        "train": (out / "audio" / "train", plan.n_train_collection, TRAIN_SEED, Layout(1 / 6, "valid")),
        "held_out": (out / "audio" / "held_out", plan.n_held_out, HELD_OUT_SEED, Layout(1.0, "eval")),
    }
    missing = [(str(f), n, seed, lay) for f, n, seed, lay in collections.values() if not (f / "all.csv").exists()]
    if jobs > 1 and len(missing) > 1:  # the two collections side by side (numpy and soundfile work only)
        with ProcessPoolExecutor(min(jobs, len(missing))) as pool:
            list(pool.map(write_demo, *zip(*missing, strict=True)))
    else:
        for args in missing:
            write_demo(*args)
    manifests = {name: folder / "all.csv" for name, (folder, *_) in collections.items()}
    vocabulary = str(collections["train"][0] / "classes.txt")
    log(f"[1/5] demo audio in {out / 'audio'} ({time.perf_counter() - t:.0f} s)")
    shards = {}
    for split, manifest in (("train", "train"), ("valid", "train"), ("eval", "held_out")):
        dest = out / "shards" / split
        t = time.perf_counter()
        build_shards(
            str(manifests[manifest]),
            str(dest),
            BuildConfig(name=f"demo-{split}", shifts_ms=SHIFTS_MS, split=split, features={"num_mel_bins": n_mels}),
            labels=vocabulary,
            only_split=split,
            workers=1,
            progress=False,
            log=lambda *a, **k: None,
        )
        shards[split] = str(dest)
        log(f"[2/5] {split} shards in {dest} ({time.perf_counter() - t:.0f} s)")
    return shards


# ---- training -----------------------------------------------------------------------------------


def row_config(row: str, plan: DemoPlan, seed: int, shards: dict[str, str], run_dir: Path) -> Config:
    """The resolved config of one row: ``configs/demo.yaml`` + the row's overrides + the plan's steps."""
    steps = plan.row_steps(row)
    extra = []
    if row in WARM_START.values():
        extra = [f"run.ckpt_every={steps // 2}"]  # the weights at half the steps may start the FlexiAST row
    if row in WARM_START:
        parent = run_dir.parent / f"{WARM_START[row]}_s{seed}" / plan.flex_init
        extra = [f"model.init={parent}", f"optim.lr={plan.flex_lr}"]
        if plan.flex_kd > 0:  # the teacher: the parent's final weights (a dependent starts once its parent is done)
            extra += [f"recipe.kd.teacher={parent.parent / 'final'}", f"recipe.kd.alpha={plan.flex_kd}"]
        if plan.flex_patches:
            extra += ["recipe.patch_sizes=[" + ",".join(map(str, plan.flex_patches)) + "]"]
    sets = [
        *ROWS[row][1],
        f"data.train={shards['train']}",
        f"data.valid={shards['valid']}",
        f"run.out_dir={run_dir}",
        f"run.seed={seed}",
        "run.progress=false",
        f"optim.steps={steps}",
        *extra,
    ]
    if row != "c2f":
        return load_config(CONFIG, sets)
    cfg = load_config(CONFIG, ["recipe.name=ast", *sets[1:]])  # phases are set below (--set cannot list them)
    s1, s2 = plan.c2f_steps
    cfg.recipe.name = "coarse_to_fine"
    cfg.recipe.phases = [
        PhaseConfig(method="pool", factor=plan.c2f_factor, pool_mode="avg", steps=s1, recipe="ast"),
        PhaseConfig(method="none", factor=1, steps=s2, recipe="ast"),
    ]
    return cfg


def _train_one(row: str, cfg: Config, data: dict, log) -> dict:
    run_dir = Path(cfg.run.out_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if data:  # in this process, on the clip sets already in memory
        from flexast.model.train import train

        train(cfg, train_data=data["train"], valid_data=data["valid"])
    else:
        save_config(cfg, run_dir / "recipe.yaml")
        cmd = [sys.executable, "-m", "flexast.model.cli", "train", "--config", str(run_dir / "recipe.yaml")]
        with open(run_dir / "train.log", "w") as logf:
            code = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=_child_env()).returncode
        if code != 0:
            tail = (run_dir / "train.log").read_text()[-2000:]
            raise ModelError(f"training {row} failed with exit status {code}; end of its log:\n{tail}")
    half = run_dir / "checkpoints" / f"step_{cfg.run.ckpt_every:08d}"
    if cfg.run.ckpt_every and half.exists():  # the start of a FlexiAST row (WARM_START)
        shutil.move(str(half), str(run_dir / "half"))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # per-epoch weights: not needed by the demo
    result = json.loads((run_dir / "result.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    log(
        f"      {row} (seed {cfg.run.seed}) done after {result['wall_s']:.0f} s, {result['steps']} steps: "
        f"validation top-1 {result.get('valid', {}).get('top1', float('nan')):.3f}"
    )
    return result


def _child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train_rows(out: Path, plan: DemoPlan, shards: dict[str, str], jobs: int, log=print) -> dict:
    """Train every (row, seed); returns ``{(row, seed): result}`` with ``dir`` added."""
    data = {}
    if plan.in_process:
        from flexast.model.data import open_data

        data = {"train": open_data(shards["train"], "data.train"), "valid": open_data(shards["valid"], "data.valid")}
    # Parents first, dependents last: with ``jobs`` workers taking runs in order, a dependent only waits on a
    # parent that is already running or done.
    order = sorted(ROWS, key=lambda r: (r in WARM_START, r not in WARM_START.values()))
    todo = []
    for row in order:
        for seed in plan.seeds:
            run_dir = out / "runs" / f"{row}_s{seed}"
            todo.append(((row, seed), row_config(row, plan, seed, shards, run_dir)))
    done = {key: threading.Event() for key, _ in todo}
    log(f"[3/5] training {len(todo)} runs ({len(ROWS)} rows × {len(plan.seeds)} seed(s)), {jobs} at a time")
    runs = {}

    def work(item):
        key, cfg = item
        if key[0] in WARM_START:
            done[(WARM_START[key[0]], key[1])].wait()
        try:
            res = _train_one(key[0], cfg, data, log)
        finally:
            done[key].set()
        res["start_step"] = 0
        if key[0] in WARM_START:  # count the parent's first half too: the row's total is plan.row_steps
            init = Path(cfg.model.init)  # the parent's checkpoint at half its steps, or its final weights
            if init.name == "half":
                state = json.loads((init / "state.json").read_text())
                start, flops = int(state["step"]), float(state["flops"])
            else:
                parent = json.loads((init.parent / "result.json").read_text())
                start, flops = int(parent["steps"]), float(parent["flops"])
            res["start_step"] = start
            res["steps"] += start
            res["flops"] += flops
        return key, {**res, "dir": Path(cfg.run.out_dir), "config": cfg}

    if plan.in_process or jobs <= 1:
        for item in todo:
            key, res = work(item)
            runs[key] = res
    else:
        with ThreadPoolExecutor(jobs) as pool:
            for key, res in pool.map(work, todo):
                runs[key] = res
    return runs


# ---- evaluation ---------------------------------------------------------------------------------


def _trim(n: int, p: int) -> int:
    return (n // p) * p


def cut_set(source, shift_ms: float, n_frames: int):
    """An in-memory copy of ``source`` with only the ``shift_ms`` features, each centre-cut to at most
    ``n_frames`` (the sweeps' caps, applied before a fixed-length model pads its input)."""
    from flexast.pipeline.datasource import MemorySource
    from flexast.pipeline.units import shift_name

    name = shift_name(shift_ms)
    data = {}
    for shard in source.shards:
        recs = []
        for r in source.records(shard):
            x = source.fetch([(r["url"], r["loc"][name])])[0]  # (T, F)
            start = max(0, (x.shape[0] - n_frames) // 2)
            x = np.asarray(x[start : start + n_frames])  # (min(T, n_frames), F)
            meta = {**r["meta"], "frames": {name: int(x.shape[0])}}
            recs.append({**r, "meta": meta, "loc": {name: x}})
        data[shard.url] = recs
    return MemorySource(source.spec, source.index, data)


def _lengths(source, shift_ms: float) -> np.ndarray:
    """``(N,)`` frames of every clip at ``shift_ms``."""
    from flexast.pipeline.units import shift_name

    name = shift_name(shift_ms)
    return np.array([r["meta"]["frames"][name] for sh in source.shards for r in source.records(sh)])


def eval_points(plan: DemoPlan, row: str) -> list[tuple[str, float, int, float, int]]:
    """``(sweep, value, patch, shift_ms, frames)`` of a row: its operating point, or all three sweeps."""
    base = [("operating", BASE_PATCH, BASE_PATCH, 10.0, 256)]
    if row in ("c2f", "ast_short"):
        return base
    pts = [("patch", p, p, 10.0, 256) for p in plan.patches]
    pts += [("shift", s, BASE_PATCH, s, round(SWEEP_SECONDS * 1000 / s)) for s in SHIFTS_MS]
    pts += [("length", n, BASE_PATCH, 10.0, n) for n in plan.lengths]
    return base + pts


def evaluate_runs(
    runs: dict, plan: DemoPlan, eval_dir: str, train_dir: str, jobs: int = 1, log=print
) -> tuple[list[dict], dict]:
    """One row per (row, seed, sweep point): top-1 with its 95% Wilson interval and the seconds of audio seen.

    With ``jobs`` > 1 the runs are shared out to that many processes (one torch thread each), balanced by
    their number of sweep points; the rows come back in the order of ``runs``.
    """
    items = [(row, seed, str(run["dir"])) for (row, seed), run in runs.items()]
    if jobs <= 1 or len(items) < 2:
        return _evaluate(items, plan, eval_dir, train_dir, log)
    groups: list[list] = [[] for _ in range(min(jobs, len(items)))]
    load = [0] * len(groups)
    for item in sorted(items, key=lambda it: -len(eval_points(plan, it[0]))):  # largest first, to the lightest
        k = load.index(min(load))
        groups[k].append(item)
        load[k] += len(eval_points(plan, item[0]))
    with ProcessPoolExecutor(len(groups), mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(_evaluate, groups, [plan] * len(groups), [eval_dir] * len(groups),
                              [train_dir] * len(groups)))  # fmt: skip
    by_run: dict[tuple[str, int], list[dict]] = {(row, seed): [] for row, seed, _ in items}
    for rows, _ in parts:
        for r in rows:
            by_run[(r["row"], r["seed"])].append(r)
    for (row, seed), rows in by_run.items():
        points = {(r["patch"], r["shift_ms"], r["max_frames"]) for r in rows}
        log(f"      evaluated {row} (seed {seed}) at {len(points)} points")
    return [r for rows in by_run.values() for r in rows], parts[0][1]


def _evaluate(items: list[tuple[str, int, str]], plan: DemoPlan, eval_dir: str, train_dir: str, log=None):
    """:func:`evaluate_runs` of ``(row, seed, run folder)`` items in this process."""
    import torch

    from flexast.model.checkpoint import load_checkpoint
    from flexast.model.data import open_data, training_stats
    from flexast.model.evaluate import score_source
    from flexast.model.metrics import wilson_interval
    from flexast.model.patch_embed import patch_of
    from flexast.pipeline.datasource import open_source
    from flexast.pipeline.demo_sounds import TEMPORAL
    from flexast.pipeline.resolution import TimeScale

    if log is None:  # a worker process of evaluate_runs: one thread, as the trainings use
        torch.set_num_threads(1)
    train = open_source(train_dir)  # index only: the vocabulary and the training statistics
    stats, vocab = training_stats(train), train.label_names
    data = open_data(eval_dir, "held-out set")
    cache: dict[tuple[float, int], object] = {}
    results = []
    for row, seed, run_dir in items:
        model = load_checkpoint(Path(run_dir) / "final")
        scored: dict[tuple, dict] = {}
        for sweep, value, p, shift, frames in eval_points(plan, row):
            padded = row in PADDED_ROWS
            key = (p, shift, frames)
            if key not in scored:
                if (shift, frames) not in cache:
                    cache[(shift, frames)] = cut_set(data, shift, frames)
                clips = cache[(shift, frames)]
                out = score_source(
                    model,
                    clips,
                    patch=patch_of(model.config.base_patch, model.config.resize_axes, p),
                    resolution=TimeScale(shift),
                    max_frames=frames,
                    norm=tuple(stats[str(float(shift))]),  # the training statistics, as prediction uses
                    vocab=vocab,  # held-out labels matched to the training vocabulary by name
                    single=True,
                    pad_to=256 if padded and p == BASE_PATCH else 0,
                    budget=8192,
                )
                hit = np.asarray(out["scores"].argmax(1) == out["targets"])  # (N,) right or wrong per clip
                correct = int(hit.sum())
                temporal = np.isin(np.asarray(out["targets"]), [vocab.index(c) for c in TEMPORAL if c in vocab])
                n = len(out["keys"])
                lo, hi = wilson_interval(correct, n)
                lengths = _lengths(clips, shift)  # (N,) frames after the cut
                kept = np.minimum(lengths, 256) if padded and p == BASE_PATCH else _trim_all(lengths, p)
                scored[key] = {
                    "top1": correct / n,
                    "lo": lo,
                    "hi": hi,
                    "n_clips": n,
                    "seconds": float(np.mean(kept) * shift / 1000),
                    "tokens": out["tokens"],
                    "top1_spectral": float(hit[~temporal].mean()) if (~temporal).any() else float("nan"),
                    "top1_temporal": float(hit[temporal].mean()) if temporal.any() else float("nan"),
                }
            results.append(
                {
                    "row": row,
                    "model": ROWS[row][0],
                    "seed": seed,
                    "sweep": sweep,
                    "value": value,
                    "patch": p,
                    "shift_ms": shift,
                    "max_frames": frames,
                    "padded": padded and p == BASE_PATCH,
                    **scored[key],
                }
            )
        if log is not None:
            log(f"      evaluated {row} (seed {seed}) at {len(scored)} points")
    return results, {"chance": 1.0 / len(vocab), "n_eval": data.n_clips, "classes": list(vocab)}


def _trim_all(lengths: np.ndarray, p: int) -> np.ndarray:
    """Frames a packed model sees: cut to a multiple of the patch, one patch at least (eval pads a short clip)."""
    return np.maximum((lengths // p) * p, p)


# ---- the command --------------------------------------------------------------------------------


def run_demo(out: str | Path = "demo_out", quick: bool = False, full: bool = False, jobs: int = 0, log=print) -> dict:
    """Run the demo into ``out``; returns the claims and timings (also written to ``claims.json``)."""
    from flexast.model.demo_report import write_report

    plan = PLANS["quick" if quick else "full" if full else "default"]
    jobs = jobs or min(2, os.cpu_count() or 1)
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = make_data(out, plan, jobs, log)
    t_data = time.perf_counter() - t_start
    t = time.perf_counter()
    runs = train_rows(out, plan, shards, jobs, log)
    t_train = time.perf_counter() - t
    log("[4/5] evaluating on the held-out set (training statistics, labels by name)")
    t = time.perf_counter()
    rows, info = evaluate_runs(runs, plan, shards["eval"], shards["train"], 1 if plan.in_process else jobs, log)
    t_eval = time.perf_counter() - t
    timings = {"data_s": t_data, "train_s": t_train, "eval_s": t_eval, "total_s": time.perf_counter() - t_start}
    summary = write_report(out, plan, runs, rows, info, timings, {k: v[0] for k, v in ROWS.items()})
    log(f"[5/5] {out / 'report.md'}, {out / 'claims.json'}; whole demo {timings['total_s']:.0f} s\n")
    log(summary["table"])
    return summary
