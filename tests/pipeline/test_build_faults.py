"""Issue 12, build side: bad inputs and faults that used to pass silently. Each test builds the bad input, runs
the real ``pipeline`` command, and checks the exit status, that the message names the offender, and that
nothing good was lost (``written + rejected == read``, the user's files untouched)."""

from __future__ import annotations

import json
import os
import tarfile

from flexast.pipeline import cli
from tests.factories import write_audio, write_manifest


def run(capsys, *args) -> tuple[int, str, str]:
    """``pipeline ARGS`` in this process: ``(exit status, stdout, stderr)``."""
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def build(capsys, manifest, out, *extra) -> tuple[int, str, str]:
    return run(capsys, "build-shards", manifest, "--out", out, "--workers", "1", "--quiet", *extra)


def index_of(out) -> dict:
    with open(os.path.join(out, "index.json")) as f:
        return json.load(f)


def rejected_of(out) -> list[dict]:
    with open(os.path.join(out, "rejected.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def sample_meta(out) -> dict[str, dict]:
    """``{key: json member}`` of every tar sample, read with plain tarfile."""
    metas = {}
    for shard in index_of(out)["shards"]:
        with tarfile.open(os.path.join(out, shard["name"])) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    metas[meta["key"]] = meta
    return metas


def accounted(out) -> dict:
    index = index_of(out)
    assert index["written"] + index["rejected"] == index["read"], index
    assert len(rejected_of(out)) == index["rejected"]
    return index


def clips(root, names_labels: list[tuple[str, str]], seconds=0.3) -> list[dict]:
    rows = []
    for i, (rel, label) in enumerate(names_labels):
        write_audio(os.path.join(str(root), rel), seconds, freq=300.0 + 40 * i, seed=i)
        rows.append({"path": rel, "label": label})
    return rows


# --- item 1 (build side): a held-out build numbers labels as the training build does --------------------------


def test_labels_from_an_earlier_build(tmp_path, capsys):
    train = clips(tmp_path, [(f"tr/{c}{i}.wav", c) for c in "abc" for i in range(2)])
    code, _, err = build(capsys, write_manifest(tmp_path / "train.csv", train), tmp_path / "train")
    assert code == 0, err
    # the held-out set lacks class "a" (its own sorted labels would renumber b and c) and has one unseen label
    held = clips(tmp_path, [("ev/b.wav", "b"), ("ev/c.wav", "c"), ("ev/z.wav", "zzz")])
    code, _, err = build(capsys, write_manifest(tmp_path / "eval.csv", held), tmp_path / "eval", "--labels",
                         tmp_path / "train")  # fmt: skip
    assert code == 0, err
    index = accounted(tmp_path / "eval")
    assert index["labels"]["names"] == index_of(tmp_path / "train")["labels"]["names"] == ["a", "b", "c"]
    metas = sample_meta(tmp_path / "eval")
    assert {m["labels"][0]: m["label_ids"] for m in metas.values()} == {"b": [1], "c": [2]}
    (bad,) = rejected_of(tmp_path / "eval")
    assert bad["reason"] == "unknown_label" and "zzz" in bad["detail"] and bad["key"] == "ev_z"
    # a folder that is not a finished build is refused, naming it
    os.makedirs(tmp_path / "not_a_build")
    code, _, err = build(capsys, tmp_path / "eval.csv", tmp_path / "eval2", "--labels", tmp_path / "not_a_build")
    assert code == 2 and str(tmp_path / "not_a_build") in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "eval2")


# --- item 7: distinct paths get distinct keys --------------------------------------------------------------------


def test_keys_keep_distinct_paths_distinct(tmp_path, capsys):
    names = ["clip.ogg", "clip.flac", "clip.mp3", "sub_x.wav", "sub/x.wav", "a/with space é ü 日本.wav", "plain.wav"]
    rows = clips(tmp_path, [(n, "a") for n in names])
    rows.append(dict(rows[-1]))  # the same file twice is a real duplicate
    code, _, err = build(capsys, write_manifest(tmp_path / "m.csv", rows), tmp_path / "out")
    assert code == 0, err
    index = accounted(tmp_path / "out")
    assert (index["read"], index["written"], index["rejected"]) == (8, 7, 1)
    by_source = {os.path.relpath(m["source"], tmp_path): key for key, m in sample_meta(tmp_path / "out").items()}
    assert by_source == {
        "clip.ogg": "clip_ogg",  # the extension is kept where the stems collide
        "clip.flac": "clip_flac",
        "clip.mp3": "clip_mp3",
        "sub_x.wav": "sub_5f_x_2e_wav",  # the extension does not separate these: every character is escaped
        "sub/x.wav": "sub_2f_x_2e_wav",
        "a/with space é ü 日本.wav": "a_with_space_u00e9_u00fc_u65e5u672c",  # escaped, not dropped
        "plain.wav": "plain",  # no collision: the readable key
    }
    (dup,) = rejected_of(tmp_path / "out")
    assert dup["reason"] == "duplicate_key" and dup["key"] == "plain" and dup["row"] == 7 and "row 6" in dup["detail"]


# --- item 6: rows without a label -------------------------------------------------------------------------------


def test_rows_without_a_label(tmp_path, capsys):
    rows = clips(tmp_path, [("a0.wav", "a"), ("b0.wav", "b"), ("blank.wav", ""), ("a1.wav", "a")])
    code, _, err = build(capsys, write_manifest(tmp_path / "m.csv", rows), tmp_path / "out")
    assert code == 0, err
    index = accounted(tmp_path / "out")
    assert (index["written"], index["rejected"], index["labels"]["kind"]) == (3, 1, "single")
    (bad,) = rejected_of(tmp_path / "out")
    assert bad["reason"] == "no_label" and bad["key"] == "blank" and bad["source"] == str(tmp_path / "blank.wav")
    assert all(m["label_ids"] for m in sample_meta(tmp_path / "out").values())

    # no label column at all, with a vocabulary: every row is refused, by name, and the exit status says so
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    unlabelled = write_manifest(tmp_path / "u.csv", [{"path": r["path"]} for r in rows])
    code, _, err = build(capsys, unlabelled, tmp_path / "v", "--labels", tmp_path / "vocab.txt")
    assert code == 1 and "nothing was written" in err
    assert accounted(tmp_path / "v")["rejected"] == 4
    assert [(r["reason"], r["key"]) for r in rejected_of(tmp_path / "v")] == [
        ("no_label", "a0"), ("no_label", "b0"), ("no_label", "blank"), ("no_label", "a1"),
    ]  # fmt: skip

    # no label column and no vocabulary: an unlabelled collection, written whole, and the index says so
    code, _, err = build(capsys, unlabelled, tmp_path / "u")
    assert code == 0, err
    index = accounted(tmp_path / "u")
    assert (index["written"], index["labels"]["kind"], index["labels"]["names"]) == (4, "unlabelled", [])
    assert all(m["labels"] == [] for m in sample_meta(tmp_path / "u").values())


# --- item 3: one loud sample, and NaN written into a shard ---------------------------------------------------------


def strict_json(text: str):
    """``json.loads`` that refuses the bare ``NaN``/``Infinity`` Python's json writes by default."""

    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_features_are_rejected_and_verified(tmp_path, capsys):
    import numpy as np
    import soundfile as sf
    import zarr

    from tests.factories import tone_array

    rows = clips(tmp_path, [(f"ok{i}.wav", "a") for i in range(3)])
    loud = tone_array(0.4)
    loud[100] = 1e30  # finite, so it passes the nonfinite sample check, but its power spectrum overflows
    sf.write(tmp_path / "loud.wav", loud, 16000, subtype="FLOAT")
    rows.insert(1, {"path": "loud.wav", "label": "a"})
    out = tmp_path / "out"
    code, _, err = build(capsys, write_manifest(tmp_path / "m.csv", rows), out, "--format", "both",
                         "--shifts", "10,20")  # fmt: skip
    assert code == 0, err
    index = strict_json((out / "index.json").read_text())  # no bare NaN anywhere
    assert (index["read"], index["written"], index["rejected"]) == (4, 3, 1)
    (bad,) = rejected_of(out)
    assert bad["reason"] == "nonfinite_features" and bad["key"] == "loud" and "1e+30" in bad["detail"]
    assert all(np.isfinite(st["mean"]) and st["std"] > 0 for st in index["stats"].values())
    code, stdout, err = run(capsys, "verify", out)
    assert code == 0 and "OK" in stdout, err

    # NaN written into a shard behind the build's back: verify names the sample, in the tar and in Zarr
    shard = out / index["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name == "ok0.s20.npy")
    with open(shard, "r+b") as f:  # the last value of the array, in place (same size)
        f.seek(member.offset_data + member.size - 2)
        f.write(np.array([np.nan], np.float16).tobytes())
    values = zarr.open_array(str(out / index["shards"][0]["zarr_group"] / "s10" / "values"), mode="r+")
    values[0, 0] = np.inf
    code, stdout, err = run(capsys, "verify", out)
    assert code == 1 and "FAILED (3 problems)" in stdout
    problems = [line for line in err.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 3, err
    assert f"{index['shards'][0]['name']}:ok0: s20 holds 1 NaN/Inf values" in problems[0]
    assert "ok0.s20.npy fails its checksum" in problems[1]  # the member index's CRC-32 sees the change too
    assert "s10/values holds 1 NaN/Inf values (samples ['ok0'])" in problems[2]


# --- item 4: verify reports a missing or unreadable shard and goes on -----------------------------------------------


def test_verify_goes_on_past_missing_and_unreadable_shards(tmp_path, capsys):
    rows = clips(tmp_path, [(f"c{i}.wav", "ab"[i % 2]) for i in range(8)])
    out = tmp_path / "out"
    code, _, err = build(capsys, write_manifest(tmp_path / "m.csv", rows), out, "--shard-samples", "2")
    assert code == 0, err
    shards = [s["name"] for s in accounted(out)["shards"]]
    assert len(shards) == 4
    os.remove(out / shards[0])  # missing
    (out / shards[2]).write_bytes(b"\0garbage, not a tar" * 10)  # unreadable
    code, stdout, err = run(capsys, "verify", out)
    assert code == 1 and "Traceback" not in err
    problems = [line for line in err.splitlines() if line.startswith("PROBLEM")]
    assert any(shards[0] in p and "missing" in p for p in problems), err
    assert any(shards[2] in p for p in problems), err
    assert not any(shards[1] in p or shards[3] in p for p in problems), err  # the good shards were read, clean
    assert "4 shards read back: FAILED" in stdout


# --- item 5: --overwrite deletes only what the earlier build wrote --------------------------------------------------


def folder_state(folder) -> dict[str, bytes]:
    state = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, folder)] = f.read()
    return state


def test_overwrite_removes_only_the_earlier_builds_files(tmp_path, capsys):
    rows = clips(tmp_path, [(f"c{i}.wav", "ab"[i % 2]) for i in range(6)])
    manifest = write_manifest(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    os.makedirs(out)
    (out / "my_photos_backup.tar").write_bytes(b"precious")
    (out / "index.json").write_text('{"my": "own index"}')
    user_files = folder_state(out)

    # a new build never writes over a user's file of a name it uses; --overwrite never deletes one
    for extra in ([], ["--overwrite"]):
        code, _, err = build(capsys, manifest, out, "--shard-samples", "2", *extra)
        assert code == 2 and "index.json" in err and len(err.strip().splitlines()) == 1, err
        assert folder_state(out) == user_files
    os.remove(out / "index.json")
    user_files = folder_state(out)
    code, _, err = build(capsys, manifest, out, "--shard-samples", "2", "--overwrite")
    assert code == 2 and "my_photos_backup.tar" in err and folder_state(out) == user_files

    # beside the user's tar (no --overwrite): the build is written and leaves it alone
    code, _, err = build(capsys, manifest, out, "--shard-samples", "2")
    assert code == 0, err
    assert (out / "my_photos_backup.tar").read_bytes() == b"precious"
    first = accounted(out)
    # a changed config with --overwrite: refused while the user's file is there, nothing deleted
    before = folder_state(out)
    code, _, err = build(capsys, manifest, out, "--shard-samples", "3", "--overwrite")
    assert code == 2 and "my_photos_backup.tar" in err and "nothing was deleted" in err, err
    assert folder_state(out) == before
    # once it is moved away, --overwrite removes exactly the earlier build's files and writes the new build
    os.rename(out / "my_photos_backup.tar", tmp_path / "my_photos_backup.tar")
    code, _, err = build(capsys, manifest, out, "--shard-samples", "3", "--overwrite")
    assert code == 0, err
    second = accounted(out)
    assert (second["read"], second["written"]) == (6, 6) and len(second["shards"]) == 2 != len(first["shards"])
    shards = [f"train-00000{i}.tar{ext}" for i in range(2) for ext in ("", ".members.json")]  # each with its index
    assert sorted(os.listdir(out)) == sorted(["_build.json", "_parts", "rejected.jsonl", "index.json", *shards])
    # a file placed inside the build's own folders is in the way too
    (out / "_parts" / "notes.txt").write_text("mine")
    code, _, err = build(capsys, manifest, out, "--shard-samples", "2", "--overwrite")
    assert code == 2 and "_parts/notes.txt" in err
    assert (out / "_parts" / "notes.txt").read_text() == "mine" and accounted(out) == second
