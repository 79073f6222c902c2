"""GPU training-step check: host↔device syncs per step and per micro-step, and compiled vs eager ms/step with the
number of graphs compiled.

Run (on a GPU; ``benchmarks/gpu_check.sh`` calls it):
    .venv/bin/python benchmarks/gpu_train.py [--steps 12] [--preset base] [--budget 16384]
Check its code on the CPU (tiny model, few steps, ``eager`` compile backend, the CPU sync counter):
    .venv/bin/python benchmarks/gpu_train.py --dry-run

Workload: the trainer's own step (``Trainer._update``, bf16 autocast on CUDA) on synthetic 4-10 s clips at
128 mel bins, FlexiAST at patch sizes 16/24/32 with ElasticAST's attention pooling and factorised positions,
``--budget`` tokens per micro-step and two micro-steps per optimizer step.

Syncs: on CUDA ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising call warn, and the warnings
raised inside the steps are counted; on the CPU (``--dry-run``) ``tests/model/sync_counter.py`` counts the
read-backs of tensors that would live on the device. Target: one per optimizer step (the loss and gradient norm,
read together), none per micro-step.

Compile: the same steps with ``run.compile`` on and off; ms/step over the steps after the first two (the first
compiles), and dynamo's graph count (:func:`model.step.compile_count`) after the first step and at the end: a
recompile shows as growth after step 1.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch._dynamo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexast.model import step as step_io  # noqa: E402
from flexast.model.config import from_dict  # noqa: E402
from flexast.model.train import Trainer  # noqa: E402
from tests.factories import synthetic_clipset  # noqa: E402
from tests.model.sync_counter import CountedBatches, SyncCounter  # noqa: E402


def make_config(args, out_dir: str, compile_: bool, device: str):
    cpu = device == "cpu"
    model = {"preset": args.preset, "n_mels": 128, "base_patch": [16, 16], "pool": "attn", "pos_embed": "factorized"}
    if cpu:  # --dry-run: a model the CPU runs in seconds
        model = {**model, "preset": "custom", "embed_dim": 64, "depth": 2, "num_heads": 2}
    return from_dict(
        {
            "run": {
                "out_dir": out_dir,
                "progress": False,
                "tensorboard": False,
                "seed": 0,
                "device": device,
                "compile": compile_,
                "attention": "padded" if cpu else "auto",
            },
            "data": {
                "loader": {
                    "label_mode": "index",
                    "max_frames": 1024,
                    "budget_tokens": args.budget,
                    "resolution": {"kind": "fixed", "shift_ms": 10.0},
                }
            },
            "model": model,
            "recipe": {"name": "flexiast", "patch_sizes": [16, 24, 32]},
            "optim": {"lr": 1e-4, "steps": 10**6, "warmup_steps": 0, "grad_accum_tokens": 2 * args.budget - 1},
        }
    )


def _endless(loader):
    while True:
        yield from loader


def run_steps(args, device: str, compile_: bool, count_syncs: bool) -> dict:
    """``args.steps`` optimizer steps of a fresh trainer: ms per step, graphs, syncs per step and micro-step."""
    data = synthetic_clipset(n_clips=args.clips, n_mels=128, min_frames=400, max_frames=1000, shifts_ms=(10.0,))
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(make_config(args, out, compile_, device), train_data=data)
        tr.setup()
        phase = tr.phases[0]
        src = CountedBatches(_endless(tr.loader))
        cuda = tr.device.type == "cuda"
        sync = (lambda: torch.cuda.synchronize(tr.device)) if cuda else (lambda: None)
        times, graphs, syncs, micro = [], [], [], []
        counter, move = None, step_io.to_device
        if count_syncs and not cuda:
            counter = SyncCounter(tr.model)
            step_io.to_device = counter.marking(move)
            tr.optimizer.step = counter.paused(tr.optimizer.step)
        try:
            for i in range(args.steps):
                drawn = src.drawn
                sync()
                t0 = time.perf_counter()
                if count_syncs and cuda and i >= 2:  # steps 1-2 compile, allocate and warm caches
                    torch.cuda.set_sync_debug_mode("warn")
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        tr._update(src, phase)
                    torch.cuda.set_sync_debug_mode(0)
                    syncs.append(sum("synchroniz" in str(w.message) for w in caught))
                elif counter is not None and i >= 1:
                    # the loader builds batches on the host; drawn outside the count (its .to("cpu") calls would
                    # otherwise look like moves to the device on a CPU)
                    ahead = CountedBatches(iter([next(src) for _ in range(8)]))
                    before = counter.count
                    with counter:
                        tr._update(ahead, phase)
                    syncs.append(counter.count - before)
                    src.drawn += ahead.drawn - 8
                else:
                    tr._update(src, phase)
                sync()
                times.append(time.perf_counter() - t0)
                graphs.append(step_io.compile_count())
                micro.append(src.drawn - drawn)
        finally:
            step_io.to_device = move
            tr.cleanup()
    timed = times[2:] or times
    return {
        "ms_per_step": 1e3 * sorted(timed)[len(timed) // 2],
        "graphs_after_step1": graphs[0],
        "graphs_at_end": graphs[-1],
        "micro_per_step": sum(micro) / len(micro),
        "syncs_per_step": (sum(syncs) / len(syncs)) if syncs else None,
        "backend": tr.model.attention_backend(tr.device, torch.bfloat16 if cuda else torch.float32),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first two are not timed)")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--budget", type=int, default=16384, help="tokens per micro-step")
    ap.add_argument("--clips", type=int, default=256, help="synthetic clips in the training set")
    ap.add_argument("--dry-run", action="store_true", help="run this check's code on the CPU, tiny sizes")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.steps, args.budget, args.clips = 4, 1024, 24
        torch.compile = functools.partial(torch.compile, backend="eager")  # dynamo's guards, no code generation
        device = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device (use --dry-run to check this script on the CPU)")
    else:
        device = "cuda"
    eager = run_steps(args, device, compile_=False, count_syncs=True)
    print(
        f"syncs: {eager['syncs_per_step']} per optimizer step of {eager['micro_per_step']:.1f} micro-steps "
        f"(target 1 per step, 0 per micro-step); attention backend {eager['backend']}"
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = run_steps(args, device, compile_=True, count_syncs=False)
    print(
        f"eager {eager['ms_per_step']:.1f} ms/step, compiled {compiled['ms_per_step']:.1f} ms/step "
        f"({eager['ms_per_step'] / compiled['ms_per_step']:.2f}x); graphs compiled: {compiled['graphs_after_step1']} "
        f"after step 1, {compiled['graphs_at_end']} after {args.steps} steps at 3 patch sizes "
        f"(recompiles: {compiled['graphs_at_end'] - compiled['graphs_after_step1']})"
    )


if __name__ == "__main__":
    main()
