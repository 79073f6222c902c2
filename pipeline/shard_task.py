"""One build task: decode, featurise and write one whole shard, and report what happened.

Notation: ``S`` samples of a waveform at the target rate, ``T`` frames at one shift, ``F`` mel bins,
``ΣT`` frames of the shard at one shift. Times are in seconds unless the name says ``_ms``.

A task is a plain picklable function call, :func:`write_shard` ``(task) -> dict``, so it runs the same
in-process, in a local process pool and on a Dask worker. It writes the tar and/or the Zarr group
(each visible only when complete) and then ``_parts/<stem>.json``, the record that marks the shard
finished for resume and that the driver merges into ``index.json``.

Inside a task three stages can overlap (``decode_ahead > 0``): decoding on one thread, the fbank on the
task's own thread, and statistics + tar writing on another (:class:`WriteBehind`). Each keeps row order.
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

from flexast.pipeline.audio import Audio, load_audio, subtract_mean
from flexast.pipeline.build_config import BuildConfig
from flexast.pipeline.errors import AudioError
from flexast.pipeline.fbank import ClipRows, fbank, fbank_rows
from flexast.pipeline.manifest import ManifestRow
from flexast.pipeline.shards import TarShardWriter, flac_bytes, join, write_bytes, write_zarr_group
from flexast.pipeline.stats import RunningStats, update_shared_rows
from flexast.pipeline.units import num_frames, samples_to_seconds, seconds_to_samples, shift_name

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


def featurize(centred: np.ndarray, config: BuildConfig) -> ClipRows | dict[float, torch.Tensor]:
    """Mean-subtracted ``(S,)`` waveform (:func:`pipeline.audio.subtract_mean`) → the clip's float16 features
    at every shift of the build.

    With the usual options: :class:`pipeline.fbank.ClipRows`, each distinct frame computed and cast once,
    whichever shifts share it; the per-shift gathers and the statistics happen later, on the write-behind
    side (:meth:`ShardContents.add`). With ``subtract_mean`` a frame's value depends on its shift, so nothing is
    shared: ``{shift_ms: (T, F) tensor}``.
    """
    x = torch.from_numpy(centred)  # (S,)
    options = dict(shifts_ms=config.shifts_ms, sample_frequency=float(config.sample_rate), out_dtype=torch.float16)
    if config.features.get("subtract_mean"):
        return {s: clips[0] for s, clips in fbank([x], **options, **config.features).items()}
    return fbank_rows([x], **options, **config.features)[0]


def nonfinite_detail(features: ClipRows | dict[float, torch.Tensor], wave: np.ndarray) -> str | None:
    """None when every feature value of :func:`featurize`'s result is finite, else why not (for ``rejected.jsonl``).

    Finite samples can still give non-finite features: float audio far outside [-1, 1] (one sample of 1e30)
    overflows the float32 power spectrum. Such a clip is rejected, not repaired: clipping or rescaling would
    change its sound without a word, and one NaN or Inf in a shard poisons the statistics and training.
    """
    values = [features.values] if isinstance(features, ClipRows) else list(features.values())  # (R, F) / (T, F)
    bad = sum(int((~torch.isfinite(v)).sum()) for v in values)
    if not bad:
        return None
    total = sum(v.numel() for v in values)
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    return f"{bad} of {total} fbank values are NaN/Inf (peak |sample| {peak:.3g}; audio is expected within [-1, 1])"


def frame_count(features: ClipRows | dict[float, torch.Tensor], shift_ms: float) -> int:
    """Frames of :func:`featurize`'s result at ``shift_ms``, without gathering them."""
    if isinstance(features, ClipRows):
        return features.frames(shift_ms)
    return int(features[shift_ms].shape[0])


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
    """``((pieces, n_cut, n_dropped), None)`` for a usable row, or ``(None, rejection record)``.

    Each piece is ``(offset_s, waveform (S,), mean-subtracted waveform (S,))``: the mean is removed here, on
    the decode-ahead side, since every piece is featurised as its own clip.
    """
    win_s = cfg.frame_length_ms / 1000.0
    try:
        audio = load_audio(row.source, cfg.sample_rate, row.start_s, row.end_s, cfg.min_seconds, storage_options)
        if audio.duration_s < win_s:
            raise AudioError("too_short", row.source, f"{audio.duration_s:.4f} s < one {win_s} s window")
        pieces, n_cut, n_dropped = segments(audio, cfg)
        return ([(offset_s, wave, subtract_mean(wave)) for offset_s, wave in pieces], n_cut, n_dropped), None
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


class ShardContents:
    """What one shard has received so far, and its writers: the tar (written as samples arrive), the Zarr
    arrays (collected, written whole by :meth:`finish`), the statistics and the record's counters."""

    def __init__(self, task: ShardTask):
        cfg = self.config = task.config
        self.task = task
        self.names = {s: shift_name(s) for s in cfg.shifts_ms}
        self.stats = {s: RunningStats() for s in cfg.shifts_ms}
        self.frames_total = {self.names[s]: 0 for s in cfg.shifts_ms}
        self.keys: list[str] = []
        self.durations: list[float] = []
        self.label_ids: list[list[int]] = []
        self.label_counts: dict[int, int] = {}
        self.zarr_values: dict[float, list[np.ndarray]] = {s: [] for s in cfg.shifts_ms}
        self.want_tar = cfg.format in ("wds", "both")
        self.want_zarr = cfg.format in ("zarr", "both")
        self.tar_name = f"{task.stem}.tar"
        self.writer = TarShardWriter(join(task.out, self.tar_name), task.storage_options) if self.want_tar else None

    def add(self, meta: dict, features: ClipRows | dict[float, torch.Tensor], wave: np.ndarray) -> None:
        """Count, reduce into the statistics and write one sample (``meta`` is its JSON record)."""
        cfg = self.config
        if isinstance(features, ClipRows):
            update_shared_rows(self.stats, features.values, features.plan)
            feats = {s: features.at(s) for s in cfg.shifts_ms}  # (T, F) each
        else:
            feats = features
            for s in cfg.shifts_ms:
                self.stats[s].update(feats[s])
        for name, n_frames in meta["frames"].items():
            self.frames_total[name] += n_frames
        if self.writer is not None:
            members = [("json", json.dumps(meta, ensure_ascii=False).encode())]
            members += [(f"{self.names[s]}.npy", feats[s].numpy()) for s in cfg.shifts_ms]
            if cfg.keep_audio:
                members.append(("flac", flac_bytes(wave, cfg.sample_rate)))
            self.writer.add(meta["key"], members)
        if self.want_zarr:
            for s in cfg.shifts_ms:
                self.zarr_values[s].append(feats[s].numpy())
        self.keys.append(meta["key"])
        self.durations.append(meta["duration_s"])
        self.label_ids.append(meta["label_ids"])
        for i in meta["label_ids"]:
            self.label_counts[i] = self.label_counts.get(i, 0) + 1

    def finish(self) -> tuple[int, str | None]:
        """Make the shard visible (tar renamed into place, Zarr group written); ``(bytes, zarr group or None)``."""
        n, size, zarr_group = len(self.keys), 0, None
        if self.writer is not None:
            if n:
                size = self.writer.close()
            else:
                self.writer.abort()
        if self.want_zarr and n:
            zarr_group = f"store.zarr/{self.task.stem}"
            arrays = {}
            for s in self.config.shifts_ms:
                values = self.zarr_values[s]
                arrays[f"{self.names[s]}/values"] = np.concatenate(values, 0)  # (ΣT, F)
                arrays[f"{self.names[s]}/offsets"] = np.cumsum([0] + [len(v) for v in values]).astype(np.int64)
            arrays["keys"] = np.asarray(self.keys, dtype=str)
            arrays["label_values"] = np.asarray([i for ids in self.label_ids for i in ids], dtype=np.int64)
            arrays["label_offsets"] = np.cumsum([0] + [len(x) for x in self.label_ids]).astype(np.int64)
            arrays["duration_s"] = np.asarray(self.durations, dtype=np.float64)
            attrs = {"shard": self.task.stem, "n_mels": self.config.n_mels, "sample_rate": self.config.sample_rate,
                     "shifts_ms": list(self.config.shifts_ms), "samples": n}  # fmt: skip
            out = join(self.task.out, "store.zarr")
            zarr_size = write_zarr_group(out, self.task.stem, arrays, attrs, self.task.storage_options)
            size = size if self.want_tar else zarr_size
        return size, zarr_group

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class WriteBehind:
    """Runs ``fn(*args)`` calls in order on one background thread, at most ``depth`` behind (0: inline).

    Statistics (torch) and tar writes (file I/O) release the GIL, so they overlap the next clip's fbank.
    The first failure is raised by the next :meth:`submit` or by :meth:`drain`.
    """

    def __init__(self, depth: int):
        self.depth = depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="write") if depth > 0 else None
        self.pending: deque = deque()

    def submit(self, fn, *args) -> None:
        if self.pool is None:
            fn(*args)
            return
        self.pending.append(self.pool.submit(fn, *args))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        if self.pool is not None:
            for future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True)


def write_shard(task: ShardTask) -> dict:
    """Decode, featurise and write one shard; returns (and stores in ``_parts/``) the shard's record.

    With ``task.decode_ahead > 0`` three stages overlap: decoding (a thread), the fbank (this thread) and
    statistics + writing (a thread). Every stage keeps row order, so the bytes do not depend on it.
    """
    cfg = task.config
    rejected, rows_written, cut, dropped = [], 0, 0, 0
    contents = ShardContents(task)
    behind = WriteBehind(task.decode_ahead)
    try:
        with one_thread():
            for row, label_ids, decoded, rejection in decode_ahead(
                task.rows, cfg, task.storage_options, task.decode_ahead
            ):
                if rejection is not None:
                    rejected.append(rejection)
                    continue
                pieces, n_cut, n_dropped = decoded
                featurized = [featurize(centred, cfg) for _, _, centred in pieces]
                why = next((w for (_, wave, _), f in zip(pieces, featurized, strict=True)
                            if (w := nonfinite_detail(f, wave))), None)  # fmt: skip
                if why is not None:  # the whole row, as for any other rejection: nothing of it is written
                    rejected.append(dict(row=row.row, source=row.source, key=row.key, reason="nonfinite_features",
                                         detail=why))  # fmt: skip
                    continue
                cut, dropped, rows_written = cut + n_cut, dropped + n_dropped, rows_written + 1
                base_start = row.start_s or 0.0
                for j, ((offset_s, wave, _), features) in enumerate(zip(pieces, featurized, strict=True)):
                    duration = samples_to_seconds(int(wave.shape[0]), cfg.sample_rate)
                    frames = {s: frame_count(features, s) for s in cfg.shifts_ms}
                    for s in cfg.shifts_ms:
                        assert frames[s] == num_frames(wave.shape[0], cfg.frame_length_ms, s, cfg.sample_rate)
                    meta = {
                        "key": row.key if len(pieces) == 1 else f"{row.key}_seg{j:04d}",
                        "labels": list(row.labels),
                        "label_ids": list(label_ids),
                        "duration_s": duration,
                        "source": row.source,
                        "sample_rate": cfg.sample_rate,
                        "frames": {contents.names[s]: frames[s] for s in cfg.shifts_ms},
                        "start_s": base_start + offset_s,
                        "end_s": base_start + offset_s + duration,
                    }
                    behind.submit(contents.add, meta, features, wave)
                    if os.environ.get(STALL_ENV):
                        behind.drain()
                        _maybe_stall(task.stem, len(contents.keys))
            behind.drain()
        size, zarr_group = contents.finish()
    except BaseException:
        behind.close()
        contents.abort()
        raise
    behind.close()
    n, durations = len(contents.keys), contents.durations
    record = {
        "stem": task.stem,
        "split": task.split,
        "name": contents.tar_name if contents.want_tar else task.stem,
        "samples": n,
        "bytes": size,
        "frames": contents.frames_total,
        "zarr_group": zarr_group,
        "rows": len(task.rows),
        "rows_written": rows_written,
        "rejected": rejected,
        "cut_clips": cut,
        "segments_dropped": dropped,
        "seconds": float(sum(durations)),
        "duration_counts": histogram(durations),
        "label_counts": {str(k): v for k, v in sorted(contents.label_counts.items())},
        "max_labels": max((len(ids) for ids in contents.label_ids), default=0),
        "stats": {contents.names[s]: contents.stats[s].to_dict() for s in cfg.shifts_ms},
        "config_hash": task.config_hash,
    }
    write_bytes(part_url(task.out, task.stem), json.dumps(record, indent=1).encode(), task.storage_options)
    return record
