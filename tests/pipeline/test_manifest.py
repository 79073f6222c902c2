"""Manifest readers: every input format gives the same rows; relative paths resolve against the manifest."""

from __future__ import annotations

import json
import os

import pytest

from flexast.pipeline.errors import ManifestError
from flexast.pipeline.manifest import key_from_path, read_manifest, resolve, sanitize_key
from tests.factories import write_manifest

ROWS = [
    {"path": "audio/dog/a.wav", "labels": "dog,animal", "key": "k1", "split": "train"},
    {"path": "audio/cat/b.v2.flac", "labels": "cat", "split": "eval"},
    {"path": "/abs/c.ogg", "labels": "", "start": "1.5", "end": "3"},
    {"path": "s3://bucket/d.mp3", "labels": "dog"},
]


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl"])
def test_delimited_and_jsonl_give_same_rows(tmp_path, ext):
    path = write_manifest(tmp_path / f"m.{ext}", ROWS)
    m = read_manifest(path)
    assert m.n_rows == 4 and not m.invalid
    a, b, c, d = m.rows
    assert a.source == str(tmp_path / "audio/dog/a.wav") and a.key == "k1" and a.labels == ("dog", "animal")
    assert a.split == "train" and a.start_s is None
    assert b.key == "audio_cat_b_v2" and b.labels == ("cat",) and b.split == "eval"
    assert c.source == "/abs/c.ogg" and c.labels == () and (c.start_s, c.end_s) == (1.5, 3.0)
    assert c.key == "abs_c_000001500ms"  # segments of one file get distinct default keys
    assert d.source == "s3://bucket/d.mp3" and d.key == "s3_bucket_d"
    assert [r.row for r in m.rows] == [0, 1, 2, 3]


def test_single_label_column_and_bad_rows_are_kept_as_invalid(tmp_path):
    path = write_manifest(
        tmp_path / "m.csv",
        [
            {"path": "x.wav", "label": "a", "start": ""},
            {"path": "", "label": "a", "start": ""},
            {"path": "y.wav", "label": "a", "start": "abc"},
            {"path": "z.wav", "label": "a", "start": "2"},
        ],
    )
    m = read_manifest(path)
    assert [r.key for r in m.rows] == ["x", "z_000002000ms"]
    assert [bad.row for bad in m.invalid] == [1, 2]
    assert "'abc'" in m.invalid[1].detail
    assert m.n_rows == 4


def test_missing_path_column_is_a_manifest_error(tmp_path):
    path = write_manifest(tmp_path / "m.csv", [{"file": "x.wav", "label": "a"}])
    with pytest.raises(ManifestError, match="'path'"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "nope.csv"))


def test_unknown_columns_are_named_in_a_warning(tmp_path):
    typo = write_manifest(tmp_path / "typo.csv", [{"path": "x.wav", "lbl": "a"}])
    with pytest.warns(UserWarning, match=r"ignoring columns \['lbl'\].*rows will have no labels"):
        manifest = read_manifest(typo)
    assert manifest.rows[0].labels == ()
    extra = write_manifest(tmp_path / "extra.csv", [{"path": "x.wav", "label": "a", "speaker": "id1"}])
    with pytest.warns(UserWarning, match=r"ignoring columns \['speaker'\]") as record:
        read_manifest(extra)
    assert "no labels" not in str(record[0].message)


def test_ast_data_file_with_class_labels_indices(tmp_path):
    (tmp_path / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n1,/m/dog,"Dog"\n0,/m/speech,"Speech"\n2,/m/cat,"Cat, domestic"\n'
    )
    data = {"data": [{"wav": "wav/x.flac", "labels": "/m/dog,/m/cat"}, {"wav": "/d/y.wav", "labels": "/m/speech"}]}
    (tmp_path / "train_data.json").write_text(json.dumps(data))
    m = read_manifest(str(tmp_path / "train_data.json"))
    assert m.vocabulary.names == ["/m/speech", "/m/dog", "/m/cat"]  # sorted by index column
    assert m.vocabulary.display_names == ["Speech", "Dog", "Cat, domestic"]
    assert m.rows[0].source == str(tmp_path / "wav/x.flac") and m.rows[0].labels == ("/m/dog", "/m/cat")
    assert m.rows[1].key == "d_y"


def test_folder_tree(tmp_path):
    for rel in ["dog/1.wav", "dog/2.flac", "cat/3.mp3", "cat/notes.txt", "bird/sub/4.ogg"]:
        os.makedirs(os.path.dirname(tmp_path / rel), exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    m = read_manifest(str(tmp_path))
    assert [(r.labels, r.source) for r in m.rows] == [
        (("bird",), str(tmp_path / "bird/sub/4.ogg")),
        (("cat",), str(tmp_path / "cat/3.mp3")),
        (("dog",), str(tmp_path / "dog/1.wav")),
        (("dog",), str(tmp_path / "dog/2.flac")),
    ]
    assert [r.key for r in m.rows] == ["bird_sub_4", "cat_3", "dog_1", "dog_2"]


def test_vocabulary_file_fixes_label_order(tmp_path):
    (tmp_path / "labels.txt").write_text("b\na\n")
    path = write_manifest(tmp_path / "m.csv", [{"path": "x.wav", "label": "a"}])
    m = read_manifest(path, labels=str(tmp_path / "labels.txt"))
    assert m.vocabulary.names == ["b", "a"]


def test_path_helpers():
    assert resolve("a/b.wav", "/data") == "/data/a/b.wav"
    assert resolve("../b.wav", "/data/x") == "/data/b.wav"
    assert resolve("a.wav", "s3://bkt/dir") == "s3://bkt/dir/a.wav"
    assert resolve("https://h/a.wav", "/data") == "https://h/a.wav"
    assert key_from_path("x/y.z/clip.01.wav") == "x_y_z_clip_01"
    assert sanitize_key("a b/c.d") == "a_b_c_d"
