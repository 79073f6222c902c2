"""Model step benchmark: forward+backward time and peak memory for packed vs padded vs ElasticAST dense-mask rows.

Run (CPU, the numbers in BENCHMARKS.md):
    .venv/bin/python benchmarks/step.py --clips 12 --repeats 3

Workload: VoxCeleb-like clip lengths (log-normal, median 6.5 s, clipped to [4, 30] s as ElasticAST caps
VoxCeleb), 128-bin fbank at 10 ms, patch 16×16, tiny preset (192 wide, 12 deep, 3 heads), ElasticAST model
options (factorised positions, attention pooling). Every variant runs the same weights on the same clips:

* ``packed``      flat packing, block-diagonal attention with the ``sdpa_loop`` backend (our CPU default)
* ``packed_pad``  flat packing, ``padded`` attention backend (clips padded to the longest only inside attention)
* ``padded``      every clip zero-padded to the longest clip; every token (padding too) goes through the network
* ``dense_rows``  ElasticAST as their paper describes: clips packed next-fit into rows of 2048 tokens, rows padded
                  to the longest row, a dense boolean (row × row) same-clip mask and a manual masked softmax

Times: in one process, each variant runs one untimed step and then ``--repeats`` timed steps, and the whole
cycle runs twice; the fastest step (least disturbed by other load on a shared machine) is reported, with the
median beside it. Memory: each
variant runs one step in a fresh subprocess, and its peak resident memory (``ru_maxrss``) growth is reported.

GPU section (runs only where CUDA exists; ``--gpu-only`` for just it, ``--dry-run`` to run its code on the CPU):
base preset, bf16 autocast, ms/step, tokens/s, useful-FLOP MFU (real clips' FLOPs from ``model.flops`` over the
dense bf16 peak of the exact device model) and peak memory for ``varlen``, ``flex``, padded SDPA and dense-mask
rows (see :func:`gpu_section`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexast.model import ASTModel, ModelConfig, batch_flops
from flexast.model.attention import Segments
from flexast.pipeline.batch import PackedBatch

VARIANTS = ("packed", "packed_pad", "padded", "dense_rows")
ROW_LEN = 2048
# Dense (no sparsity) bf16 tensor-core peak per exact device name (torch.cuda.get_device_name), from NVIDIA's
# datasheets. Looked up by the exact name: an H100 NVL or H200 NVL (835) is not an SXM part (989).
PEAK_BF16_DENSE_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM5
    "NVIDIA H100 80GB HBM3e": 989.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,  # H200 SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L4": 121.0,
}


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The dense bf16 peak of ``device_name`` (exact match), or ``override``; None when unknown."""
    return override if override else PEAK_BF16_DENSE_TFLOPS.get(device_name.strip())


def voxceleb_like_frames(n: int, seed: int = 0) -> list[int]:
    """Clip lengths in 10 ms frames: log-normal seconds (median 6.5 s, σ 0.55), clipped to [4, 30] s."""
    g = torch.Generator().manual_seed(seed)
    secs = torch.exp(math.log(6.5) + 0.55 * torch.randn(n, generator=g)).clamp(4.0, 30.0)
    return [int(s * 100) for s in secs]


def make_batch(frames: list[int], patch=(16, 16), n_mels=128, n_classes=1251, seed=0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    clips = [torch.randn(t, n_mels, generator=g) for t in frames]
    labels = torch.randint(0, n_classes, (len(frames),), generator=g)
    return PackedBatch.from_clips(clips, labels, [f"clip{i}" for i in range(len(frames))], patch)


def padded_batch(batch: PackedBatch) -> PackedBatch:
    """Every clip zero-padded (in frames) to the longest clip: the classic fixed-shape batch."""
    longest = int(batch.n_frames.max())
    clips = [torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[0])) for c in batch.clip_frames()]
    return PackedBatch.from_clips(clips, batch.labels, batch.keys, batch.patch)


def next_fit_rows(tokens: list[int], row_len: int = ROW_LEN) -> list[int]:
    """ElasticAST's packing: clips in loader order, a new row when the next clip does not fit."""
    rows, used, row = [], 0, 0
    for t in tokens:
        if used + t > row_len and used > 0:
            row, used = row + 1, 0
        rows.append(row)
        used += t
    return rows


def dense_rows_step(model: ASTModel, batch: PackedBatch) -> torch.Tensor:
    """ElasticAST's masked self-attention, as described in their paper, with the model's own weights.

    Tokens are laid into rows of at most 2048 (next-fit), rows padded to the longest row, and each block runs
    attention as ``softmax(mask(q kᵀ / sqrt(d))) v`` with a dense boolean (R, Lr, Lr) same-clip mask.
    """
    p_f, p_t = batch.patch
    hf = batch.n_mels // p_f
    total = batch.frames.shape[0] // p_t * hf
    seg = Segments(batch.cu_seqlens.to(batch.frames.device), batch.max_tokens, total, None, batch.tokens.tolist())
    x = model.patch_embed.forward_packed(batch.frames, batch.patch)  # (L, D)
    x = x + model.pos_embed.forward_packed(seg, hf, model.config.max_frames // p_t)  # (L, D)
    rows = next_fit_rows(seg.lengths())
    n_rows = rows[-1] + 1
    dev = x.device  # every index tensor on the tokens' device (segment ids live there)
    row_of_tok = torch.tensor(rows, device=dev)[seg.segment_ids()]  # (L,)
    row_tokens = torch.zeros(n_rows, dtype=torch.long, device=dev).index_add_(
        0, row_of_tok, torch.ones_like(row_of_tok)
    )  # (R,)
    lr = int(row_tokens.max())
    row_start = torch.cumsum(row_tokens, 0) - row_tokens  # (R,)
    slot = row_of_tok * lr + torch.arange(seg.total, device=dev) - row_start[row_of_tok]  # (L,)
    clip_slot = torch.full((n_rows * lr,), -1, dtype=torch.long, device=dev).index_copy(0, slot, seg.segment_ids())
    clip_slot = clip_slot.view(n_rows, lr)  # (R, Lr)
    mask = clip_slot[:, :, None] == clip_slot[:, None, :]  # (R, Lr, Lr), padding attends to padding
    d, h = x.shape[1], model.config.num_heads
    xr = x.new_zeros(n_rows * lr, d).index_copy(0, slot, x).view(n_rows, lr, d)  # (R, Lr, D)
    for block in model.encoder.blocks:
        y = block.norm1(xr)
        qkv = block.attn.qkv(y).view(n_rows, lr, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (3, R, H, Lr, Dh)
        q, k, v = qkv.unbind(0)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // h)  # (R, H, Lr, Lr)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n_rows, lr, d)  # (R, Lr, D)
        xr = xr + block.attn.proj(att)
        xr = xr + block.mlp(block.norm2(xr))
    xr = model.encoder.norm(xr)
    flat = xr.reshape(n_rows * lr, d).index_select(0, slot)  # (L, D)
    logits, _ = model.head(flat, seg)
    return logits


def build_model(preset: str, depth: int | None, backend: str) -> ASTModel:
    overrides = dict(num_classes=1251, pool="attn", pos_embed="factorized", attention=backend, max_frames=1024)
    if depth:
        overrides["depth"] = depth
    torch.manual_seed(0)
    return ASTModel(ModelConfig.preset(preset, **overrides))


def make_steps(args) -> tuple[dict, dict]:
    """One model and one closure per variant, all on the same weights and clips."""
    torch.set_num_threads(args.threads)
    model = build_model(args.preset, args.depth, "sdpa_loop").train()
    batch = make_batch(voxceleb_like_frames(args.clips, args.seed))
    batches = {"packed": batch, "packed_pad": batch, "padded": padded_batch(batch), "dense_rows": batch}

    def make(name):
        b = batches[name]

        def step():
            model.set_attention_backend("padded" if name == "packed_pad" else "sdpa_loop")
            model.zero_grad(set_to_none=True)
            logits = dense_rows_step(model, b) if name == "dense_rows" else model(b)
            torch.nn.functional.cross_entropy(logits, b.labels).backward()

        return step

    names = args.variants.split(",")
    return {n: make(n) for n in names}, {n: batches[n].total_tokens for n in names}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_memory(name: str, args) -> float:
    """Peak resident-memory growth (MB) during one step of ``name``, in a fresh process of its own.

    Freed heap is handed back first (``malloc_trim``) so the baseline is what is really live; the peak is
    sampled every 2 ms from ``/proc/self/statm`` and cross-checked with ``ru_maxrss``.
    """
    steps, _ = make_steps(args)
    steps[name]()  # warm-up: lazily built caches (pinv, segments) are not the step's memory
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss_mb()
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    steps[name]()
    done.set()
    watcher.join()
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    top = max(peak[0], max_after if max_after > max_before else 0.0)
    return top - base


def padded_input(batch: PackedBatch) -> torch.Tensor:
    """``(B, T_max, F)``: every clip zero-padded to the longest, for the classic entry point (one SDPA call)."""
    longest = int(batch.n_frames.max())
    clips = [torch.nn.functional.pad(c, (0, 0, 0, longest - c.shape[0])) for c in batch.clip_frames()]
    return torch.stack(clips)  # (B, T_max, F)


def gpu_section(args, device: torch.device | None = None) -> dict:
    """bf16 step of every attention layout on one device: ms/step, real tokens/s, useful-FLOP MFU, peak memory.

    Variants (same weights, same clips): ``varlen`` (packed, flash varlen), ``flex`` (packed, FlexAttention),
    ``padded`` (the classic entry point: every clip padded to the longest, one batched SDPA call over uniform
    rows), ``dense_rows`` (ElasticAST's 2048-token rows with a dense same-clip mask). MFU counts only the real
    clips' FLOPs (``model.flops``), over the device's dense bf16 peak looked up by its exact name.
    ``--dry-run`` runs the same code on the CPU (tiny preset, few clips, ``padded`` standing in for the packed
    GPU backends, no autocast): it checks the code, not the speed.
    """
    dev = device or torch.device("cuda")
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else "cpu (dry run)"
    peak = peak_tflops(name, args.peak_tflops) if cuda else None
    preset = "base" if cuda else "tiny"
    frames = voxceleb_like_frames(args.gpu_clips, args.seed)
    host = make_batch(frames)
    flops = batch_flops(build_model(preset, args.depth, "padded").config, host).total
    longest = int(host.n_frames.max())
    padding = 1 - sum(host.n_frames.tolist()) / (host.n_clips * longest)
    print(
        f"\nGPU step: {name}, {preset} preset, {'bf16 autocast' if cuda else 'fp32'}, {args.gpu_clips} clips, "
        f"{host.total_tokens} tokens, padded-to-longest padding {padding:.1%}; peak "
        f"{f'{peak:.0f} TFLOPS (dense bf16)' if peak else 'unknown: MFU not computed (pass --peak-tflops)'}"
    )
    batch = host.to(dev)
    x_pad = padded_input(host).to(dev)
    labels = batch.labels
    results = {}
    # flex last: its first call compiles (tens of seconds); a time limit then cuts only flex
    variants = ("varlen", "padded", "dense_rows", "flex") if cuda else ("varlen", "padded", "dense_rows")
    for variant in variants:
        backend = {"varlen": "varlen", "flex": "flex"}.get(variant, "padded") if cuda else "padded"
        model = build_model(preset, args.depth, backend).to(dev).train()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

        def step(model=model, variant=variant, autocast=autocast):
            model.zero_grad(set_to_none=True)
            with autocast:
                if variant == "dense_rows":
                    logits = dense_rows_step(model, batch)
                elif variant == "padded":
                    logits = model(x_pad, fstride=16, tstride=16)  # uniform rows: one SDPA call per block
                else:
                    logits = model(batch)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            loss.backward()

        try:
            for _ in range(2 if cuda else 1):
                step()
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                step()
            if cuda:
                torch.cuda.synchronize(dev)
        except Exception as exc:  # one variant failing must not hide the others' numbers
            print(f"  {variant:10s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            results[variant] = {"error": repr(exc)}
            continue
        sec = (time.perf_counter() - t0) / args.repeats
        mfu = flops / sec / (peak * 1e12) if peak else float("nan")
        mem = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else float("nan")
        results[variant] = {"ms": sec * 1e3, "tokens_per_s": host.total_tokens / sec, "mfu": mfu, "peak_mib": mem}
        print(
            f"  {variant:10s} {sec * 1e3:8.1f} ms/step  {host.total_tokens / sec:10.0f} real tokens/s  "
            f"useful-FLOP MFU {mfu:6.1%}  peak {mem:8.0f} MiB"
        )
        del model
        ok = {k: v for k, v in results.items() if "ms" in v}
        if variant == "padded" and "varlen" in ok and "padded" in ok:
            print(
                f"  varlen vs padded: {ok['padded']['ms'] / ok['varlen']['ms']:.2f}x "
                f"(target >= 1/(1 - padding) = {1 / (1 - padding):.2f}x); varlen MFU target >= 40%"
            )
        if variant == "dense_rows" and "varlen" in ok and "dense_rows" in ok:
            print(f"  varlen vs dense rows: {ok['dense_rows']['ms'] / ok['varlen']['ms']:.2f}x")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=12, help="clips per step (ElasticAST trains with 12)")
    ap.add_argument("--preset", default="tiny", help="model preset for the CPU section")
    ap.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per variant and cycle (two cycles)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--gpu-clips", type=int, default=40, help="clips per step in the GPU section (~16k tokens)")
    ap.add_argument("--gpu-only", action="store_true", help="only the GPU section (benchmarks/gpu_check.sh)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for a GPU not in the table")
    ap.add_argument("--dry-run", action="store_true", help="run the GPU section's code on the CPU, tiny sizes")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant and print JSON
    args = ap.parse_args()
    if args.dry_run:
        torch.set_num_threads(args.threads)
        args.gpu_clips, args.repeats, args.depth = min(args.gpu_clips, 4), 1, args.depth or 2
        gpu_section(args, torch.device("cpu"))
        return
    if args.gpu_only:
        if not torch.cuda.is_available():
            sys.exit("--gpu-only: no CUDA device")
        gpu_section(args)
        return
    if args.variant:
        args.variants = args.variant
        print(json.dumps({"variant": args.variant, "peak_mb": peak_memory(args.variant, args)}))
        return

    frames = voxceleb_like_frames(args.clips, args.seed)
    batch = make_batch(frames)
    tokens = batch.tokens.tolist()
    rows = next_fit_rows(tokens)
    n_rows = rows[-1] + 1
    row_fill = [sum(t for t, r in zip(tokens, rows, strict=True) if r == i) for i in range(n_rows)]
    print(
        f"CPU ({args.threads} threads), preset {args.preset}, depth {args.depth or 'preset'}: {args.clips} clips, "
        f"{sum(frames) / 100:.1f} s audio, {batch.total_tokens} tokens (min {min(tokens)}, max {max(tokens)}); "
        f"padded-to-longest computes {len(tokens) * max(tokens)} tokens "
        f"({1 - sum(tokens) / (len(tokens) * max(tokens)):.1%} padding); dense rows: {n_rows} rows × "
        f"{max(row_fill)} ({1 - sum(tokens) / (n_rows * max(row_fill)):.1%} padding)"
    )
    # Time: blocks of --repeats consecutive steps per variant, and the whole cycle twice, so that load from
    # other processes on a shared machine reaches every variant, while the cost of switching between very
    # different memory footprints (fresh pages after dense_rows frees gigabytes) stays out of most steps.
    steps, computed = make_steps(args)
    times = {n: [] for n in steps}
    for _ in range(2):
        for name, step in steps.items():
            step()  # first step after a switch: not timed
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    # Memory: one fresh process per variant, one step each.
    results = {}
    for name in steps:
        cmd = [sys.executable, __file__, "--variant", name, f"--clips={args.clips}", f"--preset={args.preset}"]
        cmd += [f"--threads={args.threads}", f"--seed={args.seed}"] + ([f"--depth={args.depth}"] if args.depth else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        # the fastest round is the least disturbed by other load on a shared machine; the median is printed too
        results[name] = {"seconds": min(times[name]), "peak_mb": json.loads(out)["peak_mb"]}
        r = results[name]
        print(
            f"  {name:11s} {r['seconds']:8.2f} s/step "
            f"(min of {len(times[name])}, median {statistics.median(times[name]):.2f})   "
            f"peak +{r['peak_mb']:7.0f} MB   {computed[name]} tokens through the MLPs"
        )
    if "packed" in results:
        base = results["packed"]
        for name, r in results.items():
            if name != "packed":
                print(
                    f"  packed is {r['seconds'] / base['seconds']:.2f}x faster than {name}, "
                    f"uses {r['peak_mb'] / max(base['peak_mb'], 1):.2f}x less peak memory"
                )
    if torch.cuda.is_available():
        gpu_section(args)
    else:
        print("\nGPU section skipped: no CUDA device (varlen/bf16/MFU not measured).")


if __name__ == "__main__":
    main()
