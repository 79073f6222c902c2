"""Padding of flexast's packer vs ElasticAST's next-fit, on the same clips, in one run.

Run: ``.venv/bin/python benchmarks/packing.py [--clips 20000] [--seed 0]``

Distributions (token counts from :func:`pipeline.batch.token_count`, 128 mel bins, 16×16 patches):

* VoxCeleb-like: durations log-normal (median 8 s, σ 0.55) clipped to 4–30 s, 10 ms frames.
* AudioSet-like: 10 s clips, each at a frame shift drawn from ElasticAST's 16 (10–40 ms).

Budgets are "B clips' worth": flat mode gets ``round(B × mean tokens)`` tokens per step; row mode gets
``max(1, round(B × mean / 2048))`` rows of L′ = 2048. Next-fit takes batches of B clips in loader order
and pads each batch's rows to its longest row (as the ElasticAST paper describes). Padding is the unused
fraction of allocated tokens; ours streams with a buffer of 10·B clips, so it includes the epoch's tail.
"""

from __future__ import annotations

import argparse

import numpy as np

from flexast.pipeline.batch import token_count, trim_frames
from flexast.pipeline.packing import PackStats, next_fit, pack_stage
from flexast.pipeline.units import ELASTICAST_SHIFTS_MS, num_frames

ROW = 2048
N_MELS, PATCH = 128, (16, 16)


def voxceleb_like(n: int, rng) -> list[int]:
    seconds = np.clip(rng.lognormal(np.log(8.0), 0.55, n), 4.0, 30.0)
    return [num_frames(int(s * 16000), 25.0, 10.0, 16000) for s in seconds]


def audioset_like(n: int, rng) -> list[int]:
    shifts = rng.choice(ELASTICAST_SHIFTS_MS, n)
    return [num_frames(160000, 25.0, float(s), 16000) for s in shifts]


def ours(frames: list[int], budget: int, mode: str, buffer: int) -> PackStats:
    stats = PackStats()
    clips = ({"key": str(i), "n_frames": f} for i, f in enumerate(frames))
    for plan in pack_stage(
        clips,
        n_mels=N_MELS,
        budget=budget,
        mode=mode,
        row_len=ROW if mode == "rows" else None,
        patches=[PATCH],
        buffer_size=buffer,
    ):
        stats.add(plan.stats)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=20000, help="clips per distribution")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| lengths | B | next-fit padding | ours flat padding | ours rows padding (rows×2048) | clips/step flat |")
    print("|---|---|---|---|---|---|")
    for name, make in (("VoxCeleb-like", voxceleb_like), ("AudioSet-like", audioset_like)):
        frames = make(args.clips, rng)
        tokens = [token_count(trim_frames(f, PATCH[1]), N_MELS, PATCH) for f in frames]
        mean = float(np.mean(tokens))
        for b in (12, 64, 128):
            _, kept, cap = next_fit(tokens, b, ROW)
            flat = ours(frames, round(b * mean), "flat", 10 * b)
            rows = max(1, round(b * mean / ROW))
            row = ours(frames, rows * ROW, "rows", 10 * b)
            print(
                f"| {name} | {b} | {1 - kept / cap:.2%} | {flat.padding:.2%} | {row.padding:.2%} ({rows}) "
                f"| {flat.clips_per_step:.1f} |"
            )


if __name__ == "__main__":
    main()
