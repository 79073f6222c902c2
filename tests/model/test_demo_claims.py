"""95% intervals against textbook values, the demo's claims decided from hand-made results, the sweep cuts."""

from __future__ import annotations

import numpy as np
import pytest

from flexast.model.demo import _lengths, cut_set
from flexast.model.demo_report import claims, verdict
from flexast.model.metrics import bootstrap_interval, top1_accuracy, wilson_interval
from flexast.pipeline.datasource import MemorySource


def test_wilson_interval_textbook_values():
    # Wilson (1927) score interval, z = 1.96: 8 of 10 → (0.4902, 0.9433); 0 of 10 → (0, z²/(n + z²)).
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(1.96**2 / (10 + 1.96**2), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and np.isnan(wilson_interval(0, 0)[0])
    with pytest.raises(ValueError, match="k=11"):
        wilson_interval(11, 10)


def test_bootstrap_agrees_with_wilson_for_a_proportion():
    rng = np.random.default_rng(0)
    n = 800
    targets = rng.integers(0, 4, n)
    scores = np.eye(4)[np.where(rng.random(n) < 0.85, targets, (targets + 1) % 4)]  # (n, 4), ~85% right
    k = round(top1_accuracy(scores, targets) * n)
    w = wilson_interval(k, n)
    b = bootstrap_interval(top1_accuracy, scores, targets, n_boot=400)
    assert b[0] == pytest.approx(w[0], abs=0.01) and b[1] == pytest.approx(w[1], abs=0.01)


def _row(row, sweep, value, top1, n=800, seed=0):
    lo, hi = wilson_interval(round(top1 * n), n)
    return {"row": row, "seed": seed, "sweep": sweep, "value": value, "top1": top1, "lo": lo, "hi": hi,
            "n_clips": n, "seconds": 2.56, "padded": False}  # fmt: skip


def _results(flex32=0.89, elastic40=0.88):
    rows = []
    for p, fixed, flex in ((16, 0.30, 0.80), (32, 0.90, flex32), (48, 0.20, 0.75)):
        rows += [_row("ast", "patch", p, fixed), _row("flexiast", "patch", p, flex)]
    for s, fixed, el in ((10.0, 0.90, 0.90), (20.0, 0.50, 0.89), (40.0, 0.30, elastic40)):
        rows += [_row("ast", "shift", s, fixed), _row("elasticast", "shift", s, el)]
    for n, fixed, el in ((128, 0.60, 0.89), (256, 0.90, 0.90), (512, 0.90, 0.90)):
        rows += [_row("ast", "length", n, fixed), _row("elasticast", "length", n, el)]
    rows += [
        _row("ast", "operating", 32, 0.90),
        _row("c2f", "operating", 32, 0.89),
        _row("ast_short", "operating", 32, 0.85),
    ]
    runs = {("ast", 0): {"flops": 100.0}, ("c2f", 0): {"flops": 60.0}, ("ast_short", 0): {"flops": 61.0}}
    return rows, runs


def test_claims_hold_and_fail_where_the_numbers_say():
    rows, runs = _results()
    c = claims(rows, runs, {"n_eval": 800}, [0])
    by = {x["id"]: x for x in c["claims"]}
    assert c["n_eval_clips"] == 800 and c["seeds"] == [0]
    assert all(x["holds"] for x in c["claims"]), [verdict(x) for x in c["claims"]]
    assert by["flexiast_other_patches"]["measured"]["patches"] == [16, 48]
    assert by["elastic_shifts"]["elastic_spread"] == pytest.approx(0.02)
    assert by["elastic_shifts"]["fixed_worst_drop"] == pytest.approx(0.60)
    assert by["c2f_flops"]["measured"] == {"baseline_flops": 100.0, "c2f_flops": 60.0, "baseline": 0.9, "c2f": 0.89}

    for r in rows:  # per class family: the spectral classes flat across shifts, the temporal ones not
        if r["row"] == "elasticast" and r["sweep"] == "shift":
            r["top1_spectral"], r["top1_temporal"] = 0.95, {10.0: 0.9, 20.0: 0.8, 40.0: 0.6}[r["value"]]
    by = {x["id"]: x for x in claims(rows, runs, {"n_eval": 800}, [0])["claims"]}
    fam = by["elastic_shifts"]["elastic_spread_by_family"]
    assert fam["spectral"] == pytest.approx(0.0) and fam["temporal"] == pytest.approx(0.3)
    assert "spectral classes 0.000, temporal 0.300" in verdict(by["elastic_shifts"])

    rows, runs = _results(flex32=0.85, elastic40=0.80)  # 5 points below at the base patch; 10 points of spread
    by = {x["id"]: x for x in claims(rows, runs, {"n_eval": 800}, [0])["claims"]}
    assert not by["flexiast_base_patch"]["holds"] and not by["elastic_shifts"]["holds"]
    assert "-0.050" in verdict(by["flexiast_base_patch"]) and "lowest at 40" in verdict(by["elastic_shifts"])


def test_cut_set_keeps_the_centre_of_one_shift():
    x = np.arange(20, dtype=np.float16).reshape(10, 2)  # (T=10, F=2)
    rec = {"key": "k", "url": "u", "meta": {"label_ids": [0], "frames": {"s10": 10, "s20": 5}},
           "loc": {"s10": x, "s20": x[:5]}}  # fmt: skip
    cut = cut_set(MemorySource("mem", {}, {"u": [rec]}), 10.0, 4)
    out = cut.records(cut.shards[0])[0]
    assert set(out["loc"]) == {"s10"} and out["meta"]["frames"] == {"s10": 4}
    np.testing.assert_array_equal(out["loc"]["s10"], x[3:7])  # a slice of the stored frames: an exact copy
    np.testing.assert_array_equal(_lengths(cut, 10.0), [4])


def test_row_configs_share_steps_warm_starts_and_teachers(tmp_path):
    """Each row's steps and warm start follow the plan: the FlexiAST rows fine-tune their parent's weights (at
    half its steps or its final ones) for the rest of ``steps`` and distil that parent when ``flex_kd`` > 0."""
    from dataclasses import replace

    from flexast.model.demo import PLANS, ROWS, row_config

    shards = {"train": "t", "valid": "v"}
    plan = replace(PLANS["default"], steps=400, elastic_steps=600, c2f_phase2=0.5, flex_init="half", flex_kd=0.0)
    cfgs = {r: row_config(r, plan, 3, shards, tmp_path / f"{r}_s3") for r in ROWS}
    assert {r: c.optim.steps for r, c in cfgs.items()} == {
        "ast": 400, "flexiast": 200, "elasticast": 600, "flexi_elastic": 200,  # FlexiAST: steps / 2 on the parent
        "c2f": 225, "ast_short": 225,  # c2f's phases: 25 pooled steps (as many clips as 100 full ones) + 200 full
    }  # fmt: skip
    assert [ph.steps for ph in cfgs["c2f"].recipe.phases] == list(plan.c2f_steps) == [25, 200]
    for r in ("elasticast", "flexi_elastic"):  # 40 ms, the hardest shift, for half the clips; 10 and 20 a quarter each
        policy = cfgs[r].data.loader.policy()
        assert policy.kind == "random" and sorted(policy.shifts_ms) == [10, 20, 40, 40]
    assert {cfgs[r].data.loader.policy().shift_ms for r in ("ast", "flexiast", "c2f", "ast_short")} == {10}
    # one tokenisation for every row: full-band patches 16 frames wide; a patch size is a width (time_only)
    assert {tuple(c.model.base_patch) for c in cfgs.values()} == {(64, 16)}
    assert all(c.recipe.time_only for c in cfgs.values())
    assert cfgs["ast"].run.ckpt_every == 200 and cfgs["elasticast"].run.ckpt_every == 300
    assert cfgs["flexiast"].model.init == str(tmp_path / "ast_s3" / "half") and not cfgs["flexiast"].recipe.kd.teacher

    plan = replace(plan, flex_init="final", flex_kd=0.9, flex_patches=(16, 32, 32))
    cfg = row_config("flexi_elastic", plan, 3, shards, tmp_path / "flexi_elastic_s3")
    assert cfg.model.init == cfg.recipe.kd.teacher == str(tmp_path / "elasticast_s3" / "final")
    assert cfg.recipe.kd.alpha == 0.9 and cfg.recipe.patch_sizes == [16, 32, 32] and cfg.optim.steps == 200
