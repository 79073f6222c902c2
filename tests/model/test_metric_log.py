"""Metric logging: rows in metrics.jsonl in order, and a log without a file (other ranks) writes nothing."""

from __future__ import annotations

import json

import torch

from flexast.model.distributed import Ranks, pick_device
from flexast.model.metric_log import MetricLog


def test_rows_are_appended_as_json_lines(tmp_path):
    log = MetricLog(tmp_path / "metrics.jsonl")
    log.start_phase("ast", total=2, done=0)  # progress off: no bar
    log.write({"step": 1, "loss": 0.5})
    log.write({"step": 1, "split": "valid", "top1": 0.25})
    log.close()
    log.write({"step": 2})  # after close: nothing
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 0.5}, {"step": 1, "split": "valid", "top1": 0.25}]
    MetricLog(tmp_path / "metrics.jsonl").write({"step": 3})  # a resumed run appends
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_log_without_a_file_is_silent(tmp_path):
    log = MetricLog(None, tmp_path / "tb", progress=True)
    log.start_phase("ast", total=3, done=0)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_one_process_is_rank_zero_of_one(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = Ranks.start("cpu")
    assert (ranks.rank, ranks.world, ranks.is_main, ranks.device) == (0, 1, True, torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    assert ranks.wrap(model) is model
    ranks.barrier()
    ranks.close()
    assert pick_device("cuda:1") == torch.device("cuda:1")
    assert pick_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
