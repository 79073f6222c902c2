"""``build_shards``: manifest → feature shards + ``index.json`` + ``rejected.jsonl``, resumable and deterministic.

The driver (this module) never decodes audio. It reads the manifest, rejects rows it can judge alone
(``bad_row``, ``unknown_label``, ``duplicate_key``), plans rows into shards in manifest order, runs one
task per shard (:func:`pipeline.shard_task.write_shard`) on an executor, and merges the per-shard records
into ``index.json`` in shard order, so the output does not depend on workers or finishing order.

Resume: a shard is finished when ``_parts/<stem>.json`` exists with the build's config hash; a rerun
skips those. ``_build.json`` holds the config of the build in progress; a rerun with another config
refuses unless ``overwrite=True``. ``index.json`` is written last: the build is complete when it exists.
Times are in seconds; sizes in bytes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field

from flexast.pipeline.build_config import BuildConfig, digest
from flexast.pipeline.build_outputs import check_fresh_output, earlier_build, remove_earlier_build
from flexast.pipeline.errors import ConfigError, ShardError
from flexast.pipeline.executor import default_decode_ahead, make_executor
from flexast.pipeline.manifest import Manifest, ManifestRow, Vocabulary, is_url, read_manifest
from flexast.pipeline.shard_task import DURATION_EDGES_S, ShardTask, part_url, write_shard
from flexast.pipeline.shards import join, read_bytes, write_bytes, write_zarr_root
from flexast.pipeline.stats import RunningStats, merge_all
from flexast.pipeline.units import num_frames, shift_name

FORMAT_VERSION = 1
PROBE_BATCH = 64  # sources per duration-probing task


@dataclass
class BuildReport:
    """What a build did. ``read == written + rejected`` counts manifest rows."""

    out: str
    read: int
    written: int
    rejected: int
    samples: int
    shards: int
    skipped_shards: int
    seconds: float
    reasons: dict[str, int] = field(default_factory=dict)
    index: dict = field(default_factory=dict)

    def exit_code(self, strict: bool = False) -> int:
        """0 unless nothing was written, or ``strict`` and something was rejected."""
        return 1 if self.written == 0 or (strict and self.rejected) else 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import soundfile
    import soxr
    import torch
    import zarr

    try:
        flexast = version("flexast")
    except PackageNotFoundError:
        flexast = "unknown"
    return {
        "flexast": flexast,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "soundfile": soundfile.__version__,
        "libsndfile": soundfile.__libsndfile_version__,
        "soxr": soxr.__version__,
        "zarr": zarr.__version__,
    }


def _probe_many(batch: tuple[list[str], dict | None]) -> list[float | None]:
    from flexast.pipeline.audio import probe_seconds

    sources, storage_options = batch
    return [probe_seconds(s, storage_options) for s in sources]


def _reject(row, source, key, reason, detail) -> dict:
    return {"row": row, "source": source, "key": key, "reason": reason, "detail": detail}


def screen_rows(manifest: Manifest, vocabulary: Vocabulary) -> tuple[list[tuple[ManifestRow, tuple[int, ...]]], list]:
    """Rows the driver accepts (with label ids) and the rejections it can decide without audio.

    A collection with a vocabulary is labelled: there a row without any label is rejected as ``no_label``
    (a training clip must say what it is). Without a vocabulary (no ``--labels``, no row labelled) every row is
    kept and ``index.json`` says the collection is unlabelled.
    """
    index = vocabulary.index()
    seen: dict[str, int] = {}
    accepted, rejected = [], []
    for bad in manifest.invalid:
        rejected.append(_reject(bad.row, bad.source, bad.key, "bad_row", bad.detail))
    for row in manifest.rows:
        unknown = [name for name in row.labels if name not in index]
        if index and not row.labels:
            detail = f"row {row.row} has no label, in a collection labelled with {len(index)} names"
            rejected.append(_reject(row.row, row.source, row.key, "no_label", detail))
        elif unknown:
            rejected.append(_reject(row.row, row.source, row.key, "unknown_label", f"not in vocabulary: {unknown}"))
        elif row.key in seen:
            rejected.append(_reject(row.row, row.source, row.key, "duplicate_key", f"same key as row {seen[row.key]}"))
        else:
            seen[row.key] = row.row
            accepted.append((row, tuple(index[name] for name in row.labels)))
    return accepted, rejected


def estimate_bytes(seconds: float | None, config: BuildConfig) -> int:
    """Estimated bytes of one clip in a shard: float16 ``(T, F)`` per shift, plus the FLAC and headers."""
    if seconds is None:
        return 4096
    if config.max_seconds is not None and config.long_clips == "cut":
        seconds = min(seconds, config.max_seconds)
    samples = int(seconds * config.sample_rate)
    frames = sum(num_frames(samples, config.frame_length_ms, s, config.sample_rate) for s in config.shifts_ms)
    audio = int(seconds * config.sample_rate * 2 * 0.6) if config.keep_audio else 0
    return frames * config.n_mels * 2 + audio + 2048 + 1024 * len(config.shifts_ms)


def plan_shards(accepted, config: BuildConfig, seconds: list[float | None] | None) -> list[tuple[str, str, list]]:
    """Group accepted rows into shards in manifest order, per split: ``[(stem, split, rows)]``.

    By count (``shard_samples``), or by estimated size: a shard closes before it would exceed
    ``min(shard_bytes, split total / min_shards)``.
    """
    by_split: dict[str, list] = {}
    for i, item in enumerate(accepted):
        by_split.setdefault(item[0].split or config.split, []).append((item, None if seconds is None else seconds[i]))
    plan = []
    for split in sorted(by_split):
        current, size = [], 0
        shards = []
        estimates = [estimate_bytes(sec, config) for _, sec in by_split[split]]
        target = min(config.shard_bytes, max(1, -(-sum(estimates) // config.min_shards)))  # ceil division
        for (item, _), est in zip(by_split[split], estimates, strict=True):
            full = len(current) >= config.shard_samples if config.shard_samples else size + est > target
            if current and full:
                shards.append(current)
                current, size = [], 0
            current.append(item)
            size += est
        if current:
            shards.append(current)
        plan += [(f"{split}-{i:06d}", split, rows) for i, rows in enumerate(shards)]
    return plan


def _remove_stale_temps(out: str) -> None:
    """Remove temporary files a killed build left behind (local outputs only)."""
    for folder in (out, os.path.join(out, "store.zarr"), os.path.join(out, "_parts")):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(".") and ".tmp-" in name:
                    p = os.path.join(folder, name)
                    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def merge_index(
    config: BuildConfig, config_dict: dict, config_hash: str, vocabulary: Vocabulary, records, read, rejected
):
    """``index.json`` content from the shard records (in shard order) and the rejections."""
    names = [shift_name(s) for s in config.shifts_ms]
    kept = [r for r in records if r["samples"]]
    label_counts = [0] * len(vocabulary.names)
    for r in records:
        for k, v in r["label_counts"].items():
            label_counts[int(k)] += v
    stats = {n: merge_all([RunningStats.from_dict(r["stats"][n]) for r in records]) for n in names}
    for n in names:  # tasks reject clips with non-finite features; a part record that says otherwise is corrupt
        st = stats[n]
        if not all(math.isfinite(v) for v in (st.sum, st.sumsq, st.mean, st.std)):
            shards = [r["stem"] for r in records if not math.isfinite(float(r["stats"][n]["sumsq"]))]
            raise ShardError(f"statistics at {n} are not finite (shards {shards}); delete their _parts records "
                             "and rerun to rebuild them")  # fmt: skip
    hist = [sum(c) for c in zip(*[r["duration_counts"] for r in records], strict=True)] if records else []
    splits = sorted({r["split"] for r in records}) or [config.split]
    return {
        "format_version": FORMAT_VERSION,
        "name": config.name,
        "split": "+".join(splits),
        "n_mels": config.n_mels,
        "sample_rate": config.sample_rate,
        "shifts_ms": list(config.shifts_ms),
        "shards": [{k: r[k] for k in ("name", "split", "samples", "bytes", "frames", "zarr_group")} for r in kept],
        "total_samples": sum(r["samples"] for r in records),
        "frames_per_shift": {n: sum(r["frames"][n] for r in records) for n in names},
        "hours": sum(r["seconds"] for r in records) / 3600.0,
        "labels": {
            "names": vocabulary.names,
            "display_names": vocabulary.display_names,
            "counts": label_counts,
            "kind": _label_kind(vocabulary, records),
        },
        "duration_hist": {"edges_s": list(DURATION_EDGES_S), "counts": hist},
        "stats": {n: stats[n].to_dict() for n in names},
        "read": read,
        "written": sum(r["rows_written"] for r in records),
        "rejected": len(rejected),
        "rejected_reasons": _reason_counts(rejected),
        "cut_clips": sum(r["cut_clips"] for r in records),
        "segments_dropped": sum(r["segments_dropped"] for r in records),
        "config": config_dict,
        "config_hash": config_hash,
        "versions": _versions(),
    }


def _label_kind(vocabulary: Vocabulary, records) -> str:
    """``unlabelled`` (no vocabulary), ``single`` (every written clip has one label) or ``multi``."""
    if not vocabulary.names:
        return "unlabelled"
    return "multi" if any(r.get("max_labels", 1) > 1 for r in records) else "single"


def _reason_counts(rejected: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rejected:
        out[r["reason"]] = out.get(r["reason"], 0) + 1
    return dict(sorted(out.items()))


def build_shards(
    manifest: str | Manifest,
    out: str | None = None,
    config: BuildConfig | None = None,
    *,
    labels: str | None = None,
    only_split: str | None = None,
    workers: int | None = None,
    dask: str | None = None,
    executor=None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict | None = None,
    decode_ahead: int | None = None,
    log=print,
) -> BuildReport:
    """Build feature shards from a manifest.

    Args:
        manifest: manifest path/URL (CSV, TSV, JSONL, AST JSON, folder tree) or a :class:`Manifest`.
        out: output folder or fsspec URL; default ``shards/<config.name>``.
        config: what to write (:class:`BuildConfig`); the AST preset with a 10 ms shift by default.
        labels: vocabulary file (``class_labels_indices.csv`` or one label per line); rows with other labels
            are rejected as ``unknown_label``. Default: the manifest's own vocabulary, else its sorted labels.
        only_split: keep only manifest rows of this split (rows of other splits are not read).
        workers: local worker processes (default: CPU count; 1 runs in this process).
        dask: Dask scheduler address ``tcp://host:port``, or ``local:N`` to start a LocalCluster of N processes.
        executor: an executor from :func:`pipeline.executor.make_executor` to reuse (not closed here); overrides
            ``workers`` and ``dask``.
        overwrite: replace an existing output built with another config instead of refusing; deletes only the
            earlier build's files, and refuses if anything else is in ``out`` (:mod:`pipeline.build_outputs`).
        progress: show a tqdm bar (clips/s, audio hours/s) and print the summary.
        storage_options: fsspec options for the output and for audio/manifest URLs.
        decode_ahead: clips each task decodes ahead of the featurizer, and reduces and writes behind it, on
            two background threads (0: all inline; default: :func:`pipeline.executor.default_decode_ahead`).
            Changes speed only, never the output.
        log: where summary lines go.

    Raises:
        ConfigError: the output holds a build with a different config and ``overwrite`` is False, or files that
            are not the earlier build's are in the way (named in the message).
        ManifestError: the manifest cannot be parsed at all.
    """
    config = config or BuildConfig()
    out = out or os.path.join("shards", config.name)
    if not is_url(out):
        out = os.path.abspath(out)
    log = log if progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest, labels=labels, storage_options=storage_options)
        labels = None
    if only_split is not None:
        manifest = Manifest(
            manifest.path, [r for r in manifest.rows if (r.split or config.split) == only_split],
            manifest.invalid, manifest.vocabulary,
        )  # fmt: skip
    vocabulary = manifest.vocabulary
    if labels is not None:
        from flexast.pipeline.manifest import read_vocabulary

        vocabulary = read_vocabulary(labels, storage_options)
    if vocabulary is None:
        names = sorted({name for r in manifest.rows for name in r.labels})
        vocabulary = Vocabulary(names, list(names))
    accepted, rejected = screen_rows(manifest, vocabulary)

    owned = executor is None
    executor = make_executor(workers, dask) if owned else executor
    if decode_ahead is None:
        decode_ahead = default_decode_ahead(executor)
    try:
        seconds = None
        if config.shard_samples is None:
            sources = [row.source for row, _ in accepted]
            batches = [(sources[i : i + PROBE_BATCH], storage_options) for i in range(0, len(sources), PROBE_BATCH)]
            seconds = [s for part in executor.map(_probe_many, batches) for s in part]
        plan = plan_shards(accepted, config, seconds)
        config_dict = config.to_dict()
        config_dict["manifest_sha256"] = digest([[repr(r), ids] for r, ids in accepted] + [rejected])
        config_dict["plan_sha256"] = digest([[stem, [r.row for r, _ in rows]] for stem, _, rows in plan])
        config_dict["vocabulary_sha256"] = digest([vocabulary.names, vocabulary.display_names])
        config_hash = digest(config_dict)

        stems = [stem for stem, _, _ in plan]
        previous = earlier_build(out, storage_options)
        if previous is None:
            check_fresh_output(out, stems if config.format != "zarr" else [], overwrite, storage_options)
        elif previous.config_hash != config_hash:
            if not overwrite:
                raise ConfigError(
                    f"{out} holds a build with another config (hash {previous.config_hash[:12]}, "
                    f"this one {config_hash[:12]}); use --overwrite to replace it or choose another --out"
                )
            remove_earlier_build(out, previous, storage_options)
        if not is_url(out):
            _remove_stale_temps(out)
        build_meta = {"config_hash": config_hash, "config": config_dict, "shards": stems}  # what --overwrite may delete
        write_bytes(
            join(out, "_build.json"), json.dumps(build_meta, indent=1, sort_keys=True).encode(), storage_options
        )
        if config.format in ("zarr", "both"):
            write_zarr_root(join(out, "store.zarr"), storage_options)

        records: dict[str, dict] = {}
        pending = []
        for stem, split, rows in plan:
            done = read_bytes(part_url(out, stem), storage_options)
            rec = json.loads(done) if done is not None else None
            if rec is not None and rec.get("config_hash") == config_hash:
                records[stem] = rec
            else:
                pending.append(ShardTask(stem, split, rows, config, config_hash, out, storage_options, decode_ahead))
        skipped = len(records)
        if progress:
            log(f"build-shards: {manifest.n_rows} rows → {len(plan)} shards in {out} ({executor.description}); "
                f"{skipped} already finished")  # fmt: skip
        bar = _progress_bar(len(accepted), sum(r["rows"] for r in records.values()), progress)
        audio_s = 0.0
        for task, rec in executor.as_completed(write_shard, pending):
            records[task.stem] = rec
            audio_s += rec["seconds"]
            if bar is not None:
                bar.update(len(task.rows))
                elapsed = max(bar.format_dict["elapsed"], 1e-9)
                bar.set_postfix_str(f"{audio_s / 3600 / elapsed:.3f} audio h/s")
        if bar is not None:
            bar.close()
    finally:
        if owned:
            executor.close()

    ordered = [records[stem] for stem, _, _ in plan]
    all_rejected = sorted(rejected + [x for r in ordered for x in r["rejected"]], key=lambda x: x["row"])
    read = manifest.n_rows
    index = merge_index(config, config_dict, config_hash, vocabulary, ordered, read, all_rejected)
    lines = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in all_rejected)
    write_bytes(join(out, "rejected.jsonl"), lines.encode(), storage_options)
    index_text = json.dumps(index, indent=1, ensure_ascii=False, allow_nan=False)  # never a bare NaN
    write_bytes(join(out, "index.json"), index_text.encode(), storage_options)

    report = BuildReport(
        out=out, read=read, written=index["written"], rejected=len(all_rejected), samples=index["total_samples"],
        shards=len(index["shards"]), skipped_shards=skipped, seconds=time.perf_counter() - t0,
        reasons=index["rejected_reasons"], index=index,
    )  # fmt: skip
    ok = report.written + report.rejected == report.read
    log(f"read {report.read} = written {report.written} + rejected {report.rejected} "
        f"{'✓' if ok else '✗ MISMATCH'}; {report.samples} samples in {report.shards} shards, "
        f"{index['hours']:.3f} h of audio, {report.seconds:.1f} s")  # fmt: skip
    if report.rejected:
        log(
            "rejected: "
            + ", ".join(f"{k}={v}" for k, v in report.reasons.items())
            + f" (see {join(out, 'rejected.jsonl')})"
        )
    if not ok:
        raise AssertionError(f"row accounting broken: read {report.read} != {report.written} + {report.rejected}")
    return report


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="clip", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
