"""Stream throughput (clips/s per loader process) vs an AST-repo-style on-the-fly loader, in one run.

Run: ``.venv/bin/python benchmarks/stream.py [--clips 64] [--repeats 5] [--demo-shards DIR] [--remote | --remote-only]
[--latency-ms 20] [--warm-epochs 3]``

Local sections (one process, one thread), each its own function:

* :func:`local_section`: ElasticAST mixed-resolution training work for 10 s clips. Ours
  (:func:`pipeline.loader.make_stream`) plans the epoch from the shards' member indexes, fetches one
  shift per clip (memory-mapped tar, or a slice of the Zarr store written by the real writer, or the
  in-memory cache), caps at 1024 frames, applies SpecAugment (48/192) and mixup (0.5), normalises and
  packs into 12 clips' worth of 16×16 tokens. The peer, as the AST repository's loader does per item:
  decode the wav with soundfile, compute the Kaldi fbank of that clip alone at its drawn shift, pad or cut
  to ``int(1024 / C)`` frames, mask, normalise; the fbank is the reference definition as the AST
  repository calls it (:func:`pipeline.fbank_reference.reference_fbank`) and, as a stronger peer,
  flexast's own :func:`pipeline.fbank.fbank_one`.
* :func:`bytes_section`: bytes on the wire per clip over HTTP with byte ranges (``tests.servers.RangeServer``
  on 127.0.0.1), against the bytes of the features the steps use, for a fixed and a random shift of the
  16-shift build.
* :func:`memory_demo_section` (with ``--demo-shards``): the in-memory source on the demo's training shards
  with ``configs/demo.yaml``'s data settings, one epoch.

Remote section (:func:`remote_rows`, ``--remote``): the same stream over HTTP (``tests/servers.py``'s
range server) and over S3 (moto in server mode), each behind ``tests/servers.py``'s proxy adding
20 ms per request, every server in its own process on 127.0.0.1; tar and Zarr, random and fixed shift,
the default read-ahead (8 steps). Each repeat opens a fresh source and runs it as training does: a cold
first epoch (opening, planning, steps) then ``--warm-epochs`` more with the same loader; paired with
fresh on-the-fly reference runs, and a table of where the time goes (cold: opening, planning, steps;
warm: the epoch, CPU here, in the store and in the proxy, the store's CPU per request). It also
reports bytes transferred per clip (the loader's ``last_read["bytes"]``)
against the bytes of the features the steps used, and :func:`~pipeline.transport.fetch_ranges` with
1 vs 8 requests in flight through the same proxy.

The shards hold seeded random features (``tests/factories.write_shard_folder``): throughput does not
depend on the values.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from flexast.pipeline.augment import normalise, spec_augment
from flexast.pipeline.datasource import MemorySource, open_source
from flexast.pipeline.fbank import fbank_one
from flexast.pipeline.fbank_reference import reference_fbank
from flexast.pipeline.loader import make_stream
from flexast.pipeline.shards import write_zarr_group, write_zarr_root
from flexast.pipeline.stream_config import StreamConfig
from flexast.pipeline.tar_index import MEMBERS_SUFFIX, iter_tar, load_npy, member_index, scan_tar
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


TRAIN = {
    "budget_tokens": 12 * 8 * 62,
    "patches": [[16, 16]],
    "pack_buffer": 120,
    "shuffle_buffer": 64,
    "resolution": {"kind": "random"},
    "max_frames": 1024,
    "freq_mask": 48,
    "time_mask": 192,
    "mixup_prob": 0.5,
}


def ours(source, n_clips: int, **over) -> float:
    """Clips per second of one epoch through the loader (the epoch's planning included)."""
    cfg = StreamConfig(**{**TRAIN, **over})
    start = time.perf_counter()
    seen = sum(b.n_clips for b in make_stream(cfg, source))
    elapsed = time.perf_counter() - start
    assert seen == n_clips, (seen, n_clips)
    return seen / elapsed


def add_member_indexes(folder: str) -> None:
    """Write ``<shard>.members.json`` beside shards written without one (what build-shards writes)."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            with open(os.path.join(folder, name), "rb") as f:
                buf = f.read()
            doc = member_index(scan_tar(buf, name), buf)
            with open(os.path.join(folder, name + MEMBERS_SUFFIX), "wb") as f:
                f.write(doc.to_bytes(len(buf)))


def add_zarr_store(folder: str) -> None:
    """The same shards as a Zarr store written by the real writer (:func:`pipeline.shards.write_zarr_group`)."""
    index_path = os.path.join(folder, "index.json")
    with open(index_path) as f:
        index = json.load(f)
    for shard in index["shards"]:
        stem = shard["name"][: -len(".tar")]
        keys, labels, values = [], [], {}
        for key, members in iter_tar(os.path.join(folder, shard["name"])):
            meta = json.loads(members["json"])
            keys.append(key)
            labels.append(meta["label_ids"])
            for ext, data in members.items():
                if ext.endswith(".npy"):
                    values.setdefault(ext[:-4], []).append(load_npy(data, key))
        arrays = {}
        for name, vs in values.items():
            arrays[f"{name}/values"] = np.concatenate(vs, 0)  # (ΣT, F)
            arrays[f"{name}/offsets"] = np.cumsum([0] + [len(v) for v in vs]).astype(np.int64)
        arrays["keys"] = np.asarray(keys, dtype=str)
        arrays["label_values"] = np.asarray([i for ids in labels for i in ids], dtype=np.int64)
        arrays["label_offsets"] = np.cumsum([0] + [len(x) for x in labels]).astype(np.int64)
        arrays["duration_s"] = np.full(len(keys), 10.0)
        attrs = {"shard": stem, "shifts_ms": index["shifts_ms"], "samples": len(keys)}
        write_zarr_group(os.path.join(folder, "store.zarr"), stem, arrays, attrs)
        shard["zarr_group"] = f"store.zarr/{stem}"
    write_zarr_root(os.path.join(folder, "store.zarr"))
    with open(index_path, "w") as f:
        json.dump(index, f)


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


def local_section(shards: str, wavs: list[str], n: int, repeats: int) -> None:
    """Local tar, Zarr and memory sources against the AST-style on-the-fly loaders (interleaved repeats)."""
    tar, zarr = open_source(shards, format="tar"), open_source(shards, format="zarr")
    memory = MemorySource.cache(open_source(shards, format="tar"))
    for src in (tar, zarr, memory):
        ours(src, n)  # warm-up (imports, numba, page cache, records)
    ref = lambda w, s: reference_fbank(w[0], frame_shift=s, **AST_FBANK)  # noqa: E731
    fast = lambda w, s: fbank_one(w, frame_shift=s, **AST_FBANK)  # noqa: E731
    rows = {"ref": [], "fast": [], "tar": [], "zarr": [], "memory": []}
    for _ in range(repeats):  # interleaved: each ratio compares runs seconds apart
        rows["tar"].append(ours(tar, n))
        rows["zarr"].append(ours(zarr, n))
        rows["memory"].append(ours(memory, n))
        rows["ref"].append(on_the_fly(wavs, ref))
        rows["fast"].append(on_the_fly(wavs, fast))
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(rows[k], rows["ref"], strict=True)) for k in rows}
    vs_tar = {k: statistics.median(a / b for a, b in zip(rows[k], rows["tar"], strict=True)) for k in rows}
    print("| loader (1 process, 1 thread) | clips/s (median) | vs AST-style on-the-fly | vs local tar |")
    print("|---|---|---|---|")
    names = {
        "ref": "on-the-fly: wav → reference Kaldi fbank per clip (AST-repo style)",
        "fast": "on-the-fly: wav → flexast `fbank_one` per clip",
        "tar": "flexast loader, local tar (mmap, member index)",
        "zarr": "flexast loader, local Zarr store (real writer's layout)",
        "memory": "flexast loader, memory source (cached once)",
    }
    for k in ("ref", "fast", "tar", "zarr", "memory"):
        print(f"| {names[k]} | {med[k]:.1f} | {ratio[k]:.2f}× | {vs_tar[k]:.2f}× |")


def bytes_section(shards: str, n: int) -> None:
    """Bytes fetched over HTTP (byte ranges) per clip vs the feature bytes the steps use, fixed and random shift."""
    from tests.servers import RangeServer

    index_bytes = os.path.getsize(os.path.join(shards, "index.json"))
    members = sum(os.path.getsize(os.path.join(shards, f)) for f in os.listdir(shards) if f.endswith(MEMBERS_SUFFIX))
    tar_bytes = sum(os.path.getsize(os.path.join(shards, f)) for f in os.listdir(shards) if f.endswith(".tar"))
    print("| resolution | features used (MB) | fetched: ranges + member indexes + index.json (MB) | ratio |")
    print("|---|---|---|---|")
    with RangeServer(shards) as server:
        for label, res in (("fixed 10 ms", {"kind": "fixed", "shift_ms": 10.0}), ("random of 16", {"kind": "random"})):
            cfg = StreamConfig(**{**TRAIN, "resolution": res, "max_frames": None})
            loader = make_stream(cfg, f"{server.url}/index.json")
            used = sum(b.frames.shape[0] * b.n_mels * 2 for b in loader)  # float16 bytes of the clips' frames
            fetched = loader.last_read.get("bytes", 0) + members + index_bytes
            print(f"| {label} | {used / 1e6:.2f} | {fetched / 1e6:.2f} | {fetched / used:.3f}× |")
    print(f"(the tar shards themselves: {tar_bytes / 1e6:.1f} MB for {n} clips)")


def memory_demo_section(folder: str, repeats: int) -> None:
    """One epoch of the demo's training data (``configs/demo.yaml``'s data settings) from the memory source."""
    from flexast.model.config import load_config
    from flexast.model.data import open_data, stream_config
    from flexast.model.recipes import plan_phases

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"), [f"data.train={folder}"])
    t0 = time.perf_counter()
    source = open_data(folder, "data.train", "memory")
    read_s = time.perf_counter() - t0
    phase = plan_phases(cfg, [float(s) for s in source.index["shifts_ms"]])[0]
    opts = StreamConfig.from_dict(stream_config(cfg, phase, 0))
    times = []
    for epoch in range(repeats):
        t0 = time.perf_counter()
        clips = sum(b.n_clips for b in make_stream(opts, source, epoch=epoch))
        times.append(time.perf_counter() - t0)
    print(f"memory source on {folder}: read once in {read_s:.2f} s; one epoch ({clips} clips) "
          f"median {statistics.median(times):.3f} s = {clips / statistics.median(times):.0f} clips/s")  # fmt: skip


def spawn(*args: str) -> tuple[subprocess.Popen, str]:
    """``python -m tests.servers <args>`` in its own process; returns it and the URL it prints."""
    root = os.path.join(os.path.dirname(__file__), "..")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.servers", *args], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    return proc, proc.stdout.readline().strip()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ours_read(case: tuple[StreamConfig, str, str], n_clips: int, servers=(), warm: int = 3) -> dict:
    """A training run's view: one source and loader, a cold first epoch, then ``warm`` more epochs.

    Cold: clips/s of opening the source (``index.json``), planning (member indexes / Zarr groups and chunk
    indexes) and the first epoch, with that time split up. Warm: each later epoch (records, plans' metadata
    and connections kept, as in training), with this process's CPU, the CPU of each of ``servers``
    (processes: the store, then its proxy) and the loader's read counters, per epoch."""
    from flexast.pipeline.loader import make_loader

    cfg, spec, fmt = case
    start = time.perf_counter()
    source = open_source(spec, cfg.storage_options, fmt, retries=cfg.retries, backoff_s=cfg.backoff_s)
    loader = make_loader(cfg, source, in_process=True)
    opened = time.perf_counter()
    loader.plan(0)
    planned = time.perf_counter()
    seen = sum(b.n_clips for b in loader)
    end = time.perf_counter()
    assert seen == n_clips, (seen, n_clips)
    out = {
        "cold_rate": seen / (end - start),
        "open_s": opened - start,
        "plan_s": planned - opened,
        "cold_steps_s": end - planned,
        "cold_requests": loader.last_read.get("requests", 0),
        "warm": [],
    }
    for _ in range(warm):
        before = [cpu_seconds(p.pid) for p in servers]
        cpu, t0 = time.process_time(), time.perf_counter()
        seen, used = 0, 0
        for b in loader:
            seen += b.n_clips
            used += sum(int(c.shape[0]) for c in b.clip_frames()) * 128 * 2  # float16 features actually stepped on
        elapsed = time.perf_counter() - t0
        assert seen == n_clips, (seen, n_clips)
        out["warm"].append(
            {
                "rate": seen / elapsed,
                "epoch_s": elapsed,
                "cpu_s": time.process_time() - cpu,
                "server_cpu_s": [cpu_seconds(p.pid) - b for p, b in zip(servers, before, strict=True)],
                "read": loader.last_read,
                "used": used,
                "steps": loader.steps_in_epoch(loader.epoch - 1),
            }
        )
    return out


def in_flight_rows(url: str, storage_options: dict | None, repeats: int) -> dict[str, float]:
    """Median seconds for 32 ranges of 256 KiB: :func:`fetch_ranges` with 1 and 8 requests in flight on its
    event loop, and 8 threads each sending one range at a time."""
    from flexast.pipeline.transport import fetch_ranges, object_size

    size = object_size(url, storage_options)
    step = size // 32
    ranges = [(i * step, i * step + min(step, 256 << 10)) for i in range(32)]
    out: dict[str, list[float]] = {"1": [], "8": [], "threads": []}
    with ThreadPoolExecutor(8) as pool:
        for _ in range(repeats):
            for k in out:
                t = time.perf_counter()
                if k == "threads":  # the alternative design: 8 threads, one blocking request each
                    list(pool.map(lambda r: fetch_ranges(url, [r], storage_options, max_in_flight=1), ranges))
                else:
                    fetch_ranges(url, ranges, storage_options, max_in_flight=int(k))
                out[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in out.items()}


def remote_rows(shards: str, wavs: list[str], n: int, repeats: int, latency_ms: float, warm: int = 3) -> None:
    """Print the remote section: HTTP and S3 behind a latency proxy vs fresh AST-style on-the-fly runs."""
    import boto3
    import s3fs

    base = dict(
        budget_tokens=12 * 8 * 62, patches=[[16, 16]], pack_buffer=120, shuffle_buffer=64, max_frames=1024,
        freq_mask=48, time_mask=192, mixup_prob=0.5,
    )  # fmt: skip
    procs = []
    try:
        http, http_url = spawn("range", shards)
        http_proxy, http_proxy_url = spawn("proxy", http_url, "--latency-ms", str(latency_ms))
        moto, moto_url = spawn("moto")
        s3_proxy, s3_proxy_url = spawn("proxy", moto_url, "--latency-ms", str(latency_ms))
        procs = [http, http_proxy, moto, s3_proxy]
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(Bucket="bench")
        direct = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": moto_url}}
        fs = s3fs.S3FileSystem(**direct)
        for name in sorted(os.listdir(shards)):  # the tar shards, their member indexes, index.json, the Zarr store
            local = os.path.join(shards, name)
            fs.put(local, f"s3://bench/ds/{name}", recursive=os.path.isdir(local))
        s3_opts = {**direct, "client_kwargs": {"endpoint_url": s3_proxy_url, "region_name": "us-east-1"}}
        ref = lambda w, s: reference_fbank(w[0], frame_shift=s, **AST_FBANK)  # noqa: E731
        cases, servers = {}, {"http": (http, http_proxy), "s3": (moto, s3_proxy)}
        for shift in ("random", "fixed"):
            res = {"resolution": {"kind": "random"} if shift == "random" else {"kind": "fixed", "shift_ms": 10.0}}
            for fmt in ("tar", "zarr"):
                cases[("http", shift, fmt)] = (StreamConfig(**base, **res), f"{http_proxy_url}/index.json", fmt)
                cases[("s3", shift, fmt)] = (
                    StreamConfig(**base, **res, storage_options=s3_opts),
                    "s3://bench/ds/index.json",
                    fmt,
                )
        for case in cases.values():
            ours_read(case, n, warm=1)  # warm-up: sessions, imports
        rows: dict = {"ref": [], **{k: [] for k in cases}}
        for _ in range(repeats):
            rows["ref"].append(on_the_fly(wavs, ref))
            for k, case in cases.items():
                rows[k].append(ours_read(case, n, servers[k[0]], warm))
        flight_http = in_flight_rows(f"{http_proxy_url}/train-000000.tar", None, repeats)
        flight_s3 = in_flight_rows("s3://bench/ds/train-000000.tar", s3_opts, repeats)
    finally:
        for p in procs:
            p.terminate()
            p.wait()
    ref = rows["ref"]
    med = statistics.median
    print(f"\nremote: {n} clips per epoch, every request through a proxy adding {latency_ms:g} ms; {repeats} "
          f"interleaved repeats, each: a fresh source, its cold first epoch, then {warm} warm epochs")  # fmt: skip
    print("| loader (1 process) | shift | warm clips/s | warm vs AST-style | cold clips/s | cold vs AST-style | "
          "MB sent/clip | sent/used | requests/epoch (warm) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| on-the-fly: wav → reference Kaldi fbank per clip | random | {med(ref):.1f} | 1.0× | | | | | |")
    for k in cases:
        runs = rows[k]
        warm_rates = [med(w["rate"] for w in r["warm"]) for r in runs]  # per repeat: its warm epochs' median
        last = runs[-1]["warm"][-1]
        sent = last["read"]["bytes"]
        print(
            f"| flexast loader, {k[0].upper()} {k[2]} | {k[1]} | {med(warm_rates):.1f} | "
            f"{med(a / b for a, b in zip(warm_rates, ref, strict=True)):.1f}× | "
            f"{med(r['cold_rate'] for r in runs):.1f} | "
            f"{med(r['cold_rate'] / b for r, b in zip(runs, ref, strict=True)):.1f}× | "
            f"{sent / n / 1e6:.2f} | {sent / last['used']:.2f}× | {last['read'].get('requests', '–')} |"
        )
    print("\nwhere the time goes (medians, seconds). Cold: open = index.json, plan = member indexes / Zarr groups and")
    print("chunk indexes, steps = the first epoch. Warm: one epoch; CPU of this process, of the store (range server or")
    print("moto) and of the proxy over that epoch; the store's CPU per request")
    print("| loader | shift | steps | cold open | cold plan | cold steps | warm epoch | CPU here | CPU store | "
          "CPU proxy | store ms/request | clips per CPU-s here |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, runs in ((k, rows[k]) for k in cases):
        warms = [w for r in runs for w in r["warm"]]
        store = med(w["server_cpu_s"][0] for w in warms)
        proxy = med(w["server_cpu_s"][1] for w in warms)
        per_req = sum(w["server_cpu_s"][0] for w in warms) / sum(w["read"]["requests"] for w in warms)
        cpu = med(w["cpu_s"] for w in warms)
        print(
            f"| {k[0].upper()} {k[2]} | {k[1]} | {warms[-1]['steps']} | {med(r['open_s'] for r in runs):.3f} | "
            f"{med(r['plan_s'] for r in runs):.3f} | {med(r['cold_steps_s'] for r in runs):.3f} | "
            f"{med(w['epoch_s'] for w in warms):.3f} | {cpu:.3f} | {store:.3f} | {proxy:.3f} | "
            f"{per_req * 1000:.1f} | {n / cpu:.0f} |"
        )
    print("\nfetch_ranges, 32 ranges of 256 KiB from one shard, median seconds:")
    print("| store | 1 in flight | 8 in flight (event loop) | speed-up | 8 threads × 1 request |")
    print("|---|---|---|---|---|")
    for name, fl in (("HTTP", flight_http), ("S3", flight_s3)):
        print(f"| {name} | {fl['1']:.3f} | {fl['8']:.3f} | {fl['1'] / fl['8']:.1f}× | {fl['threads']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--demo-shards", default="", help="the demo's train shards, for the memory-source section")
    ap.add_argument("--remote", action="store_true", help="also run the remote section (HTTP and S3 behind a proxy)")
    ap.add_argument("--remote-only", action="store_true", help="run only the remote section")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="latency the remote section's proxy adds")
    ap.add_argument("--warm-epochs", type=int, default=3, help="remote section: epochs after the cold first one")
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
        add_member_indexes(shards)
        add_zarr_store(shards)
        wavs = []
        for i in range(args.clips):
            wavs.append(os.path.join(tmp, f"{i}.wav"))
            sf.write(wavs[-1], broadband_clip(10.0, seed=i).numpy(), 16000, subtype="PCM_16")
        n = args.clips // per * per
        if args.remote_only:
            remote_rows(shards, wavs, n, args.repeats, args.latency_ms, args.warm_epochs)
            return
        size = sum(os.path.getsize(os.path.join(shards, f)) for f in os.listdir(shards) if f.endswith(".tar")) / n
        print(f"shards: {n} clips of 10 s, 16 shifts, 128 bins, {size / 1e6:.1f} MB/clip; {args.repeats} repeats")
        local_section(shards, wavs, n, args.repeats)
        print()
        bytes_section(shards, n)
        if args.remote:
            remote_rows(shards, wavs, n, args.repeats, args.latency_ms, args.warm_epochs)
    if args.demo_shards:
        print()
        memory_demo_section(args.demo_shards, args.repeats)


if __name__ == "__main__":
    main()
