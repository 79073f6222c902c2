"""inspect's summary and plot; verify passes a good build and names the shard of every kind of damage."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from flexast.pipeline.cli import main
from flexast.pipeline.errors import ShardError
from flexast.pipeline.shard_report import load_index, plot_durations, summary, verify
from tests.factories import build_small_shards


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A good build (tar + Zarr, two shifts, 3 shards) that each test copies before damaging it."""
    root = tmp_path_factory.mktemp("inspect")
    return build_small_shards(root, n=7, shifts_ms=(10.0, 20.0), shard_samples=3, fmt="both")


@pytest.fixture
def copy(built, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(built.out, out)
    return out


def test_summary_and_plot(built, tmp_path, capsys):
    index = load_index(built.out)
    text = summary(index)
    assert "samples       7   in 3 shards" in text
    assert "read 7 = written 7 + rejected 0" in text
    assert f"{index['frames_per_shift']['s20']:>12}" in text and f"{index['stats']['s10']['mean']:>10.4f}" in text
    png = plot_durations(index, str(tmp_path / "d.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", built.out, "--plot", str(tmp_path / "e.png")]) == 0
    assert "samples       7" in capsys.readouterr().out and os.path.getsize(tmp_path / "e.png") > 1000


def test_verify_passes_a_good_build(built, capsys):
    report = verify(built.out)
    assert report.ok and report.samples == 7 and report.shards == 3
    assert main(["verify", built.out]) == 0
    assert "7 samples in 3 shards read back: OK" in capsys.readouterr().out


def test_verify_names_a_truncated_shard(copy, capsys):
    path = os.path.join(copy, "train-000001.tar")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    report = verify(copy)
    assert not report.ok and all("train-000001.tar" in p for p in report.problems)
    assert main(["verify", copy]) == 1
    assert "train-000001.tar" in capsys.readouterr().err


def test_verify_catches_counts_shapes_and_zarr(copy):
    with open(os.path.join(copy, "index.json")) as f:
        index = json.load(f)
    index["shards"][0]["samples"] += 1
    index["shards"][2]["frames"]["s20"] -= 1
    with open(os.path.join(copy, "index.json"), "w") as f:
        json.dump(index, f)
    shutil.rmtree(os.path.join(copy, "store.zarr", "train-000001", "s10"))
    problems = verify(copy).problems
    assert any(p.startswith("train-000000.tar:") and "index.json says 4" in p for p in problems)
    assert any(p.startswith("train-000002.tar:") and "at s20" in p for p in problems)
    assert any(p.startswith("store.zarr/train-000001:") and "s10" in p for p in problems)


def test_missing_index_is_a_typed_error(tmp_path):
    with pytest.raises(ShardError, match=r"no index\.json"):
        load_index(str(tmp_path))
    assert main(["verify", str(tmp_path)]) == 2
