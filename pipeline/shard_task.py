"""One build task: decode, featurise and write one whole shard, and report what happened.

Notation: ``S`` samples of a waveform at the target rate, ``T`` frames at one shift, ``F`` mel bins,
``ΣT`` frames of the shard at one shift. Times are in seconds unless the name says ``_ms``.

A task is a plain picklable function call, :func:`write_shard` ``(task) -> dict``, so it runs the same
in-process, in a local process pool and on a Dask worker. It writes the tar and/or the Zarr group
(each visible only when complete) and then ``_parts/<stem>.json``, the record that marks the shard
finished for resume and that the driver merges into ``index.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.audio import Audio, load_audio, subtract_mean
from pipeline.build_config import BuildConfig
from pipeline.errors import AudioError
from pipeline.manifest import ManifestRow
from pipeline.shards import TarShardWriter, flac_bytes, join, write_bytes, write_zarr_group
from pipeline.stats import RunningStats
from pipeline.units import num_frames, samples_to_seconds, seconds_to_samples, shift_name

DURATION_EDGES_S = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0, 60.0, 120.0, 600.0)
"""Fixed histogram edges in seconds; the last bin also counts everything longer."""

STALL_ENV = "FLEXAST_TEST_STALL_SHARD"  # test hook: "<stem>:<marker path>" stalls mid-shard (kill-and-resume test)
DECODE_AHEAD = 2  # rows decoded ahead of the featurizer on a background thread


@dataclass
class ShardTask:
    """Everything one task needs: the shard's rows with their label ids, the config and where to write."""

    stem: str
    split: str
    rows: list[tuple[ManifestRow, tuple[int, ...]]]
    config: BuildConfig
    config_hash: str
    out: str
    storage_options: dict | None = None
    decode_ahead: int = DECODE_AHEAD  # how a task runs, not what it writes: not part of the config hash


def part_url(out: str, stem: str) -> str:
    """URL of the per-shard record ``_parts/<stem>.json``."""
    return join(out, "_parts", f"{stem}.json")


def histogram(durations_s: list[float]) -> list[int]:
    """Counts of ``durations_s`` in the bins of :data:`DURATION_EDGES_S` (last bin open-ended)."""
    edges = np.asarray(DURATION_EDGES_S[1:-1])
    idx = np.searchsorted(edges, np.asarray(durations_s, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=len(DURATION_EDGES_S) - 1).astype(int).tolist()


def segments(audio: Audio, config: BuildConfig) -> tuple[list[tuple[float, np.ndarray]], int, int]:
    """Cut or split a clip at ``max_seconds``: ``([(offset_s, waveform (S,))], cut, dropped)``."""
    wave, sr = audio.waveform, audio.sample_rate
    if config.max_seconds is None or audio.duration_s <= config.max_seconds:
        return [(0.0, wave)], 0, 0
    cap = seconds_to_samples(config.max_seconds, sr)
    if config.long_clips == "cut":
        return [(0.0, wave[:cap])], 1, 0
    shortest = max(seconds_to_samples(config.min_seconds, sr), seconds_to_samples(config.frame_length_ms / 1000, sr))
    out, dropped = [], 0
    for start in range(0, wave.shape[0], cap):
        piece = wave[start : start + cap]
        if piece.shape[0] < shortest:
            dropped += 1
            continue
        out.append((samples_to_seconds(start, sr), piece))
    return out, 0, dropped


def featurize(wave: np.ndarray, config: BuildConfig) -> dict[float, torch.Tensor]:
    """Mean-subtracted ``(S,)`` waveform → ``{shift_ms: (T, F) float16 tensor}`` with the build's fbank options."""
    from pipeline.fbank import fbank

    x = torch.from_numpy(subtract_mean(wave))  # (S,)
    feats = fbank([x], shifts_ms=config.shifts_ms, sample_frequency=float(config.sample_rate), **config.features)
    return {s: feats[s][0].to(torch.float16) for s in config.shifts_ms}


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread (tasks run in parallel processes; also keeps results independent of threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _maybe_stall(stem: str, n_written: int) -> None:
    hook = os.environ.get(STALL_ENV)
    if hook and n_written == 1 and hook.split(":", 1)[0] == stem:
        with open(hook.split(":", 1)[1], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)


def decode_row(row: ManifestRow, cfg: BuildConfig, storage_options: dict | None):
    """``((pieces, n_cut, n_dropped), None)`` for a usable row, or ``(None, rejection record)``."""
    win_s = cfg.frame_length_ms / 1000.0
    try:
        audio = load_audio(row.source, cfg.sample_rate, row.start_s, row.end_s, cfg.min_seconds, storage_options)
        if audio.duration_s < win_s:
            raise AudioError("too_short", row.source, f"{audio.duration_s:.4f} s < one {win_s} s window")
        return segments(audio, cfg), None
    except AudioError as exc:
        return None, dict(row=row.row, source=row.source, key=row.key, reason=exc.reason, detail=exc.detail)
    except Exception as exc:  # never lose a row silently: an unexpected failure is a rejection too
        detail = f"{type(exc).__name__}: {exc}"
        return None, dict(row=row.row, source=row.source, key=row.key, reason="error", detail=detail)


def decode_ahead(rows, cfg: BuildConfig, storage_options: dict | None, ahead: int = DECODE_AHEAD):
    """Yield ``(row, label_ids, decoded, rejection)`` in row order, decoding up to ``ahead`` rows early (0: inline).

    Decoding runs on one background thread: soundfile, soxr and fsspec reads release the GIL, so reading
    and decoding the next clips overlaps the featurizer (and the wait on remote storage) instead of
    adding to it. Order, and so the shard's bytes, are unchanged.
    """
    if ahead <= 0:  # inline: decode each row just before it is featurised
        for row, label_ids in rows:
            yield row, label_ids, *decode_row(row, cfg, storage_options)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        source = iter(rows)

        def submit() -> None:
            item = next(source, None)
            if item is not None:
                pending.append((item, pool.submit(decode_row, item[0], cfg, storage_options)))

        for _ in range(ahead):
            submit()
        while pending:
            (row, label_ids), future = pending.popleft()
            submit()
            decoded, rejection = future.result()
            yield row, label_ids, decoded, rejection


def write_shard(task: ShardTask) -> dict:
    """Decode, featurise and write one shard; returns (and stores in ``_parts/``) the shard's record."""
    cfg = task.config
    names = {s: shift_name(s) for s in cfg.shifts_ms}
    stats = {s: RunningStats() for s in cfg.shifts_ms}
    frames_total = {names[s]: 0 for s in cfg.shifts_ms}
    rejected, durations, label_ids_all, keys = [], [], [], []
    zarr_values = {s: [] for s in cfg.shifts_ms}
    zarr_frames = {s: [] for s in cfg.shifts_ms}
    label_counts: dict[int, int] = {}
    rows_written, cut, dropped = 0, 0, 0
    want_tar = cfg.format in ("wds", "both")
    tar_name = f"{task.stem}.tar"
    writer = TarShardWriter(join(task.out, tar_name), task.storage_options) if want_tar else None
    try:
        with one_thread():
            decoded_rows = decode_ahead(task.rows, cfg, task.storage_options, task.decode_ahead)
            for row, label_ids, decoded, rejection in decoded_rows:
                if rejection is not None:
                    rejected.append(rejection)
                    continue
                pieces, n_cut, n_dropped = decoded
                cut += n_cut
                dropped += n_dropped
                rows_written += 1
                base_start = row.start_s or 0.0
                for j, (offset_s, wave) in enumerate(pieces):
                    key = row.key if len(pieces) == 1 else f"{row.key}_seg{j:04d}"
                    feats = featurize(wave, cfg)
                    duration = samples_to_seconds(int(wave.shape[0]), cfg.sample_rate)
                    frames = {names[s]: int(feats[s].shape[0]) for s in cfg.shifts_ms}
                    for s in cfg.shifts_ms:
                        assert feats[s].shape[0] == num_frames(wave.shape[0], cfg.frame_length_ms, s, cfg.sample_rate)
                        stats[s].update(feats[s])
                        frames_total[names[s]] += frames[names[s]]
                    meta = {
                        "key": key,
                        "labels": list(row.labels),
                        "label_ids": list(label_ids),
                        "duration_s": duration,
                        "source": row.source,
                        "sample_rate": cfg.sample_rate,
                        "frames": frames,
                        "start_s": base_start + offset_s,
                        "end_s": base_start + offset_s + duration,
                    }
                    if writer is not None:
                        members = [("json", json.dumps(meta, ensure_ascii=False).encode())]
                        members += [(f"{names[s]}.npy", feats[s].numpy()) for s in cfg.shifts_ms]
                        if cfg.keep_audio:
                            members.append(("flac", flac_bytes(wave, cfg.sample_rate)))
                        writer.add(key, members)
                    if cfg.format in ("zarr", "both"):
                        for s in cfg.shifts_ms:
                            zarr_values[s].append(feats[s].numpy())
                            zarr_frames[s].append(feats[s].shape[0])
                    keys.append(key)
                    durations.append(duration)
                    label_ids_all.append(list(label_ids))
                    for i in label_ids:
                        label_counts[i] = label_counts.get(i, 0) + 1
                    _maybe_stall(task.stem, len(keys))
        n = len(keys)
        size, zarr_group = 0, None
        if writer is not None:
            if n:
                size = writer.close()
            else:
                writer.abort()
        if cfg.format in ("zarr", "both") and n:
            zarr_group = f"store.zarr/{task.stem}"
            arrays = {}
            for s in cfg.shifts_ms:
                arrays[f"{names[s]}/values"] = np.concatenate(zarr_values[s], 0)  # (ΣT, F)
                arrays[f"{names[s]}/offsets"] = np.concatenate([[0], np.cumsum(zarr_frames[s])]).astype(np.int64)
            arrays["keys"] = np.asarray(keys, dtype=str)
            arrays["label_values"] = np.asarray([i for ids in label_ids_all for i in ids], dtype=np.int64)
            arrays["label_offsets"] = np.concatenate([[0], np.cumsum([len(x) for x in label_ids_all])]).astype(np.int64)
            arrays["duration_s"] = np.asarray(durations, dtype=np.float64)
            attrs = {"shard": task.stem, "n_mels": cfg.n_mels, "sample_rate": cfg.sample_rate,
                     "shifts_ms": list(cfg.shifts_ms), "samples": n}  # fmt: skip
            zarr_size = write_zarr_group(join(task.out, "store.zarr"), task.stem, arrays, attrs, task.storage_options)
            size = size if want_tar else zarr_size
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    record = {
        "stem": task.stem,
        "split": task.split,
        "name": tar_name if want_tar else task.stem,
        "samples": n,
        "bytes": size,
        "frames": frames_total,
        "zarr_group": zarr_group,
        "rows": len(task.rows),
        "rows_written": rows_written,
        "rejected": rejected,
        "cut_clips": cut,
        "segments_dropped": dropped,
        "seconds": float(sum(durations)),
        "duration_counts": histogram(durations),
        "label_counts": {str(k): v for k, v in sorted(label_counts.items())},
        "stats": {names[s]: stats[s].to_dict() for s in cfg.shifts_ms},
        "config_hash": task.config_hash,
    }
    write_bytes(part_url(task.out, task.stem), json.dumps(record, indent=1).encode(), task.storage_options)
    return record
