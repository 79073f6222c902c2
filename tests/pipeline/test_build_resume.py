"""Kill-and-resume: SIGKILL a build mid-shard, rerun the same command, get an uninterrupted build's bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from flexast.pipeline.build import build_shards
from flexast.pipeline.build_config import BuildConfig
from flexast.pipeline.shard_task import STALL_ENV
from tests.factories import write_collection
from tests.pipeline.test_build import tree_bytes


def run_cli(args, env=None, **kwargs):
    cmd = [sys.executable, "-m", "flexast.pipeline.cli", "build-shards", *args]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True, **kwargs)  # fmt: skip


def test_sigkill_mid_build_then_rerun_equals_uninterrupted(tmp_path):
    manifest, _ = write_collection(tmp_path, n=8)
    out = str(tmp_path / "killed")
    args = [manifest, "--out", out, "--shard-samples", "2", "--workers", "1"]

    marker = tmp_path / "stalled"
    proc = run_cli(args, env={STALL_ENV: f"train-000002:{marker}"})
    deadline = time.monotonic() + 120
    while not marker.exists():  # the build reached the middle of shard 2 of 4 and is stalled there
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "build never reached the stall point"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    left = sorted(os.listdir(out))
    assert "index.json" not in left and "rejected.jsonl" not in left  # the build is visibly unfinished
    assert "train-000000.tar" in left and "train-000001.tar" in left and "train-000002.tar" not in left
    assert any(name.startswith(".train-000002.tar.tmp-") for name in left)  # a partial shard under a temp name
    assert sorted(os.listdir(os.path.join(out, "_parts"))) == ["train-000000.json", "train-000001.json"]

    rerun = run_cli(args)
    log, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, log
    assert "2 already finished" in log and "read 8 = written 8 + rejected 0" in log

    reference = build_shards(manifest, str(tmp_path / "reference"), BuildConfig(name="manifest", shard_samples=2),
                             workers=1, progress=False)  # fmt: skip
    assert tree_bytes(out) == tree_bytes(reference.out)
