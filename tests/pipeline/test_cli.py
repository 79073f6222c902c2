"""The ``pipeline`` command: help for every subcommand, exit codes, registration of new subcommands."""

from __future__ import annotations

import argparse
import os

import pytest

from flexast.pipeline import cli
from tests.factories import write_bad_inputs, write_collection, write_manifest


@pytest.mark.parametrize("command", ["build-shards", "inspect", "verify", "demo-data"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert "usage: pipeline " + command in capsys.readouterr().out


def test_build_exit_codes(tmp_path, capsys):
    manifest, rows = write_collection(tmp_path, n=2)
    bad = write_bad_inputs(tmp_path)
    out = str(tmp_path / "ok")
    args = ["build-shards", manifest, "--out", out, "--workers", "1", "--quiet", "--shifts", "10,20"]
    assert cli.main(args) == 0
    assert os.path.exists(os.path.join(out, "train-000000.tar"))

    mixed = write_manifest(tmp_path / "mixed.csv", [*rows, bad["missing"]])
    base = ["build-shards", mixed, "--workers", "1", "--quiet"]
    assert cli.main([*base, "--out", str(tmp_path / "m1")]) == 0  # a rejection alone is not a failure
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "m2"), "--strict"]) == 1
    assert "1 row(s) rejected and --strict" in capsys.readouterr().err  # said even with --quiet

    nothing = write_manifest(tmp_path / "nothing.csv", [bad["empty"], bad["missing"]])
    assert cli.main(["build-shards", nothing, "--out", str(tmp_path / "n"), "--workers", "1", "--quiet"]) == 1
    assert "nothing was written" in capsys.readouterr().err

    # A changed config refuses (a typed error, status 2) unless --overwrite.
    assert cli.main([*args[:-2], "--shifts", "elastic"]) == 2
    assert "another config" in capsys.readouterr().err


def test_demo_data_command(tmp_path, capsys):
    assert cli.main(["demo-data", str(tmp_path / "d"), "--clips", "8"]) == 0
    assert os.path.exists(tmp_path / "d" / "train.csv") and "build-shards" in capsys.readouterr().out


def test_commands_are_registrations():
    calls = []

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n", type=int, default=1)

    def run(args) -> int:
        calls.append(args.n)
        return 7

    saved = list(cli.COMMANDS)
    try:
        cli.register("hello", "say hello", add, run)
        assert cli.main(["hello", "--n", "3"]) == 7 and calls == [3]
    finally:
        cli.COMMANDS[:] = saved
