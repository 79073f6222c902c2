"""What a build owns in its output folder, so that ``--overwrite`` deletes only that and never a user's file.

A build writes, in ``out``: ``_build.json`` (first), ``_parts/<stem>.json``, one ``<stem>.tar`` per shard
and/or ``store.zarr/<stem>``, ``rejected.jsonl`` and ``index.json`` (last), and temporary files named
``.<name>.tmp-<pid>`` beside each of them. The shard stems an earlier build wrote are the ones its
``_build.json`` planned, its ``index.json`` lists, and its ``_parts`` records name. Nothing else in the folder
belongs to it: ``--overwrite`` refuses while anything else is there, and names it; a new build refuses to
write over a file of the same name that no build wrote.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from flexast.pipeline.errors import ConfigError
from flexast.pipeline.shards import filesystem, join, read_bytes
from flexast.pipeline.tar_index import MEMBERS_SUFFIX

BUILD_FILES = ("_build.json", "_parts", "store.zarr", "rejected.jsonl", "index.json")
"""Top-level names every build writes (besides its shards)."""

_TEMP = re.compile(r"\.(.+)\.tmp-\d+")
SHOWN = 10  # entries named in a refusal before "… and N more"


@dataclass
class EarlierBuild:
    """A build found in an output folder: its config hash and the shard stems it planned or wrote."""

    config_hash: str
    stems: set[str] = field(default_factory=set)
    index_is_ours: bool = False  # index.json is a build-shards index (else a user's file of that name, or none)


def _names(url: str, storage_options: dict | None) -> list[str]:
    """Entry names directly under ``url`` ([] when it does not exist)."""
    fs, path = filesystem(url, storage_options)
    if not fs.isdir(path):
        return []
    return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))


def _json(url: str, storage_options: dict | None):
    data = read_bytes(url, storage_options)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def earlier_build(out: str, storage_options: dict | None = None) -> EarlierBuild | None:
    """The build ``out`` holds (finished or not), from its ``_build.json`` or ``index.json``; None if none."""
    meta = _json(join(out, "_build.json"), storage_options)
    index = _json(join(out, "index.json"), storage_options)
    meta = meta if isinstance(meta, dict) and "config_hash" in meta else None
    ours = isinstance(index, dict) and {"config_hash", "shards", "format_version"} <= set(index)
    if meta is None and not ours:
        return None
    found = EarlierBuild(meta["config_hash"] if meta else index["config_hash"], index_is_ours=ours)
    found.stems |= set(meta.get("shards", [])) if meta else set()
    if ours:
        for shard in index["shards"]:
            found.stems.add(shard["name"].removesuffix(".tar"))
            if shard.get("zarr_group"):
                found.stems.add(shard["zarr_group"].rsplit("/", 1)[-1])
    found.stems |= {n.removesuffix(".json") for n in _names(join(out, "_parts"), storage_options)
                    if n.endswith(".json") and not n.startswith(".")}  # fmt: skip
    return found


def _owned(name: str, allowed: set[str]) -> bool:
    temp = _TEMP.fullmatch(name)
    return name in allowed or (temp is not None and temp.group(1) in allowed)


def foreign_entries(out: str, build: EarlierBuild, storage_options: dict | None = None) -> list[str]:
    """Entries of ``out`` (and of its ``_parts`` and ``store.zarr``) that ``build`` did not write."""
    top = set(BUILD_FILES) - ({"index.json"} if not build.index_is_ours else set())
    top |= {f"{stem}.tar" for stem in build.stems} | {f"{stem}.tar{MEMBERS_SUFFIX}" for stem in build.stems}
    foreign = [n for n in _names(out, storage_options) if not _owned(n, top)]
    inside = {"_parts": {f"{stem}.json" for stem in build.stems}, "store.zarr": {"zarr.json"} | build.stems}
    for sub, allowed in inside.items():
        foreign += [f"{sub}/{n}" for n in _names(join(out, sub), storage_options) if not _owned(n, allowed)]
    return foreign


def _listed(entries: list[str]) -> str:
    more = f" … and {len(entries) - SHOWN} more" if len(entries) > SHOWN else ""
    return ", ".join(entries[:SHOWN]) + more


def remove_earlier_build(out: str, build: EarlierBuild, storage_options: dict | None = None) -> None:
    """Delete what ``build`` wrote in ``out``, after checking that nothing else is there.

    Raises:
        ConfigError: naming every entry in the way; nothing is deleted then.
    """
    foreign = foreign_entries(out, build, storage_options)
    if foreign:
        raise ConfigError(
            f"--overwrite refused: {out} also holds what the earlier build did not write: {_listed(foreign)}; "
            "move it away or choose another --out (nothing was deleted)"
        )
    fs, path = filesystem(out, storage_options)
    for name in _names(out, storage_options):
        fs.rm(f"{path.rstrip('/')}/{name}", recursive=True)


def check_fresh_output(out: str, stems: list[str], overwrite: bool, storage_options: dict | None = None) -> None:
    """Refuse a new build into ``out`` (which holds no build) where it would write over someone else's file.

    Without ``overwrite`` only names the build writes are in the way (``index.json``, a ``<stem>.tar`` …); other
    files are left alone beside the shards. With ``overwrite`` anything in the folder is: there is no earlier
    build whose files could be replaced, and nothing else is ever deleted.

    Raises:
        ConfigError: naming every entry in the way.
    """
    present = _names(out, storage_options)
    if overwrite and present:
        raise ConfigError(
            f"--overwrite refused: {out} holds no earlier build, only files build-shards did not write: "
            f"{_listed(present)}; move them away or choose another --out (nothing was deleted)"
        )
    ours = set(BUILD_FILES) | {f"{stem}.tar" for stem in stems} | {f"{stem}.tar{MEMBERS_SUFFIX}" for stem in stems}
    clash = [n for n in present if n in ours]
    if clash:
        raise ConfigError(
            f"{out} holds files that no build wrote, which this build would overwrite: {_listed(clash)}; "
            "move them away or choose another --out"
        )
