"""Issue 12 item 8: SIGKILL to the ``build-shards`` driver alone (as the OOM killer sends) leaves no process behind.

The local pool's workers are forked by a fork server; before, a killed driver left the fork server, both workers
and multiprocessing's resource tracker running for good, the workers still writing shards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flexast.pipeline.shard_task import STALL_ENV
from tests.factories import write_collection

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process tree from /proc")


def state(pid: int) -> str | None:
    """The process state letter of ``pid`` (``R``, ``S``, ``Z``, …), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found += children
        todo += children
    return found


def build_cmd(manifest, out) -> list[str]:
    return [sys.executable, "-m", "flexast.pipeline.cli", "build-shards", manifest, "--out", out,
            "--shard-samples", "2", "--workers", "2", "--quiet"]  # fmt: skip


def test_sigkill_to_the_driver_alone_leaves_no_orphans(tmp_path):
    manifest, _ = write_collection(tmp_path, n=8)
    out = str(tmp_path / "out")
    marker = tmp_path / "stalled"
    env = {**os.environ, STALL_ENV: f"train-000000:{marker}"}  # one worker stalls inside shard 0
    driver = subprocess.Popen(build_cmd(manifest, out), env=env, start_new_session=True)
    helpers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert driver.poll() is None, "the build ended before reaching the stall point"
            assert time.monotonic() < deadline, "the build never reached the stall point"
            time.sleep(0.1)
        helpers = descendants(driver.pid)  # fork server, two workers, resource tracker
        assert int(marker.read_text()) in helpers and len(helpers) >= 3, helpers
        os.kill(driver.pid, signal.SIGKILL)  # the driver only, not its process group
        driver.wait(timeout=30)
        deadline = time.monotonic() + 60  # a liveness bound, not a timing claim: before, they never exited
        while (alive := [p for p in helpers if state(p) not in (None, "Z")]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"still running after the driver was killed: {alive}"
    finally:
        for pid in [driver.pid, *helpers]:
            if state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)

    # nothing good lost: the same command resumes and accounts for every row
    rerun = subprocess.run(build_cmd(manifest, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    assert (index["read"], index["written"], index["rejected"]) == (8, 8, 0)
