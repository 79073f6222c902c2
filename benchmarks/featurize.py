"""Featurizer benchmark: clips/s of 10 s 16 kHz clips, ours against named peers, measured in one run.

Run: ``.venv/bin/python benchmarks/featurize.py [--threads 1 2] [--clips 16] [--repeats 5]``

It prints, per torch thread count, clips/s and the ratio against the reference for:
- ours (``pipeline.fbank``, AST preset) at 1 shift and at the 16 ElasticAST shifts (10, 12, ..., 40 ms);
- the reference definition, one call per clip and per shift as the AST repo calls it: torchaudio where it
  imports, else ``pipeline.fbank_reference`` (plain per-clip torch ops), which is first checked against
  the golden torchaudio fixtures (in a child process on MKL's reproducible FFT path, see tests);
- kaldi-native-fbank at a setting it supports (80 bins, povey), against ours at the same setting;
- temporal pooling of a (1024, 128) array by 4: numba against numpy (float32 and float16);
- batched CUDA clips/s when a GPU is present, and its max |Δ| from the CPU path, near silence too
  (``--gpu-only`` for just that, as ``benchmarks/gpu_check.sh`` runs it; ``--dry-run`` runs its code on the CPU).
Ours and its peer are timed interleaved (the machine is shared); the ratio is the median of per-pair
ratios. Outputs are checked for exactness in the same run (max |Δ| against the reference). Targets on CPU at the
same thread count: >= 3x the reference at 16 shifts, >= 1.5x at 1 shift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexast.pipeline.fbank import fbank  # noqa: E402
from flexast.pipeline.fbank_options import AST_FBANK  # noqa: E402
from flexast.pipeline.fbank_reference import reference_fbank  # noqa: E402
from flexast.pipeline.pooling import pool_time  # noqa: E402
from flexast.pipeline.units import ELASTICAST_SHIFTS_MS  # noqa: E402

AST = {k: v for k, v in AST_FBANK.items() if k != "frame_shift"}
KALDI80 = {"num_mel_bins": 80}  # povey window, Kaldi defaults: a setting kaldi-native-fbank accepts

_PEER_CHECK = r"""
import json, sys
import numpy as np, torch
from flexast.pipeline.fbank_reference import reference_fbank
z = np.load(sys.argv[1])
worst = 0.0
for name, cfg in json.loads(z["configs_json"].tobytes().decode()).items():
    for key in z.files:
        if key.startswith("fbank/") and key.endswith("/" + name):
            wave = torch.from_numpy(z["wave/" + key.split("/")[1]])
            worst = max(worst, float((reference_fbank(wave, **cfg) - torch.from_numpy(z[key])).abs().max()))
print(worst)
"""


def reference_peer():
    """(name, per-clip function) of the reference definition: torchaudio if importable, else our peer."""
    try:
        from torchaudio.compliance import kaldi

        return "torchaudio.compliance.kaldi.fbank", lambda w, **kw: kaldi.fbank(w.unsqueeze(0), **kw)
    except Exception:
        env = dict(os.environ, MKL_CBWR="COMPATIBLE")
        fixture = ROOT / "tests" / "data" / "kaldi_fbank_golden.npz"
        proc = subprocess.run(
            [sys.executable, "-c", _PEER_CHECK, str(fixture)], env=env, cwd=ROOT, capture_output=True, text=True
        )
        worst = float(proc.stdout.strip() or "inf")
        if proc.returncode or worst > 1e-4:
            raise SystemExit(
                f"the reference peer does not match the golden fixtures (max |Δ| {worst}): {proc.stderr}"
            ) from None
        print(f"reference peer pipeline.fbank_reference matches the golden fixtures: max |Δ| = {worst:.2e}")
        return "pipeline.fbank_reference (plain per-clip torch ops; torchaudio not importable)", reference_fbank


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired(ref_fn, ours_fn, repeats: int) -> tuple[float, float, float, float]:
    """Interleaved timing on a shared, noisy machine.

    Returns median ref seconds, median ours seconds, the median of per-pair wall-clock ratios, and the
    median of per-pair CPU-time ratios (process time: not inflated by other jobs waiting for the cores).
    """
    ref_fn(), ours_fn()
    pairs = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        ref_fn()
        t1, c1 = time.perf_counter(), time.process_time()
        ours_fn()
        t2, c2 = time.perf_counter(), time.process_time()
        pairs.append((t1 - t0, t2 - t1, (c1 - c0) / max(c2 - c1, 1e-9)))
    ref_s, ours_s = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    return ref_s, ours_s, statistics.median(p[0] / p[1] for p in pairs), statistics.median(p[2] for p in pairs)


def max_abs_diff(ours: dict, ref_fn, clips, shifts, opts) -> float:
    worst = 0.0
    for s in shifts:
        for clip, feats in zip(clips, ours[s], strict=True):
            worst = max(worst, float((feats - ref_fn(clip, frame_shift=s, **opts)).abs().max()))
    return worst


def bench_cpu(threads: int, clips, repeats: int, ref_name: str, ref_fn) -> dict:
    torch.set_num_threads(threads)
    n = len(clips)
    shifts16 = list(ELASTICAST_SHIFTS_MS)
    row = {"threads": threads}
    for label, shifts in (("1 shift", [10.0]), ("16 shifts", shifts16)):
        t_ref, t_ours, ratio, cpu_ratio = paired(
            lambda shifts=shifts: [[ref_fn(c, frame_shift=s, **AST) for s in shifts] for c in clips],
            lambda shifts=shifts: fbank(clips, shifts_ms=shifts, **AST),
            repeats,
        )
        diff = max_abs_diff(fbank(clips, shifts_ms=shifts, **AST), ref_fn, clips, shifts, AST)
        row[label] = {"ref": n / t_ref, "ours": n / t_ours, "ratio": ratio, "cpu_ratio": cpu_ratio}
        row[label]["max_abs_diff"] = diff
    t_knf, t_ours80, ratio, _ = paired(
        lambda: fbank(clips, backend="kaldi-native", **KALDI80), lambda: fbank(clips, **KALDI80), repeats
    )
    t_ref80 = timed(lambda: [ref_fn(c, **KALDI80) for c in clips], repeats)
    row["kaldi-native 80 bins"] = {"knf": n / t_knf, "ours": n / t_ours80, "ref": n / t_ref80, "ratio": ratio}
    return row


def bench_pooling(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for dtype in (np.float32, np.float16):
        x = rng.normal(size=(1024, 128)).astype(dtype)
        t_numpy, t_numba, ratio, _ = paired(
            lambda x=x: [x.reshape(256, 4, 128).mean(1, dtype=np.float32).astype(x.dtype) for _ in range(100)],
            lambda x=x: [pool_time(x, 4) for _ in range(100)],
            repeats,
        )
        out[np.dtype(dtype).name] = {"numba_us": t_numba * 1e4, "numpy_us": t_numpy * 1e4, "ratio": ratio}
    return out


def bench_cuda(clips, repeats: int, device: torch.device | None = None) -> dict | None:
    """Batched fbank on the GPU: clips/s at 1 and 16 shifts, and max |Δ| against the CPU path (loud and near-silent
    clips: a 1e-5 amplitude sits near the log floor, where float32 rounding of the power matters most).

    ``device`` (the CPU for ``--dry-run``) overrides the CUDA device: the same code, no speed meaning.
    """
    dev = device or (torch.device("cuda") if torch.cuda.is_available() else None)
    if dev is None:
        return None
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    batch = torch.stack(clips).to(dev)  # (N, S): equal-length 10 s clips

    def run(shifts):
        fbank(batch, shifts_ms=shifts, **AST)
        sync()

    shifts = list(ELASTICAST_SHIFTS_MS)
    quiet = [c * 1e-4 for c in clips[:4]]  # about 1e-5 RMS: near silence
    diffs = {}
    for label, group in (("loud", clips[:4]), ("near_silence", quiet)):
        cpu = fbank(group, shifts_ms=shifts, **AST)
        dev_out = fbank(torch.stack(group).to(dev), shifts_ms=shifts, **AST)
        diffs[label] = max(
            float((a - b.cpu()).abs().max()) for s in cpu for a, b in zip(cpu[s], dev_out[s], strict=True)
        )
    run(shifts)  # warm-up: kernels, caches
    return {
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu (dry run)",
        "clips": len(clips),
        "seconds": clips[0].numel() / 16000,
        "1 shift": len(clips) / timed(lambda: run([10.0]), repeats),
        "16 shifts": len(clips) / timed(lambda: run(shifts), repeats),
        "max_abs_diff_vs_cpu": diffs["loud"],
        "max_abs_diff_vs_cpu_near_silence": diffs["near_silence"],
    }


def print_cuda(c: dict) -> None:
    speed = f"1 shift {c['1 shift']:.0f} clips/s, 16 shifts {c['16 shifts']:.0f} clips/s (target >= 5000 on an H100)"
    diff = f"max |Δ| vs CPU {c['max_abs_diff_vs_cpu']:.1e}, near silence {c['max_abs_diff_vs_cpu_near_silence']:.1e}"
    print(f"GPU fbank {c['device']}: batched {c['clips']} clips of {c['seconds']:.0f} s: {speed}; {diff}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to measure")
    parser.add_argument("--clips", type=int, default=16, help="number of 10 s clips")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU section (benchmarks/gpu_check.sh)")
    parser.add_argument("--gpu-clips", type=int, default=256, help="10 s clips per batch in the GPU section")
    parser.add_argument("--dry-run", action="store_true", help="run the GPU section's code on the CPU, 2 short clips")
    args = parser.parse_args(argv)
    if args.dry_run or args.gpu_only:
        if args.gpu_only and not torch.cuda.is_available():
            sys.exit("--gpu-only: no CUDA device")
        n, seconds = (2, 1) if args.dry_run else (args.gpu_clips, 10)
        g = torch.Generator().manual_seed(0)
        clips = [0.1 * torch.randn(16000 * seconds, generator=g) for _ in range(n)]
        print_cuda(
            bench_cuda(clips, 1 if args.dry_run else args.repeats, torch.device("cpu") if args.dry_run else None)
        )
        return

    g = torch.Generator().manual_seed(0)
    clips = [0.1 * torch.randn(160000, generator=g) for _ in range(args.clips)]
    ref_name, ref_fn = reference_peer()
    cpu_name = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu_name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu_name)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {cpu_name}, {os.cpu_count()} cores "
        f"(1-min load {load:.1f}), torch {torch.__version__}; {args.clips} clips of 10 s at 16 kHz; "
        f"reference: {ref_name}"
    )
    results = {"cpu": [], "pooling": None, "cuda": None, "reference": ref_name}
    print("| threads | shifts | reference clips/s | ours clips/s | ratio (wall) | ratio (CPU time) | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for threads in args.threads:
        row = bench_cpu(threads, clips, args.repeats, ref_name, ref_fn)
        results["cpu"].append(row)
        for label in ("1 shift", "16 shifts"):
            r = row[label]
            print(
                f"| {threads} | {label} | {r['ref']:.1f} | {r['ours']:.1f} | **{r['ratio']:.2f}x** | "
                f"{r['cpu_ratio']:.2f}x | {r['max_abs_diff']:.1e} |"
            )
        k = row["kaldi-native 80 bins"]
        print(
            f"| {threads} | 1 shift, 80 bins povey | kaldi-native {k['knf']:.1f} (reference {k['ref']:.1f}) | "
            f"{k['ours']:.1f} | {k['ratio']:.2f}x vs kaldi-native | | |"
        )
    torch.set_num_threads(1)
    results["pooling"] = bench_pooling(args.repeats)
    for dtype, p in results["pooling"].items():
        print(
            f"pooling (1024, 128) by 4, {dtype}: numba {p['numba_us']:.1f} us, numpy {p['numpy_us']:.1f} us, "
            f"ratio {p['ratio']:.1f}x"
        )
    results["cuda"] = bench_cuda(clips, args.repeats)
    if results["cuda"]:
        print_cuda(results["cuda"])
    else:
        print("CUDA: no GPU in this run")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
