"""Stream throughput (clips/s per loader process) vs an AST-repo-style on-the-fly loader, in one run.

Run: ``.venv/bin/python benchmarks/stream.py [--clips 128] [--repeats 5]``

Both sides do ElasticAST mixed-resolution training work for 10 s clips, in one process on one thread:

* ours (:func:`pipeline.loader.make_stream`) reads local tar shards holding all 16 shifts, picks a
  shift per clip, decodes only that shift, caps at 1024 frames, applies SpecAugment (48/192) and
  mixup (0.5), normalises and packs into 12 clips' worth of 16×16 tokens; then the same from a local
  ``python -m http.server`` in another process (HTTP streaming through fsspec: every shift's bytes
  cross the wire, since a stream cannot skip);
* the peer, as the AST repository's loader does per item: decode the wav with soundfile, compute the
  Kaldi fbank of that clip alone at its drawn shift, pad or cut to ``int(1024 / C)`` frames, mask,
  normalise. The fbank is the reference definition as the AST repository calls it
  (:func:`pipeline.fbank_reference.reference_fbank`; torchaudio cannot be imported here) and, as a
  stronger peer, flexast's own :func:`pipeline.fbank.fbank_one`.

The shards hold seeded random features (``tests/factories.write_shard_folder``): throughput does not
depend on the values.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flexast.pipeline.augment import normalise, spec_augment
from flexast.pipeline.fbank import fbank_one
from flexast.pipeline.fbank_reference import reference_fbank
from flexast.pipeline.loader import make_stream
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.units import ELASTICAST_SHIFTS_MS
from tests.factories import broadband_clip, write_shard_folder

AST_FBANK = {
    "htk_compat": True,
    "sample_frequency": 16000,
    "use_energy": False,
    "window_type": "hanning",
    "num_mel_bins": 128,
    "dither": 0.0,
}


def ours(source: str, n_clips: int) -> float:
    cfg = StreamConfig(
        budget_tokens=12 * 8 * 62,
        patches=[[16, 16]],
        pack_buffer=120,
        shuffle_buffer=64,
        resolution={"kind": "random"},
        max_frames=1024,
        freq_mask=48,
        time_mask=192,
        mixup_prob=0.5,
    )
    start = time.perf_counter()
    seen = sum(b.n_clips for b in make_stream(cfg, source))
    elapsed = time.perf_counter() - start
    assert seen == n_clips, (seen, n_clips)
    return seen / elapsed


def on_the_fly(wavs: list[str], featurize) -> float:
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for path in wavs:
        audio, _ = sf.read(path, dtype="float32")
        wav = torch.from_numpy(audio)[None]  # (1, S)
        wav = wav - wav.mean()
        shift = float(rng.choice(ELASTICAST_SHIFTS_MS))
        x = featurize(wav, shift)  # (T, 128)
        target = int(1024 / (shift / 10))
        x = torch.nn.functional.pad(x, (0, 0, 0, max(0, target - x.shape[0])))[:target]  # (target, 128)
        x = spec_augment(x, 48, 192, rng, compression=shift / 10)
        normalise(x, -4.27, 4.57)
    return len(wavs) / (time.perf_counter() - start)


def serve(folder: str) -> tuple[subprocess.Popen, int]:
    """``python -m http.server`` on a free port of 127.0.0.1, in its own process (not competing for our GIL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", folder],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="flexast-bench-") as tmp:
        shards = os.path.join(tmp, "shards")
        per = 16
        write_shard_folder(
            shards,
            n_shards=args.clips // per,
            per_shard=per,
            shifts_ms=ELASTICAST_SHIFTS_MS,
            n_mels=128,
            min_seconds=10.0,
            max_seconds=10.0,
        )
        wavs = []
        for i in range(args.clips):
            wavs.append(os.path.join(tmp, f"{i}.wav"))
            sf.write(wavs[-1], broadband_clip(10.0, seed=i).numpy(), 16000, subtype="PCM_16")
        n = args.clips // per * per
        ours(shards, n)  # warm-up (imports, numba, page cache)
        ref = lambda w, s: reference_fbank(w[0], frame_shift=s, **AST_FBANK)  # noqa: E731
        fast = lambda w, s: fbank_one(w, frame_shift=s, **AST_FBANK)  # noqa: E731
        rows = {"local": [], "ref": [], "fast": [], "http": []}
        proc, port = serve(shards)
        try:
            for _ in range(args.repeats):  # interleaved: each ratio compares runs seconds apart
                rows["local"].append(ours(shards, n))
                rows["ref"].append(on_the_fly(wavs, ref))
                rows["fast"].append(on_the_fly(wavs, fast))
                rows["http"].append(ours(f"http://127.0.0.1:{port}/index.json", n))
        finally:
            proc.terminate()
            proc.wait()
        size = sum(os.path.getsize(os.path.join(shards, f)) for f in os.listdir(shards)) / n / 1e6
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(rows[k], rows["ref"], strict=True)) for k in rows}
    print(f"shards: {n} clips of 10 s, 16 shifts, 128 bins, {size:.1f} MB/clip; {args.repeats} interleaved repeats")
    print("| loader (1 process, 1 thread) | clips/s (median) | vs AST-style on-the-fly (median of paired ratios) |")
    print("|---|---|---|")
    names = {
        "ref": "on-the-fly: wav → reference Kaldi fbank per clip (AST-repo style)",
        "fast": "on-the-fly: wav → flexast `fbank_one` per clip",
        "local": "flexast stream, local shards",
        "http": "flexast stream, HTTP (`python -m http.server`, 127.0.0.1)",
    }
    for k in ("ref", "fast", "local", "http"):
        print(f"| {names[k]} | {med[k]:.1f} | {ratio[k]:.1f}× |")


if __name__ == "__main__":
    main()
