"""build_shards end to end: features against an independent fbank, the bad-input corpus, determinism,
AST data files, long clips, config changes, and the 16 ElasticAST shifts."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from flexast.pipeline.build import build_shards, plan_shards
from flexast.pipeline.build_config import AST_FBANK, BuildConfig
from flexast.pipeline.errors import ConfigError
from flexast.pipeline.fbank_reference import reference_fbank
from flexast.pipeline.manifest import ManifestRow
from flexast.pipeline.shard_task import WriteBehind
from flexast.pipeline.shards import read_zarr_group
from flexast.pipeline.units import ELASTICAST_SHIFTS_MS, num_frames, shift_name
from tests.factories import write_audio, write_bad_inputs, write_collection, write_manifest


def read_tar(path: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} with a plain tarfile reader (independent of pipeline.shards)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def all_samples(out: str, index: dict) -> dict[str, dict]:
    samples = {}
    for shard in index["shards"]:
        for key, members in read_tar(os.path.join(out, shard["name"])).items():
            samples[key] = {"json": json.loads(members["json"])}
            for ext, data in members.items():
                if ext.endswith(".npy"):
                    samples[key][ext[:-4]] = np.load(io.BytesIO(data))
                elif ext == "flac":
                    samples[key]["flac"] = data
    return samples


def expected_features(path: str, shift_ms: float, sr: int = 16000) -> np.ndarray:
    """Decode → mono → soxr → mean removal → the per-clip reference fbank (AST options), as float16."""
    raw, rate = sf.read(path, dtype="float32", always_2d=True)
    mono = raw.mean(axis=1, dtype=np.float32) if raw.shape[1] > 1 else raw[:, 0]
    wave = soxr.resample(mono, rate, sr, quality="HQ") if rate != sr else mono
    wave = (wave - wave.mean(dtype=np.float64)).astype(np.float32)
    feats = reference_fbank(torch.from_numpy(wave), frame_shift=shift_ms, sample_frequency=float(sr), **AST_FBANK)
    return feats.numpy()


def test_end_to_end_every_format_against_independent_fbank(tmp_path):
    manifest, rows = write_collection(tmp_path, n=8)
    cfg = BuildConfig(name="t", shifts_ms=(10.0, 25.0), shard_samples=3, format="both")
    report = build_shards(manifest, str(tmp_path / "out"), cfg, workers=1, progress=False)
    out, index = report.out, report.index
    assert (report.read, report.written, report.rejected, report.samples, report.shards) == (8, 8, 0, 8, 3)
    assert [s["name"] for s in index["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert Path(out, "rejected.jsonl").read_text() == ""

    samples = all_samples(out, index)
    assert list(samples) == [r["key"] for r in rows]  # manifest order, one sample per row
    values = {name: [] for name in ("s10", "s25")}
    for row in rows:
        s = samples[row["key"]]
        meta = s["json"]
        assert meta["labels"] == [row["label"]] and meta["label_ids"] == [("a", "b").index(row["label"])]
        assert meta["source"] == str(tmp_path / row["path"]) and meta["sample_rate"] == 16000
        for shift in (10.0, 25.0):
            name = shift_name(shift)
            ref = expected_features(str(tmp_path / row["path"]), shift)
            got = s[name]
            assert got.dtype == np.float16 and got.shape == ref.shape == (meta["frames"][name], 128)
            assert got.shape[0] == num_frames(round(meta["duration_s"] * 16000), 25.0, shift, 16000)
            np.testing.assert_allclose(got.astype(np.float32), ref, atol=0.03, rtol=2e-3)
            values[name].append(got.astype(np.float64))
    for name, parts in values.items():
        allv = np.concatenate(parts)
        st = index["stats"][name]
        assert st["count"] == allv.size and index["frames_per_shift"][name] == allv.shape[0]
        assert st["mean"] == pytest.approx(allv.mean(), rel=1e-12)
        assert st["std"] == pytest.approx(allv.std(), rel=1e-9)
    assert index["labels"] == {"names": ["a", "b"], "display_names": ["a", "b"], "counts": [4, 4], "kind": "single"}
    assert index["hours"] == pytest.approx(sum(s["json"]["duration_s"] for s in samples.values()) / 3600)
    assert sum(index["duration_hist"]["counts"]) == 8

    # Zarr holds exactly the tar's arrays, as values + offsets per shard.
    for shard in index["shards"]:
        group = read_zarr_group(os.path.join(out, "store.zarr"), shard["zarr_group"].split("/")[1])
        keys = [str(k) for k in group["keys"]]
        for name in ("s10", "s25"):
            offsets = group[f"{name}/offsets"]
            for i, key in enumerate(keys):
                np.testing.assert_array_equal(group[f"{name}/values"][offsets[i] : offsets[i + 1]], samples[key][name])
        ids = group["label_values"]
        lo = group["label_offsets"]
        assert [list(ids[lo[i] : lo[i + 1]]) for i in range(len(keys))] == [
            samples[k]["json"]["label_ids"] for k in keys
        ]

    # The webdataset library itself reads the shards by the contract's member names.
    import webdataset as wds

    ds = wds.WebDataset(os.path.join(out, "train-000000.tar"), shardshuffle=False).decode()
    first = next(iter(ds))
    assert first["__key__"] == rows[0]["key"] and first["s25.npy"].shape == samples[rows[0]["key"]]["s25"].shape


def test_bad_input_corpus_rejects_each_with_its_reason_and_keeps_every_good_clip(tmp_path):
    _, rows = write_collection(tmp_path, n=5)
    bad = write_bad_inputs(tmp_path)
    manifest = write_manifest(tmp_path / "all.csv", rows + list(bad.values()))
    (tmp_path / "labels.txt").write_text("a\nb\n")
    cfg = BuildConfig(name="bad", shard_samples=4)
    report = build_shards(
        manifest, str(tmp_path / "out"), cfg, labels=str(tmp_path / "labels.txt"), workers=1, progress=False
    )
    rejected = [json.loads(line) for line in Path(report.out, "rejected.jsonl").read_text().splitlines()]
    got = {r["key"]: r["reason"] for r in rejected}
    expected = {row["key"] if name != "duplicate_key" else "clip000": name.split("_")[0] for name, row in bad.items()}
    expected["bad_label"], expected["clip000"] = "unknown_label", "duplicate_key"
    assert got == expected
    assert [r["row"] for r in rejected] == sorted(r["row"] for r in rejected)
    assert all(set(r) == {"row", "source", "key", "reason", "detail"} for r in rejected)
    assert next(r for r in rejected if r["reason"] == "duplicate_key")["row"] == 5 + 7  # the later row loses
    assert (report.read, report.written, report.rejected) == (13, 5, 8)
    assert report.samples == 5 and report.exit_code() == 0 and report.exit_code(strict=True) == 1
    assert report.index["rejected_reasons"] == {
        "duplicate_key": 1, "empty": 1, "missing": 1, "nonfinite": 1, "unknown_label": 1, "unreadable": 3,
    }  # fmt: skip


def test_process_pool_output_is_byte_identical_to_inline(tmp_path):
    manifest, _ = write_collection(tmp_path, n=6)
    cfg = BuildConfig(name="d", shifts_ms=(10.0, 20.0), shard_samples=2, format="both")
    a = build_shards(manifest, str(tmp_path / "a"), cfg, workers=1, progress=False)
    b = build_shards(manifest, str(tmp_path / "b"), cfg, workers=2, progress=False)
    assert tree_bytes(a.out) == tree_bytes(b.out)


def test_decoding_ahead_on_a_thread_changes_no_byte(tmp_path):
    # The bad inputs make some rows rejections: their order in rejected.jsonl must not move either.
    _, rows = write_collection(tmp_path, n=5)
    bad = write_bad_inputs(tmp_path)
    manifest = write_manifest(tmp_path / "all.csv", rows + list(bad.values()))
    cfg = BuildConfig(name="ahead", shifts_ms=(10.0, 20.0), shard_samples=4)
    inline = build_shards(manifest, str(tmp_path / "inline"), cfg, workers=1, progress=False, decode_ahead=0)
    ahead = build_shards(manifest, str(tmp_path / "ahead"), cfg, workers=1, progress=False, decode_ahead=3)
    assert inline.rejected > 0 and inline.written > 0
    assert tree_bytes(inline.out) == tree_bytes(ahead.out)


def tree_bytes(root: str) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (the resume records in _parts included)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def test_ast_data_file_input(tmp_path):
    (tmp_path / "class_labels_indices.csv").write_text("index,mid,display_name\n0,/m/a,Alpha\n1,/m/b,Beta\n")
    for i in range(3):
        write_audio(tmp_path / f"wav/{i}.wav", 0.3, 16000, 300 + 100 * i)
    data = {"data": [{"wav": "wav/0.wav", "labels": "/m/b"}, {"wav": "wav/1.wav", "labels": "/m/a,/m/b"},
                     {"wav": "wav/2.wav", "labels": "/m/c"}]}  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(data))
    report = build_shards(str(tmp_path / "train.json"), str(tmp_path / "out"), BuildConfig(name="ast"), workers=1,
                          progress=False)  # fmt: skip
    samples = all_samples(report.out, report.index)
    assert [s["json"]["label_ids"] for s in samples.values()] == [[1], [0, 1]]
    assert report.index["labels"]["display_names"] == ["Alpha", "Beta"] and report.index["labels"]["counts"] == [1, 2]
    assert report.reasons == {"unknown_label": 1}


def test_long_clips_cut_or_split(tmp_path):
    write_audio(tmp_path / "long.wav", 2.5, 16000, 500.0)
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "long.wav", "label": "x"}])
    cut = build_shards(manifest, str(tmp_path / "cut"), BuildConfig(max_seconds=1.0), workers=1, progress=False)
    (only,) = all_samples(cut.out, cut.index).values()
    assert only["json"]["duration_s"] == 1.0 and only["s10"].shape[0] == num_frames(16000, 25.0, 10.0, 16000)
    assert cut.index["cut_clips"] == 1

    cfg = BuildConfig(max_seconds=1.0, long_clips="split", min_seconds=0.6)
    split = build_shards(manifest, str(tmp_path / "split"), cfg, workers=1, progress=False)
    segs = all_samples(split.out, split.index)
    assert list(segs) == ["long_seg0000", "long_seg0001"]  # the 0.5 s remainder is below min_seconds
    assert [(s["json"]["start_s"], s["json"]["end_s"]) for s in segs.values()] == [(0.0, 1.0), (1.0, 2.0)]
    assert split.index["segments_dropped"] == 1 and split.written == 1 and split.samples == 2
    ref = expected_features(str(tmp_path / "long.wav"), 10.0)  # a segment is its own clip (own mean removal)
    assert segs["long_seg0000"]["s10"].shape == (98, 128) and ref.shape[0] > 98


def test_rerun_skips_finished_shards_and_changed_config_refuses(tmp_path):
    manifest, _ = write_collection(tmp_path, n=4)
    out = str(tmp_path / "out")
    first = build_shards(manifest, out, BuildConfig(shard_samples=2), workers=1, progress=False)
    before = tree_bytes(out)
    again = build_shards(manifest, out, BuildConfig(shard_samples=2), workers=1, progress=False)
    assert again.skipped_shards == 2 and tree_bytes(out) == before and again.index == first.index
    with pytest.raises(ConfigError, match="another config"):
        build_shards(manifest, out, BuildConfig(shard_samples=2, shifts_ms=(20.0,)), workers=1, progress=False)
    assert tree_bytes(out) == before
    new = build_shards(manifest, out, BuildConfig(shard_samples=2, shifts_ms=(20.0,)), workers=1, progress=False,
                       overwrite=True)  # fmt: skip
    assert new.skipped_shards == 0 and new.index["shifts_ms"] == [20.0]
    assert "s20" in all_samples(out, new.index)["clip000"]


def test_sixteen_elastic_shifts(tmp_path):
    write_audio(tmp_path / "x.flac", 1.3, 22050, 700.0)
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "x.flac", "label": "x"}])
    cfg = BuildConfig(shifts_ms=ELASTICAST_SHIFTS_MS, keep_audio=True)
    report = build_shards(manifest, str(tmp_path / "out"), cfg, workers=1, progress=False)
    (sample,) = all_samples(report.out, report.index).values()
    n = round(1.3 * 22050 * 16000 / 22050)
    assert sorted(k for k in sample if k.startswith("s")) == sorted(shift_name(s) for s in ELASTICAST_SHIFTS_MS)
    for s in ELASTICAST_SHIFTS_MS:
        assert sample[shift_name(s)].shape == (num_frames(n, 25.0, s, 16000), 128)
    np.testing.assert_allclose(sample["s40"].astype(np.float32), expected_features(str(tmp_path / "x.flac"), 40.0),
                               atol=0.03, rtol=2e-3)  # fmt: skip
    audio, sr = sf.read(io.BytesIO(sample["flac"]), dtype="float32")
    raw, rate = sf.read(tmp_path / "x.flac", dtype="float32")
    assert sr == 16000 and audio.shape == (n,)
    np.testing.assert_allclose(audio, soxr.resample(raw, rate, 16000, quality="HQ"), atol=1.5 / 32768)


def test_plan_shards_by_size_and_by_split():
    rows = [(ManifestRow(i, f"/x{i}.wav", f"k{i}", split="eval" if i % 3 == 0 else None), ()) for i in range(9)]
    cfg = BuildConfig(shard_bytes=3 * 10 * 100 * 128 * 2, min_shards=1)  # about three 10 s clips at one shift
    plan = plan_shards(rows, cfg, [10.0] * 9)
    assert [(stem, [r.row for r, _ in items]) for stem, _, items in plan] == [
        ("eval-000000", [0, 3]), ("eval-000001", [6]), ("train-000000", [1, 2]), ("train-000001", [4, 5]),
        ("train-000002", [7, 8]),
    ]  # fmt: skip
    by_count = plan_shards(rows, BuildConfig(shard_samples=4), None)
    assert [len(items) for _, _, items in by_count] == [3, 4, 2]
    # Large shards, but at least min_shards per split (when the split has enough rows): 6 train rows → 3 shards.
    spread = plan_shards(rows, BuildConfig(min_shards=3), [10.0] * 9)
    assert [(stem, len(items)) for stem, _, items in spread] == [
        ("eval-000000", 1), ("eval-000001", 1), ("eval-000002", 1),
        ("train-000000", 2), ("train-000001", 2), ("train-000002", 2),
    ]  # fmt: skip


def test_zarr_only_build_verifies(tmp_path):
    from flexast.pipeline.shard_report import verify

    manifest, _ = write_collection(tmp_path, n=3)
    report = build_shards(manifest, str(tmp_path / "z"), BuildConfig(format="zarr", shard_samples=2), workers=1,
                          progress=False)  # fmt: skip
    assert not any(name.endswith(".tar") for name in os.listdir(report.out))
    assert [(s["name"], s["zarr_group"]) for s in report.index["shards"]] == [
        ("train-000000", "store.zarr/train-000000"), ("train-000001", "store.zarr/train-000001"),
    ]  # fmt: skip
    assert all(s["bytes"] > 0 for s in report.index["shards"])
    check = verify(report.out)
    assert check.ok and check.samples == 3, check.problems


def test_segment_rows_and_jsonl_manifest(tmp_path):
    write_audio(tmp_path / "long.flac", 2.0, 16000, 500.0)
    rows = [{"path": "long.flac", "labels": ["x"], "start": 0.25, "end": 1.0},
            {"path": "long.flac", "labels": ["y"], "start": 1.0}]  # fmt: skip
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    report = build_shards(manifest, str(tmp_path / "out"), BuildConfig(), workers=1, progress=False)
    samples = all_samples(report.out, report.index)
    assert list(samples) == ["long_000000250ms", "long_000001000ms"]
    a, b = (s["json"] for s in samples.values())
    assert (a["start_s"], a["end_s"], a["duration_s"]) == (0.25, 1.0, 0.75) and a["labels"] == ["x"]
    assert (b["start_s"], b["end_s"]) == (1.0, 2.0) and b["frames"]["s10"] == num_frames(16000, 25.0, 10.0, 16000)


def test_per_shift_mean_subtraction_is_featurised_and_counted_per_shift(tmp_path):
    """With ``subtract_mean`` a frame's value depends on its shift, so frames are not shared; stats still match."""
    manifest, rows = write_collection(tmp_path, n=3)
    cfg = BuildConfig(name="t", shifts_ms=(10.0, 25.0), shard_samples=3, features={"subtract_mean": True})
    report = build_shards(manifest, str(tmp_path / "out"), cfg, workers=1, progress=False)
    samples = all_samples(report.out, report.index)
    for name in ("s10", "s25"):
        allv = np.concatenate([samples[r["key"]][name].astype(np.float64) for r in rows])  # (ΣT, F)
        st = report.index["stats"][name]
        assert st["count"] == allv.size and st["mean"] == pytest.approx(allv.mean(), rel=1e-12, abs=1e-12)
        assert st["std"] == pytest.approx(allv.std(), rel=1e-9)
        for r in rows:  # every clip's mel bins are centred at this shift (to float16 rounding)
            assert np.abs(samples[r["key"]][name].astype(np.float64).mean(axis=0)).max() < 2e-3


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_write_behind_keeps_order_and_raises_the_first_failure(depth):
    done = []

    def step(i):
        if i == 5:
            raise OSError(f"disk full at {i}")
        done.append(i)

    behind = WriteBehind(depth)
    with pytest.raises(OSError, match="disk full at 5"):
        for i in range(10):
            behind.submit(step, i)
        behind.drain()
    behind.close()
    assert done[:5] == [0, 1, 2, 3, 4] and 5 not in done
    assert len(done) <= 5 + depth  # at most `depth` later calls ran before the failure surfaced
