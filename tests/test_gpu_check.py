"""``benchmarks/gpu_check.sh`` and the python pieces it calls, run on the CPU with ``DRY_RUN=1`` (their
``--dry-run``): so that the one GPU check a lent device runs is known to work before a GPU runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from step import peak_tflops  # noqa: E402


def test_peak_is_looked_up_by_the_exact_device_model():
    assert peak_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 Something New") is None  # unknown: no MFU rather than a wrong one
    assert peak_tflops("NVIDIA H100 Something New", override=900.0) == 900.0


@pytest.mark.slow
def test_gpu_check_script_runs_every_section_on_the_cpu(tmp_path):
    log = tmp_path / "gpu_check.log"
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(log)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    sections = re.findall(r"^=== (.+?) \(", text, re.M)
    assert len(sections) == 6 and sections[-1] == "done", sections
    assert re.findall(r"^\[(exit \d+|TIMED OUT.*)\]$", text, re.M) == ["exit 0"] * 4, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert re.search(r"tests/model/test_attention.py::test_gpu_backends_match_reference\[.*\] SKIPPED", text)
    for variant in ("varlen", "padded", "dense_rows"):
        assert re.search(rf"^  {variant} +[\d.]+ ms/step +\d+ real tokens/s", text, re.M), variant
    assert re.search(r"GPU fbank .*16 shifts \d+ clips/s.*max \|Δ\| vs CPU .*near silence", text)
    assert "syncs: 1.0 per optimizer step of" in text  # the CPU sync counter: one read per step, none per micro-step
    # issue 16's bound: no more graphs than patch sizes (the first new shape may add one dynamic-size graph)
    m = re.search(r"graphs compiled: (\d+) after step 1, (\d+) after \d+ steps at (\d+) patch sizes", text)
    assert m and int(m.group(2)) <= int(m.group(3)), text[-2000:]
