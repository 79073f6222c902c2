"""The one-command demo end to end at smoke-test size: data → shards → two trainings → sweeps → report."""

from __future__ import annotations

import csv

import pytest

from flexast.model.cli import main


@pytest.mark.slow
def test_demo_quick_writes_the_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "top1 by patch size" in out and "chance" in out
    report = (tmp_path / "report.md").read_text()
    for needle in (
        "# flexast demo report",
        "FlexiAST+ElasticAST",
        "AST (fixed patch 32)",
        "metric_vs_patch.png",
        "GFLOP",
        "Whole demo",
    ):
        assert needle in report, needle
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    assert {r["sweep"] for r in rows} == {"patch", "shift", "length"}
    assert len(rows) == 2 * (3 + 3 + 2)
    for name in ("metric_vs_patch.png", "metric_vs_resolution.png", "metric_vs_length.png"):
        assert (tmp_path / name).stat().st_size > 2000
    for run in ("flexi_elastic", "baseline_p32"):
        assert (tmp_path / "runs" / run / "final" / "model.safetensors").exists()
        assert (tmp_path / "runs" / run / "report.md").exists()
