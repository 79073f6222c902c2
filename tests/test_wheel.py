"""A built wheel, installed (not editable) into a fresh venv, runs ``model ls``, ``cp`` and ``train --config demo``.

The venv gets flexast from the wheel only (``--no-deps``); its dependencies come from the test's own
environment through a ``.pth`` line (a path line adds that folder without running the ``.pth`` files
inside it, so the checkout's editable install stays invisible). Every command runs from an empty folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.factories import write_shard_folder

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "model", "pipeline", "configs")


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict]:
    """A fresh venv with flexast installed from a wheel built from a copy of the sources."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    for name in SOURCES:  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
        from_path = REPO / name
        if from_path.is_dir():
            shutil.copytree(from_path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(from_path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", src], root, env, 300)
    (wheel,) = (root / "dist").glob("flexast-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], root, env)
    py = root / "venv" / "bin" / "python"
    _run([*pip, "--python", py, "install", "--no-deps", "--no-index", wheel], root, env, 300)
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, env).stdout.strip())
    (site / "flexast_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root / "venv" / "bin", env


@pytest.mark.slow  # about 13 s on 2 idle cores (build, install, a 2-step training run), over 20 s when they are busy
def test_wheel_lists_copies_and_trains_a_builtin_recipe(venv, tmp_path):
    bin_dir, env = venv
    empty = tmp_path / "work"
    empty.mkdir()
    where = _run([bin_dir / "python", "-c", "import flexast.model as m; print(m.__file__)"], empty, env).stdout
    assert str(bin_dir.parent) in where, f"flexast imported from outside the venv: {where}"

    listed = _run([bin_dir / "model", "ls"], empty, env).stdout.split("\n")
    names = [line.split()[0] for line in listed if line.strip()]
    assert names == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))

    _run([bin_dir / "model", "cp", "demo", "mine/"], empty, env)
    assert (empty / "mine" / "demo.yaml").read_text() == (REPO / "configs" / "demo.yaml").read_text()

    missing = subprocess.run(
        [str(bin_dir / "model"), "train", "--config", "no_such_recipe"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no_such_recipe" in missing.stderr and "'demo'" in missing.stderr

    shards = tmp_path / "shards"
    write_shard_folder(  # one label per clip: the demo recipe trains single-label (cross-entropy)
        shards, n_shards=1, per_shard=6, shifts_ms=(10.0, 20.0, 40.0), n_mels=128, n_classes=3, max_labels=1
    )
    sets = [
        f"data.train={shards}",
        "data.valid=",
        "optim.steps=2",
        "optim.epochs=0",
        "optim.warmup_steps=1",
        "run.out_dir=run",
        "run.progress=false",
        "data.loader.max_frames=96",
    ]
    _run([bin_dir / "model", "train", "--config", "demo", "--set", *sets], empty, env, 300)
    result = json.loads((empty / "run" / "result.json").read_text())
    assert result["steps"] == 2
    assert (empty / "run" / "final" / "model.safetensors").exists()
