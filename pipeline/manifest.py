"""Manifests: the list of audio inputs a build reads, as dataclasses with units in their names.

Supported inputs (format picked from the path):
    * ``*.csv`` / ``*.tsv`` with a header: ``path``, ``label`` or ``labels`` (comma-separated), optional
      ``key``, ``split``, ``start`` and ``end`` (seconds, for segments of a longer file);
    * ``*.jsonl``: one object per line with the same fields;
    * ``*.json``: the AST data file ``{"data": [{"wav": ..., "labels": "mid1,mid2"}]}``, with the
      ``class_labels_indices.csv`` (``index,mid,display_name``) found beside it or given explicitly;
    * a folder tree ``root/<label>/*.{wav,flac,ogg,mp3}``.

Relative paths resolve against the manifest's folder; absolute paths and fsspec URLs (``s3://``,
``http(s)://``) are kept as they are. A row whose own fields are unusable (a bad number, an empty path)
does not stop the build: it is kept in ``Manifest.invalid`` and ends up in ``rejected.jsonl``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import posixpath
import re
import warnings
from dataclasses import dataclass, field

import fsspec

from flexast.pipeline.errors import ManifestError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class ManifestRow:
    """One input of a build.

    Attributes:
        row: 0-based position in the manifest (the row number ``rejected.jsonl`` reports).
        source: resolved local path or fsspec URL of the audio file.
        key: sample key; no dots and no slashes (WebDataset splits member names at the first dot).
        labels: label names (vocabulary entries, e.g. AudioSet mids), possibly empty.
        split: split name from the manifest, or None.
        start_s: start of the segment in seconds, or None for the file start.
        end_s: end of the segment in seconds, or None for the file end.
    """

    row: int
    source: str
    key: str
    labels: tuple[str, ...] = ()
    split: str | None = None
    start_s: float | None = None
    end_s: float | None = None


@dataclass(frozen=True)
class InvalidRow:
    """A manifest row that could not be turned into a :class:`ManifestRow` (reason tag ``bad_row``)."""

    row: int
    source: str
    key: str
    detail: str


@dataclass
class Vocabulary:
    """Label vocabulary in index order, with human-readable names (``display_names[i]`` names ``names[i]``)."""

    names: list[str]
    display_names: list[str]

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


@dataclass
class Manifest:
    """Rows of a manifest, the rows that could not be parsed, and the vocabulary if the manifest fixes one."""

    path: str
    rows: list[ManifestRow]
    invalid: list[InvalidRow] = field(default_factory=list)
    vocabulary: Vocabulary | None = None

    @property
    def n_rows(self) -> int:
        return len(self.rows) + len(self.invalid)


def is_url(path: str) -> bool:
    """True for fsspec URLs such as ``s3://b/k`` or ``https://h/p`` (not for ``file://`` or plain paths)."""
    return "://" in path and not path.startswith("file://")


def resolve(path: str, base: str) -> str:
    """``path`` as written in a manifest, resolved against the manifest folder ``base`` unless absolute or a URL."""
    if is_url(path) or path.startswith("/") or path.startswith("file://"):
        return path
    if is_url(base):
        return base.rstrip("/") + "/" + path
    return posixpath.normpath(posixpath.join(base, path))


def key_from_path(path: str, level: int = 0) -> str:
    """A sample key from a path as the manifest writes it, at one of three levels of detail.

    0: the path without its extension, readable (``a/b c.wav`` → ``a_b_c``); 1: the same with the extension
    (``clip.ogg`` → ``clip_ogg``); 2: every character outside ``[A-Za-z0-9-]`` escaped as ``_<hex>_``
    (``sub_x.wav`` → ``sub_5f_x_2e_wav``, ``sub/x.wav`` → ``sub_2f_x_2e_wav``), which never maps two paths to
    one key. Non-ASCII characters are escaped (``é`` → ``u00e9``), never dropped. A manifest uses level 0 and
    goes up only for rows whose keys would collide (:func:`distinct_keys`).
    """
    if level >= 2:
        return "".join(c if c.isascii() and (c.isalnum() or c == "-") else f"_{ord(c):x}_" for c in path)
    if level == 0 and "." in posixpath.basename(path):
        path = path.rsplit(".", 1)[0]
    return sanitize_key(path)


def sanitize_key(key: str) -> str:
    """Key with non-ASCII characters escaped (``é`` → ``u00e9``) and every other run of characters outside
    ``[A-Za-z0-9_-]`` (dots, slashes, spaces) replaced by ``_``."""
    escaped = "".join(c if c.isascii() else f"u{ord(c):04x}" for c in key)
    return _KEY_UNSAFE.sub("_", escaped).strip("_") or "_"


def distinct_keys(rows: list[ManifestRow], derived: dict[int, tuple[str, str]]) -> list[ManifestRow]:
    """``rows`` with derived keys made distinct wherever distinct inputs shared one.

    ``derived`` maps a row's position in ``rows`` to ``(path as written, key suffix)`` for rows whose key comes
    from their path (not from a ``key`` column). Rows that share a key but read different audio (another
    source, start or end) go up one level of :func:`key_from_path` until nothing collides; the same audio
    twice keeps its key and is rejected later as ``duplicate_key``, as is a clash between two ``key`` columns.
    """
    level = dict.fromkeys(derived, 0)
    keys = [r.key for r in rows]
    while True:
        inputs: dict[str, set] = {}
        for r, key in zip(rows, keys, strict=True):
            inputs.setdefault(key, set()).add((r.source, r.start_s, r.end_s))
        bump = [i for i in derived if len(inputs[keys[i]]) > 1 and level[i] < 2]
        if not bump:
            break
        for i in bump:
            level[i] += 1
            path, suffix = derived[i]
            keys[i] = key_from_path(path, level[i]) + suffix
    return [r if r.key == k else dataclasses.replace(r, key=k) for r, k in zip(rows, keys, strict=True)]


def split_labels(value) -> tuple[str, ...]:
    """Labels from a comma-separated string or a list; blanks dropped, order kept."""
    if value is None:
        return ()
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(s.strip() for s in (str(x) for x in items) if s.strip())


def read_vocabulary(path: str, storage_options: dict | None = None) -> Vocabulary:
    """Read ``class_labels_indices.csv`` (``index,mid,display_name``), a text file of one label per line, or
    the vocabulary of an earlier build: its folder or its ``index.json`` (so a held-out build numbers labels
    as the training build does).

    Raises:
        ManifestError: the file is missing, a CSV lacks its columns, or a build folder has no labelled index.
    """
    fs, _, (local,) = fsspec.get_fs_token_paths(path, storage_options=storage_options or {})
    if path.rstrip("/").endswith("index.json") or fs.isdir(local):
        return _build_vocabulary(path, storage_options)
    try:
        with fsspec.open(path, "r", encoding="utf-8", **(storage_options or {})) as f:
            text = f.read()
    except FileNotFoundError as exc:
        raise ManifestError(f"label file not found: {path}") from exc
    if path.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        fields = set(reader.fieldnames or ())
        if not {"mid", "display_name"} <= fields:
            raise ManifestError(f"{path}: a label file needs columns index,mid,display_name; found {sorted(fields)}")
        rows = list(reader)
        if "index" in fields:
            rows.sort(key=lambda r: int(r["index"]))
        return Vocabulary([r["mid"] for r in rows], [r["display_name"] for r in rows])
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return Vocabulary(names, list(names))


def _build_vocabulary(path: str, storage_options: dict | None) -> Vocabulary:
    """The ``labels`` of a finished build's ``index.json`` (``path`` is the folder or the file)."""
    index_path = path if path.rstrip("/").endswith("index.json") else path.rstrip("/") + "/index.json"
    try:
        with fsspec.open(index_path, "r", encoding="utf-8", **(storage_options or {})) as f:
            labels = json.load(f)["labels"]
        names, display = list(labels["names"]), list(labels["display_names"])
    except FileNotFoundError as exc:
        raise ManifestError(f"--labels {path}: no {index_path} (not a finished build-shards folder)") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ManifestError(f"--labels {path}: {index_path} is not a build-shards index ({exc!r})") from exc
    if not names:
        raise ManifestError(f"--labels {path}: that build is unlabelled (no label names in {index_path})")
    return Vocabulary(names, display)


def _number(value, name: str) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return float(value)
    except ValueError as exc:
        raise ManifestError(f"{name}={value!r} is not a number of seconds") from exc


def _row_from_record(i: int, rec: dict, base: str, path_field: str = "path") -> ManifestRow | InvalidRow:
    raw_path = str(rec.get(path_field) or "").strip()
    key_raw = str(rec.get("key") or "").strip()
    key = sanitize_key(key_raw) if key_raw else (key_from_path(raw_path) if raw_path else f"row{i}")
    if not raw_path:
        return InvalidRow(i, "", key, f"row {i} has no {path_field!r}")
    source = resolve(raw_path, base)
    try:
        start_s = _number(rec.get("start"), "start")
        end_s = _number(rec.get("end"), "end")
    except ManifestError as exc:
        return InvalidRow(i, source, key, str(exc))
    if (start_s is not None and start_s < 0) or (end_s is not None and end_s <= (start_s or 0.0)):
        return InvalidRow(i, source, key, f"bad segment start={start_s} end={end_s}")
    if not key_raw and start_s is not None:
        key = f"{key}_{round(start_s * 1000):09d}ms"
    labels = split_labels(rec.get("labels", rec.get("label")))
    split = str(rec["split"]).strip() if rec.get("split") not in (None, "") else None
    return ManifestRow(i, source, key, labels, split, start_s, end_s)


def _collect(path: str, records: list[dict], path_field: str = "path") -> Manifest:
    base = posixpath.dirname(path) if is_url(path) else posixpath.dirname(posixpath.abspath(path))
    rows, invalid, derived = [], [], {}
    for i, rec in enumerate(records):
        item = _row_from_record(i, rec, base, path_field)
        if isinstance(item, InvalidRow):
            invalid.append(item)
            continue
        if not str(rec.get("key") or "").strip():
            suffix = "" if item.start_s is None else f"_{round(item.start_s * 1000):09d}ms"
            derived[len(rows)] = (str(rec.get(path_field)).strip(), suffix)
        rows.append(item)
    return Manifest(path, distinct_keys(rows, derived), invalid)


def _read_text(path: str, storage_options: dict | None) -> str:
    try:
        with fsspec.open(path, "r", encoding="utf-8", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest not found: {path}") from exc


def read_delimited(path: str, storage_options: dict | None = None) -> Manifest:
    """CSV (comma) or TSV (tab) manifest with a header row."""
    text = _read_text(path, storage_options)
    delimiter = "\t" if path.endswith(".tsv") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    fields = set(reader.fieldnames or ())
    if "path" not in fields:
        raise ManifestError(f"{path}: the header needs a 'path' column; found {sorted(fields)}")
    _warn_ignored_columns(path, fields)
    return _collect(path, list(reader))


MANIFEST_COLUMNS = ("path", "label", "labels", "key", "split", "start", "end")


def _warn_ignored_columns(path: str, fields: set[str]) -> None:
    """Name header columns the reader does not use (a typo such as ``lbl`` would otherwise give unlabelled rows)."""
    ignored = sorted(fields - set(MANIFEST_COLUMNS))
    if ignored:
        no_labels = "" if fields & {"label", "labels"} else "; rows will have no labels"
        warnings.warn(f"{path}: ignoring columns {ignored} (known: {list(MANIFEST_COLUMNS)}){no_labels}", stacklevel=3)


def read_jsonl(path: str, storage_options: dict | None = None) -> Manifest:
    """JSON-lines manifest: one object per line with ``path``, ``label(s)``, optional ``key/split/start/end``."""
    records = []
    for n, line in enumerate(_read_text(path, storage_options).splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: line {n + 1} is not JSON ({exc.msg})") from exc
    return _collect(path, records)


def read_ast_json(path: str, labels_csv: str | None = None, storage_options: dict | None = None) -> Manifest:
    """AST data file ``{"data": [{"wav", "labels"}]}`` plus its ``class_labels_indices.csv``."""
    try:
        data = json.loads(_read_text(path, storage_options))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: not an AST data file with a top-level 'data' list ({exc})") from exc
    manifest = _collect(path, list(data), path_field="wav")
    if labels_csv is None:
        labels_csv = posixpath.join(posixpath.dirname(path), "class_labels_indices.csv")
    manifest.vocabulary = read_vocabulary(labels_csv, storage_options)
    return manifest


def read_folder(root: str, storage_options: dict | None = None) -> Manifest:
    """Folder tree ``root/<label>/<file>``: one row per audio file, label = the sub-folder name, sorted order."""
    fs, _, (base,) = fsspec.get_fs_token_paths(root, storage_options=storage_options or {})
    base = base.rstrip("/")
    found = sorted(p for p in fs.find(base) if p.lower().endswith(AUDIO_EXTENSIONS))
    records = []
    for p in found:
        rel = p[len(base) + 1 :]
        parts = rel.split("/")
        label = parts[0] if len(parts) > 1 else ""
        records.append({"path": rel, "label": label})
    folder_as_manifest = posixpath.join(root.rstrip("/"), "_")  # resolve() bases on the folder itself
    return _collect(folder_as_manifest if is_url(root) else posixpath.join(posixpath.abspath(root), "_"), records)


def read_manifest(path: str, labels: str | None = None, storage_options: dict | None = None) -> Manifest:
    """Read any supported manifest; ``labels`` is an optional vocabulary file that fixes label order.

    Raises:
        ManifestError: unknown format, missing required column, or unparseable file.
    """
    storage_options = storage_options or {}
    lower = path.lower().rstrip("/")
    if lower.endswith((".csv", ".tsv")):
        manifest = read_delimited(path, storage_options)
    elif lower.endswith(".jsonl"):
        manifest = read_jsonl(path, storage_options)
    elif lower.endswith(".json"):
        manifest = read_ast_json(path, labels, storage_options)
        labels = None
    else:
        fs, _, (p,) = fsspec.get_fs_token_paths(path, storage_options=storage_options)
        if not fs.isdir(p):
            raise ManifestError(f"{path}: not a .csv/.tsv/.jsonl/.json manifest nor a folder")
        manifest = read_folder(path, storage_options)
        manifest.path = path
    if labels is not None:
        manifest.vocabulary = read_vocabulary(labels, storage_options)
    return manifest
