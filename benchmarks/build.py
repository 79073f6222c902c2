"""Benchmark: end-to-end build-shards throughput against the featurizer alone, and 2 workers against 1.

    .venv/bin/python benchmarks/build.py [--clips 256] [--shard-samples 128] [--formats mix] [--shifts elastic]

Peers, measured in the same run on the same clips:
    * featurizer only: ``pipeline.fbank.fbank`` on already-decoded 16 kHz waveforms, one clip per call, one torch
      thread, float16 out (``out_dtype``, what shards store): what one build worker does between decoding and
      writing, at its fastest;
    * end to end, 1 worker: ``build_shards(workers=1)``: header probing, decode (soundfile), mono, resample (soxr,
      for the clips that are not at 16 kHz), mean removal, 16-shift fbank, float16, statistics, tar write. By
      default the worker decodes two clips ahead on a background thread (``decode_ahead``), so reading and
      decoding overlap the fbank; that thread may use a second core, which the CPU-time ratio accounts for;
      statistics and tar writing run behind the fbank on another thread in the same way;
    * end to end, 2 workers: the same with a local pool of 2 processes. The pool is started and warmed up
      before the clock starts (a real build amortises the start-up over hours); the cold time is printed too;
    * worker scaling: 1 against 2 workers with inline decoding (``decode_ahead=0``), so that one worker does not
      already use part of the second core; next to it, the featurizer alone in 2 processes against 1 on the same
      clips, which is what this machine's two cores give for the same work (a shared VM may give well under 2).
Targets (issue 3): end to end ≥ 70% of featurizer-only clips/s, and 2 workers ≥ 1.7× one worker.
Clips (``--formats``), fixed seed:
    * ``mix`` (default): 3/4 FLAC at 16 kHz, 1/4 WAV at 44.1 kHz stereo (so resampling is exercised);
    * ``wav16``: 16 kHz mono 16-bit WAV, the form AST's own data preparation writes;
    * ``flac16``: 16 kHz mono FLAC.
Shard size: the default, 2 shards of 128 clips (about 243 MB each at 16 shifts), is the size the build's own
default (``--shard-size 256MB``) gives, with one shard per worker in the 2-worker runs. Each shard task
starts its own decode-ahead and write-behind threads, and its first decode and last write are not
overlapped, so small shards understate the build: ``--clips 48 --shard-samples 4`` shows by how much.
Decoding cost differs by format by an order of magnitude (against the featurizer's time per clip here: about
0.5x for the mix, 0.3x for 16 kHz FLAC, 0.04x for 16 kHz WAV), so the ratio is reported per collection.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flexast.pipeline.audio import load_audio, subtract_mean
from flexast.pipeline.build import build_shards
from flexast.pipeline.build_config import AST_FBANK, BuildConfig, parse_shifts
from flexast.pipeline.executor import InlineExecutor, ProcessExecutor, timed_call
from flexast.pipeline.fbank import fbank
from flexast.pipeline.shard_task import DECODE_AHEAD

FORMATS = {  # (sample rate, extension, channels) of clip i, by --formats
    "mix": lambda i: (44100, "wav", 2) if i % 4 == 3 else (16000, "flac", 1),
    "wav16": lambda i: (16000, "wav", 1),
    "flac16": lambda i: (16000, "flac", 1),
}


def make_clips(root: str, n: int, seconds: float, formats: str = "mix") -> str:
    """``n`` broadband clips (tones, a chirp and noise) under ``root``; returns the manifest path."""
    rng = np.random.default_rng(0)
    lines = ["path,label"]
    for i in range(n):
        sr, fmt, ch = FORMATS[formats](i)
        t = np.arange(int(seconds * sr)) / sr
        f0 = rng.uniform(100, 1000)
        x = 0.2 * np.sin(2 * np.pi * f0 * t) + 0.1 * np.sin(2 * np.pi * (200 * t + 300 * t * t))
        x = x + 0.02 * rng.standard_normal(t.shape[0])
        if ch == 2:
            x = np.stack([x, 0.9 * x], axis=1)  # (S, 2)
        path = os.path.join(root, f"clip{i:04d}.{fmt}")
        sf.write(path, x.astype(np.float32), sr, subtype="PCM_16")
        lines.append(f"{os.path.basename(path)},c{i % 4}")
    manifest = os.path.join(root, "manifest.csv")
    with open(manifest, "w") as f:
        f.write("\n".join(lines) + "\n")
    return manifest


def clip_paths(root: str) -> list[str]:
    """The audio files :func:`make_clips` wrote under ``root``, in order."""
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.endswith((".flac", ".wav"))]


def decoded_waves(root: str) -> list[torch.Tensor]:
    """The benchmark's clips decoded, mixed down, resampled and mean-subtracted, as the build does."""
    return [torch.from_numpy(subtract_mean(load_audio(path).waveform)) for path in clip_paths(root)]


def featurize_all(waves: list[torch.Tensor], shifts) -> float:
    """Featurise ``waves`` one clip per call, one torch thread, float16 out as shards store it; seconds of CPU."""
    torch.set_num_threads(1)
    c0 = time.process_time()
    for w in waves:
        fbank([w], shifts_ms=shifts, sample_frequency=16000.0, out_dtype=torch.float16, **AST_FBANK)
    return time.process_time() - c0


def featurizer_only(waves: list[torch.Tensor], shifts) -> tuple[float, float]:
    """(clips/s of wall time, clips/s of this process's CPU time) of fbank alone on pre-decoded waveforms."""
    featurize_all(waves[:1], shifts)  # warm-up (caches, allocator)
    t0 = time.perf_counter()
    cpu = featurize_all(waves, shifts)
    return len(waves) / (time.perf_counter() - t0), len(waves) / cpu


_WAVES: dict[str, list[torch.Tensor]] = {}  # per pool worker: the decoded clips, loaded once during warm-up


def _featurize_part(args) -> float:
    """In a pool worker: featurise every ``parts``-th clip from ``part`` on; ``sleep_s`` spreads warm-up tasks."""
    root, part, parts, shifts, sleep_s = args
    if root not in _WAVES:
        _WAVES[root] = decoded_waves(root)
    time.sleep(sleep_s)
    return featurize_all(_WAVES[root][part::parts], shifts)


def featurizer_scaling(root: str, shifts) -> float:
    """Speed-up of the featurizer alone in 2 processes (each taking half the clips) over 1: the machine's
    own 2-core ceiling for this work, measured in the same run as the build's scaling."""
    pool = ProcessExecutor(2)
    try:
        pool.map(_featurize_part, [(root, 0, 1 << 30, shifts, 0.5)] * 2)  # each worker loads the clips once
        n = len(decoded_waves(root))
        pool.map(_featurize_part, [(root, 0, 1, shifts, 0.0)])  # one worker warm
        t0 = time.perf_counter()
        pool.map(_featurize_part, [(root, 0, 1, shifts, 0.0)])
        one = n / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        pool.map(_featurize_part, [(root, 0, 2, shifts, 0.0), (root, 1, 2, shifts, 0.0)])
        two = n / (time.perf_counter() - t0)
    finally:
        pool.close()
    return two / one


class Timed:
    """Wraps an executor and sums the CPU time its workers spend inside shard tasks (``cpu_s``)."""

    def __init__(self, inner):
        self.inner, self.cpu_s, self.description = inner, 0.0, inner.description

    def map(self, fn, items):
        return self.inner.map(fn, items)

    def as_completed(self, fn, items):
        for (_, x), (result, cpu, _pid) in self.inner.as_completed(timed_call, [(fn, x) for x in items]):
            self.cpu_s += cpu
            yield x, result

    def close(self):
        self.inner.close()


def end_to_end(manifest: str, out: str, cfg: BuildConfig, workers: int, decode_ahead: int = DECODE_AHEAD):
    """Clips/s: warm, including pool start-up, of CPU time inside the shard tasks, of this process's CPU time
    (the whole build when ``workers == 1``); and the number of samples."""
    t_cold = time.perf_counter()
    executor = Timed(ProcessExecutor(workers) if workers > 1 else InlineExecutor())
    if workers > 1:
        list(executor.inner.pool.map(_warm, range(workers * 2)))
    t0, c0 = time.perf_counter(), time.process_time()
    report = build_shards(
        manifest, out, cfg, workers=workers, executor=executor, progress=False, decode_ahead=decode_ahead
    )
    t1, c1 = time.perf_counter(), time.process_time()
    executor.close()
    shutil.rmtree(out)  # default-size shards: a few hundred MB per build
    n = report.samples
    return n / (t1 - t0), n / (t1 - t_cold), n / executor.cpu_s, n / (c1 - c0), n


def warm_up() -> None:
    """Load in this process what :mod:`pipeline.worker_preload` loads in the pool's fork server (numba's
    statistics kernel takes about 0.5 s to load once per process; a real build amortises it over hours)."""
    import flexast.pipeline.worker_preload  # noqa: F401


def _warm(_):
    import flexast.pipeline.fbank
    import flexast.pipeline.shard_task  # noqa: F401

    time.sleep(0.2)  # keep this worker busy so the other one takes the next warm-up task
    return os.getpid()


def decode_cpu_per_clip(root: str) -> float:
    """Seconds of CPU per clip to decode, mix down and resample the benchmark's clips (the build's first stage)."""
    paths = clip_paths(root)
    c0 = time.process_time()
    for path in paths:
        load_audio(path)
    return (time.process_time() - c0) / len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--shifts", default="elastic")
    ap.add_argument("--shard-samples", type=int, default=128, help="clips per shard (see the note on shard size)")
    ap.add_argument("--formats", choices=sorted(FORMATS), default="mix", help="the clips' formats (see above)")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved repeats (ratios are paired per repeat)")
    args = ap.parse_args()
    shifts = parse_shifts(args.shifts)
    runs: dict[str, list[float]] = {}

    def keep(**measured: float) -> None:
        for k, v in measured.items():
            runs.setdefault(k, []).append(v)

    with tempfile.TemporaryDirectory(prefix="flexast-bench-build-") as tmp:
        audio = os.path.join(tmp, "audio")
        os.makedirs(audio)
        manifest = make_clips(audio, args.clips, args.seconds, args.formats)
        waves = decoded_waves(audio)
        cfg = BuildConfig(name="bench", shifts_ms=shifts, shard_samples=args.shard_samples)
        warm_up()  # what the pool's fork server preloads, loaded here too for the in-process (1-worker) builds
        load = os.getloadavg()[0]
        for r in range(args.repeat):  # interleaved repeats: each ratio compares runs made seconds apart
            feat, feat_cpu = featurizer_only(waves, shifts)
            one, _, _, one_cpu, n = end_to_end(manifest, os.path.join(tmp, f"w1-{r}"), cfg, 1)
            two, two_cold, _, _, _ = end_to_end(manifest, os.path.join(tmp, f"w2-{r}"), cfg, 2)
            # Worker scaling on its own: decode inline in both, so one worker does not already use a second core.
            one_inline, _, one_task, _, _ = end_to_end(manifest, os.path.join(tmp, f"i1-{r}"), cfg, 1, decode_ahead=0)
            two_inline, _, two_task, _, _ = end_to_end(manifest, os.path.join(tmp, f"i2-{r}"), cfg, 2, decode_ahead=0)
            keep(feat=feat, one=one, two=two, two_cold=two_cold, one_inline=one_inline, two_inline=two_inline,
                 ratio=one / feat, ratio_cpu=one_cpu / feat_cpu, scaling=two_inline / one_inline,
                 ceiling=featurizer_scaling(audio, shifts), decode_share=decode_cpu_per_clip(audio) * feat_cpu,
                 task_growth=one_task / two_task)  # fmt: skip
        load = max(load, os.getloadavg()[0])
    best = {k: max(v) for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in runs.items()}

    def each(key: str) -> str:
        return " ".join(f"{x:.2f}" for x in runs[key])

    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{n} clips of {args.seconds:g} s ({args.formats}), {len(shifts)} shifts, shards of {args.shard_samples} "
          f"clips, {args.repeat} interleaved repeats")  # fmt: skip
    print("clips/s: the best repeat; ratios: the median of per-repeat pairs")
    print(f"featurizer only (1 thread):     {best['feat']:8.2f} clips/s")
    print(f"end to end, 1 worker:           {best['one']:8.2f} clips/s")
    print(f"end to end, 2 workers (warm):   {best['two']:8.2f} clips/s   (defaults: 1 worker overlaps decoding and "
          f"writing on background threads, 2 workers filling both cores do not)")  # fmt: skip
    print(f"end to end, 2 workers (cold):   {best['two_cold']:8.2f} clips/s   (pool start-up included)")
    print(f"inline decoding, 1 / 2 workers: {best['one_inline']:8.2f} / {best['two_inline']:.2f} clips/s")
    print(f"RATIO end to end / featurizer:  {med['ratio']:5.2f}  (target >= 0.70; per repeat {each('ratio')})")
    print(f"  same on CPU time:             {med['ratio_cpu']:5.2f}  (per repeat {each('ratio_cpu')})")
    print(f"  decoding alone costs {med['decode_share']:.2f}x the featurizer's CPU per clip, so one core could "
          f"reach at most {1 / (1 + med['decode_share']):.2f} before any writing")  # fmt: skip
    print(f"SCALING 2 workers / 1 worker:   {med['scaling']:5.2f}  (target >= 1.70; per repeat {each('scaling')})")
    print(f"  featurizer alone, 2 processes / 1: {med['ceiling']:5.2f} (this machine's own ceiling for the work, "
          f"per repeat {each('ceiling')})")  # fmt: skip
    print(f"  CPU per clip in shard tasks, 2 workers / 1 worker: {med['task_growth']:.2f} "
          f"(1.00 = no slowdown from running two at once; per repeat {each('task_growth')})")  # fmt: skip
    print(f"1-min load average during the run: up to {load:.1f} on {os.cpu_count()} CPUs (other jobs share them)")


if __name__ == "__main__":
    main()
