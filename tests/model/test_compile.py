"""``run.compile``: a compiled FlexiAST run compiles its encoder blocks at most once per patch size, never per step.

Dynamo's own counters count the graphs (first compiles and recompiles). The backend is ``eager`` (dynamo traces
and guards exactly as for Inductor; only code generation, minutes on 2 CPU cores, is skipped). On a GPU,
``benchmarks/gpu_check.sh`` repeats the count with Inductor.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo

from flexast.model import step as step_io
from flexast.model.train import Trainer
from tests.factories import synthetic_clipset
from tests.model import varlen_standin
from tests.model.train_helpers import tiny_run_config

PATCHES = [8, 12, 16]


class _GraphsPerStep(Trainer):
    """Records dynamo's graph count after every optimizer step."""

    def _update(self, batches, phase):
        info = super()._update(batches, phase)
        if info:
            self.graphs.append(step_io.compile_count())
        return info


@pytest.mark.parametrize("backend", ["padded", "varlen", "sdpa_loop"])
def test_compiled_flexiast_twenty_steps_compile_at_most_once_per_patch_size(backend, tmp_path, monkeypatch):
    if backend == "varlen":
        varlen_standin.install(monkeypatch, count=False)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    sections = {"run": {"compile": True, "attention": backend}}
    if backend == "varlen":  # the stand-in is bf16/fp16 only, as flash is: the GPU's bf16 autocast, on the CPU
        sections["model"] = {"pool": "attn", "pos_embed": "factorized", "token_dropout": 0.1}
    cfg = tiny_run_config(tmp_path, {"name": "flexiast", "patch_sizes": PATCHES}, steps=20, **sections)
    tr = _GraphsPerStep(cfg, train_data=synthetic_clipset(n_clips=40, seed=3))
    tr.graphs = []
    tr.setup()
    if backend == "varlen":
        monkeypatch.setattr(tr, "device", torch.device("cpu"))
        monkeypatch.setattr(tr, "_loss", _autocast_cpu(tr._loss))
    tr.train()
    tr.cleanup()
    assert len(tr.graphs) == 20
    assert tr.graphs[0] >= 1, tr.graphs  # the blocks were compiled
    if backend != "sdpa_loop":  # the GPU's backends: one graph per block code, whatever the patch or the lengths
        assert tr.graphs[-1] <= len(PATCHES), tr.graphs
    # Dynamo compiles the first step's shapes statically and, at the first other shape (a new patch size or
    # clip count), once more with dynamic sizes; after that no step compiles again.
    assert tr.graphs[-1] == tr.graphs[9], tr.graphs


def _autocast_cpu(loss_fn):
    def run(batch, phase):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_fn(batch, phase)

    return run
