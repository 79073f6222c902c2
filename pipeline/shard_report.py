"""``pipeline inspect`` and ``pipeline verify``: look at a built shard folder, and read it all back.

Notation: ``T`` frames of one sample at one shift, ``F`` mel bins; durations in seconds, sizes in bytes.
:func:`verify` trusts nothing but the files: it reads every sample of every shard listed in
``index.json`` and compares shapes and counts with the index, checks that every feature value is finite,
and names the shard of each problem. A missing or unreadable shard is one problem; the check goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from flexast.pipeline.errors import ShardError
from flexast.pipeline.shards import filesystem, join, read_bytes, read_zarr_group
from flexast.pipeline.tar_index import iter_tar, load_npy, verify_members


def load_index(out: str, storage_options: dict | None = None) -> dict:
    """``index.json`` of a built folder.

    Raises:
        ShardError: no ``index.json`` (the build never finished) or it is not JSON.
    """
    data = read_bytes(join(out, "index.json"), storage_options)
    if data is None:
        raise ShardError(f"{out}: no index.json (the build did not finish; rerun the same build-shards command)")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise ShardError(f"{join(out, 'index.json')}: not JSON ({exc.msg})") from exc


def summary(index: dict) -> str:
    """A plain-text table: totals, rejections, labels, and frames/mean/std per shift."""
    lines = [
        f"name          {index['name']}   split {index['split']}   format v{index['format_version']}",
        f"samples       {index['total_samples']}   in {len(index['shards'])} shards, "
        f"{sum(s['bytes'] for s in index['shards']) / 1e6:.1f} MB",
        f"audio         {index['hours']:.3f} h at {index['sample_rate']} Hz, {index['n_mels']} mel bins",
        f"rows          read {index['read']} = written {index['written']} + rejected {index['rejected']}"
        + (
            f"  ({', '.join(f'{k}={v}' for k, v in index.get('rejected_reasons', {}).items())})"
            if index["rejected"]
            else ""
        ),
    ]
    if index.get("cut_clips") or index.get("segments_dropped"):
        lines.append(
            f"long clips    cut {index.get('cut_clips', 0)}, segments dropped {index.get('segments_dropped', 0)}"
        )
    lines += ["", f"{'shift':>8} {'frames':>12} {'mean':>10} {'std':>10}"]
    for name, st in index["stats"].items():
        lines.append(f"{name:>8} {index['frames_per_shift'][name]:>12} {st['mean']:>10.4f} {st['std']:>10.4f}")
    labels = index["labels"]
    lines += ["", f"{len(labels['names'])} labels (most frequent first):"]
    order = sorted(range(len(labels["names"])), key=lambda i: (-labels["counts"][i], i))
    for i in order[:20]:
        name, display = labels["names"][i], labels["display_names"][i]
        shown = name if display == name else f"{name} ({display})"
        lines.append(f"  {labels['counts'][i]:>8}  {shown}")
    if len(order) > 20:
        lines.append(f"  ... {len(order) - 20} more")
    hist = index["duration_hist"]
    lines += ["", "durations:"]
    edges = hist["edges_s"]
    for i, c in enumerate(hist["counts"]):
        hi = f"{edges[i + 1]:g} s" if i + 1 < len(edges) - 1 else "more"
        lines.append(f"  {edges[i]:>6g} s - {hi:<7} {c:>8}")
    return "\n".join(lines)


def plot_durations(index: dict, path: str) -> str:
    """Save the duration histogram as a PNG (matplotlib, Agg backend); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = index["duration_hist"]
    edges, counts = hist["edges_s"], hist["counts"]
    labels = [
        f"{edges[i]:g}–{edges[i + 1]:g}" if i + 1 < len(edges) - 1 else f"≥{edges[i]:g}" for i in range(len(counts))
    ]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(counts)), counts)
    ax.set_xticks(range(len(counts)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("clip duration (s)")
    ax.set_ylabel("samples")
    ax.set_title(f"{index['name']}: {index['total_samples']} samples, {index['hours']:.2f} h")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class VerifyReport:
    """Result of :func:`verify`: samples read and every problem found (each names its shard)."""

    samples: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_tar(out, shard, index, storage_options, problems) -> list[str]:
    url = join(out, shard["name"])
    names = list(index["frames_per_shift"])
    keys, frames = [], dict.fromkeys(names, 0)
    try:
        fs, path = filesystem(url, storage_options)
        size = fs.size(path)
        if size != shard["bytes"]:
            problems.append(f"{shard['name']}: {size} bytes on disk, index.json says {shard['bytes']}")
        for key, members in iter_tar(url, storage_options):
            where = f"{shard['name']}:{key}"
            if "json" not in members:
                problems.append(f"{where}: no .json member")
                continue
            meta = json.loads(members["json"])
            for name in names:
                data = members.get(f"{name}.npy")
                if data is None:
                    problems.append(f"{where}: no {name}.npy member")
                    continue
                arr = load_npy(data, where)
                if arr.dtype != np.float16 or arr.ndim != 2 or arr.shape[1] != index["n_mels"]:
                    problems.append(
                        f"{where}: {name} is {arr.dtype} {arr.shape}, expected float16 (T, {index['n_mels']})"
                    )
                elif arr.shape[0] != meta["frames"].get(name):
                    problems.append(
                        f"{where}: {name} has {arr.shape[0]} frames, its json says {meta['frames'].get(name)}"
                    )
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    problems.append(f"{where}: {name} holds {int((~np.isfinite(arr)).sum())} NaN/Inf values")
                frames[name] += arr.shape[0]
            keys.append(key)
    except FileNotFoundError:
        problems.append(f"{shard['name']}: shard missing ({url})")
        return keys
    except (ShardError, OSError, ValueError, KeyError) as exc:  # unreadable: say so, go on with the next shard
        problems.append(str(exc) if isinstance(exc, ShardError) else f"{shard['name']}: unreadable ({exc!r})")
        return keys
    if len(keys) != shard["samples"]:
        problems.append(f"{shard['name']}: {len(keys)} samples, index.json says {shard['samples']}")
    problems.extend(verify_members(url, storage_options))  # member checksums: flipped bytes inside arrays
    for name in names:
        if frames[name] != shard["frames"][name]:
            problems.append(
                f"{shard['name']}: {frames[name]} frames at {name}, index.json says {shard['frames'][name]}"
            )
    return keys


def _check_zarr(out, shard, index, storage_options, problems, tar_keys) -> None:
    stem = shard["zarr_group"].split("/", 1)[1]
    where = shard["zarr_group"]
    try:
        group = read_zarr_group(join(out, "store.zarr"), stem, storage_options)
    except ShardError as exc:
        problems.append(str(exc))
        return
    keys = [str(k) for k in group.get("keys", [])]
    if len(keys) != shard["samples"]:
        problems.append(f"{where}: {len(keys)} keys, index.json says {shard['samples']} samples")
    if tar_keys is not None and keys != tar_keys:
        problems.append(f"{where}: keys differ from {shard['name']}")
    for name, expected in shard["frames"].items():
        values, offsets = group.get(f"{name}/values"), group.get(f"{name}/offsets")
        if values is None or offsets is None:
            problems.append(f"{where}: missing {name}/values or {name}/offsets")
            continue
        if values.shape != (expected, index["n_mels"]) or values.dtype != np.float16:
            problems.append(
                f"{where}: {name}/values is {values.dtype} {values.shape}, expected ({expected}, {index['n_mels']})"
            )
        if offsets.shape != (len(keys) + 1,) or offsets[0] != 0 or offsets[-1] != values.shape[0]:
            problems.append(f"{where}: {name}/offsets {offsets.shape} do not span {values.shape[0]} frames")
        elif np.any(np.diff(offsets) < 0):
            problems.append(f"{where}: {name}/offsets decrease")
        elif values.dtype.kind == "f" and not np.isfinite(values).all():
            bad_rows = np.flatnonzero(~np.isfinite(values).all(axis=1))  # frames holding NaN/Inf
            samples = sorted({keys[i] for i in np.searchsorted(offsets, bad_rows, side="right") - 1 if i < len(keys)})
            problems.append(
                f"{where}: {name}/values holds {int((~np.isfinite(values)).sum())} NaN/Inf values "
                f"(samples {samples[:5]}{' …' if len(samples) > 5 else ''})"
            )


def verify(out: str, storage_options: dict | None = None) -> VerifyReport:
    """Read every sample back and compare with ``index.json``; returns every problem found."""
    index = load_index(out, storage_options)
    report = VerifyReport(shards=len(index["shards"]))
    fmt = index.get("config", {}).get("format", "wds")
    for name, st in index.get("stats", {}).items():
        if not all(np.isfinite(float(st[k])) for k in ("sum", "sumsq", "mean", "std")):
            report.problems.append(f"{join(out, 'index.json')}: stats at {name} are not finite: {st}")
    for shard in index["shards"]:
        tar_keys = None
        try:
            if fmt in ("wds", "both"):
                tar_keys = _check_tar(out, shard, index, storage_options, report.problems)
            if fmt in ("zarr", "both"):
                if not shard.get("zarr_group"):
                    report.problems.append(f"{shard['name']}: no zarr_group in index.json")
                else:
                    _check_zarr(out, shard, index, storage_options, report.problems, tar_keys)
        except Exception as exc:  # one bad shard never stops the check of the others
            report.problems.append(f"{shard.get('name')}: cannot be checked ({type(exc).__name__}: {exc})")
        report.samples += shard["samples"] if tar_keys is None else len(tar_keys)
    if report.samples != index["total_samples"] and not report.problems:
        report.problems.append(f"{out}: {report.samples} samples in shards, index.json says {index['total_samples']}")
    rejected = read_bytes(join(out, "rejected.jsonl"), storage_options)
    n_rejected = 0 if rejected is None else sum(1 for line in rejected.decode().splitlines() if line.strip())
    if n_rejected != index["rejected"]:
        report.problems.append(
            f"{join(out, 'rejected.jsonl')}: {n_rejected} lines, index.json says {index['rejected']}"
        )
    return report
