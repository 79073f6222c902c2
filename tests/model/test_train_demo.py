"""The one-command demo end to end at smoke-test size: data → shards → six trainings → sweeps → claims and report."""

from __future__ import annotations

import csv
import json

from flexast.model.cli import main
from flexast.model.demo import BASE_PATCH, PLANS, ROWS, eval_points

CLAIM_FIELDS = {
    "flexiast_base_patch": {"fixed", "flexible", "patch"},
    "flexiast_other_patches": {"patches", "fixed", "flexible", "flexible_lo", "fixed_hi"},
    "elastic_shifts": {"shifts_ms", "elastic", "fixed"},
    "elastic_lengths": {"frames", "elastic", "fixed"},
    "c2f_flops": {"baseline_flops", "c2f_flops", "baseline", "c2f"},
}


def test_demo_quick_writes_claims_report_and_plots(tmp_path, capsys):
    plan = PLANS["quick"]
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "flexiast_base_patch" in out and "whole demo" in out

    claims = json.loads((tmp_path / "claims.json").read_text())
    assert claims["n_eval_clips"] == plan.n_held_out and claims["seeds"] == list(plan.seeds)
    by_id = {c["id"]: c for c in claims["claims"]}
    assert set(by_id) == set(CLAIM_FIELDS)
    for cid, fields in CLAIM_FIELDS.items():
        assert set(by_id[cid]["measured"]) == fields, cid
        assert isinstance(by_id[cid]["holds"], bool)
    other = by_id["flexiast_other_patches"]["measured"]
    assert other["patches"] == [p for p in plan.patches if p != BASE_PATCH]
    assert by_id["flexiast_base_patch"]["measured"]["patch"] == BASE_PATCH == 16  # the demo's 64×16 patch
    assert by_id["elastic_shifts"]["measured"]["shifts_ms"] == [10.0, 20.0, 40.0]
    # The FLOP-matched baseline and coarse-to-fine both spend less than the full baseline.
    c2f = by_id["c2f_flops"]
    assert c2f["measured"]["c2f_flops"] < c2f["measured"]["baseline_flops"]
    assert c2f["flop_matched_baseline"]["flops"] < c2f["measured"]["baseline_flops"]

    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    assert len(rows) == sum(len(eval_points(plan, r)) for r in ROWS) * len(plan.seeds)
    for r in rows:
        assert float(r["lo"]) <= float(r["top1"]) <= float(r["hi"]) and int(r["n_clips"]) == plan.n_held_out
    shift_secs = {float(r["seconds"]) for r in rows if r["sweep"] == "shift" and r["row"] == "elasticast"}
    assert len(shift_secs) == 1  # every frame shift sees the same seconds of audio

    report = (tmp_path / "report.md").read_text()
    for needle in ("# flexast demo report", "## Claims", "token budget", "loss_curves.png", "Wilson", "FlexiAST only"):
        assert needle in report, needle
    for name in ("top1_vs_patch", "top1_vs_shift", "top1_vs_length", "loss_curves", "c2f_flops"):
        assert (tmp_path / f"{name}.png").stat().st_size > 2000, name
    for row in ROWS:
        assert (tmp_path / "runs" / f"{row}_s0" / "final" / "model.safetensors").exists()

    # The same evaluation shared out to two processes gives the same rows, in the order of the runs (a peer run).
    from flexast.model.demo import evaluate_runs

    runs = {(row, 0): {"dir": tmp_path / "runs" / f"{row}_s0"} for row in ROWS}
    shards = tmp_path / "shards"
    again, info = evaluate_runs(runs, plan, str(shards / "eval"), str(shards / "train"), jobs=2, log=lambda *a: None)
    assert info["n_eval"] == plan.n_held_out and list(dict.fromkeys(r["row"] for r in again)) == list(ROWS)
    # Compared as counts of right clips (integers): top1 is that count over the clips, and a count can only
    # change if a clip's two best scores tie to within float rounding, which these runs do not reach.
    first = {(r["row"], r["sweep"], float(r["value"])): round(float(r["top1"]) * int(r["n_clips"])) for r in rows}
    assert {(r["row"], r["sweep"], float(r["value"])): round(r["top1"] * r["n_clips"]) for r in again} == first
