"""The ``pipeline`` command: thin wrappers over library functions.

Each subcommand is a :class:`Command` registration ``(name, help, add_arguments, run)`` in
:data:`COMMANDS`; the parser is built from that list, so adding a command is adding one entry
(``register(...)``) in the module that implements it or here. ``run(args) -> int`` returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from flexast.pipeline.errors import run_command


@dataclass(frozen=True)
class Command:
    """One subcommand: ``name``, a one-line ``help``, ``add_arguments(parser)`` and ``run(args) -> exit code``."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


COMMANDS: list[Command] = []


def register(name: str, help: str, add_arguments, run, description: str = "") -> None:
    """Add a subcommand (a later registration with the same name replaces the earlier one)."""
    COMMANDS[:] = [c for c in COMMANDS if c.name != name]
    COMMANDS.append(Command(name, help, add_arguments, run, description))


def _storage_options(text: str | None) -> dict | None:
    return json.loads(text) if text else None


# --- build-shards -----------------------------------------------------------------------------------------------


def _add_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="CSV/TSV/JSONL manifest, AST data-file .json, or a folder root/<label>/*.wav")
    p.add_argument("--out", help="output folder or URL (s3://…); default shards/<name>")
    p.add_argument("--name", help="collection name (default: the manifest's file name without extension)")
    p.add_argument("--labels", help="label vocabulary: class_labels_indices.csv, one label per line, or an "
                   "earlier build's folder (e.g. shards/train: a held-out build then numbers labels as the "
                   "training build does); other labels are rejected (default: the manifest's labels)")  # fmt: skip
    p.add_argument("--split", help="split name for rows without a 'split' column (default train)")
    p.add_argument("--only-split", help="build only the manifest rows of this split")
    p.add_argument("--shifts", default="10", help="frame shifts in ms: '10', '10,20,40', '10:40:2' or 'elastic' "
                   "(ElasticAST's 16 shifts 10,12,…,40). Default 10")  # fmt: skip
    p.add_argument("--sample-rate", type=int, default=16000, help="resample every clip to this rate in Hz (16000)")
    p.add_argument("--mel-bins", type=int, default=128, help="mel bins F (128, as AST)")
    p.add_argument("--fbank-option", action="append", default=[], metavar="NAME=VALUE",
                   help="another torchaudio.compliance.kaldi.fbank option, e.g. low_freq=50 (repeatable)")  # fmt: skip
    p.add_argument("--format", choices=("wds", "zarr", "both"), default="wds",
                   help="wds: WebDataset tar shards (default); zarr: one Zarr v3 store; both")  # fmt: skip
    p.add_argument("--shard-size", default="256MB", help="target shard size, e.g. 256MB (default), 1GB")
    p.add_argument("--shard-samples", type=int, help="instead: exactly this many manifest rows per shard")
    p.add_argument("--min-shards", type=int, default=8,
                   help="make shards smaller so each split has at least this many (default 8; loaders split "
                   "shards across GPUs and data-loader workers)")  # fmt: skip
    p.add_argument("--max-seconds", type=float, help="cap clip length in seconds (ElasticAST recipes use 30)")
    p.add_argument("--long-clips", choices=("cut", "split"), default="cut",
                   help="above --max-seconds: cut (keep the start, counted) or split into segments")  # fmt: skip
    p.add_argument("--min-seconds", type=float, default=0.0, help="reject clips shorter than this (too_short)")
    p.add_argument("--keep-audio", action="store_true", help="also store the mono resampled audio as 16-bit FLAC")
    p.add_argument("--workers", type=int, help="local worker processes (default: CPU count)")
    p.add_argument("--decode-ahead", type=int, metavar="N",
                   help="clips each worker decodes ahead of the fbank, and writes behind it, on two background "
                        "threads (0: all inline; default 2, or 0 when local workers fill every core). "
                        "Speed only; the output is the same")  # fmt: skip
    p.add_argument("--dask", metavar="ADDRESS", help="run on Dask: tcp://scheduler:8786, or local:N for a LocalCluster")
    p.add_argument("--overwrite", action="store_true", help="replace an output built with a different config "
                   "(deletes only the earlier build's files; refuses if the folder holds anything else)")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="exit non-zero if any row was rejected")
    p.add_argument("--storage-options", help="fsspec options as JSON, e.g. '{\"anon\": true}'")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _fbank_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _run_build(args: argparse.Namespace) -> int:
    import os

    from flexast.pipeline.build import build_shards
    from flexast.pipeline.build_config import BuildConfig, parse_shifts, parse_size
    from flexast.pipeline.errors import ConfigError

    features = {"num_mel_bins": args.mel_bins}
    for item in args.fbank_option:
        name, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--fbank-option {item!r}: expected NAME=VALUE")
        features[name] = _fbank_value(value)
    name = args.name or os.path.splitext(os.path.basename(args.manifest.rstrip("/")))[0]
    config = BuildConfig(
        name=name, shifts_ms=parse_shifts(args.shifts), sample_rate=args.sample_rate, features=features,
        format=args.format, shard_bytes=parse_size(args.shard_size), shard_samples=args.shard_samples,
        min_shards=args.min_shards,
        max_seconds=args.max_seconds, long_clips=args.long_clips, min_seconds=args.min_seconds,
        keep_audio=args.keep_audio, split=args.split or "train",
    )  # fmt: skip
    report = build_shards(
        args.manifest, args.out, config, labels=args.labels, only_split=args.only_split, workers=args.workers,
        dask=args.dask, overwrite=args.overwrite, progress=not args.quiet,
        storage_options=_storage_options(args.storage_options), decode_ahead=args.decode_ahead,
    )  # fmt: skip
    code = report.exit_code(args.strict)
    if code:  # said even with --quiet: a failing exit status never comes without its reason
        why = "nothing was written" if report.written == 0 else f"{report.rejected} row(s) rejected and --strict"
        print(f"build-shards failed: {why}; see {report.out}/rejected.jsonl", file=sys.stderr)
    return code


# --- inspect / verify / demo-data -------------------------------------------------------------------------------


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a folder written by build-shards (local path or URL)")
    p.add_argument("--plot", metavar="PNG", help="also save a duration histogram to this PNG file")
    p.add_argument("--json", action="store_true", help="print index.json instead of the table")
    p.add_argument("--storage-options", help="fsspec options as JSON")


def _run_inspect(args: argparse.Namespace) -> int:
    from flexast.pipeline.shard_report import load_index, plot_durations, summary

    index = load_index(args.dir, _storage_options(args.storage_options))
    print(json.dumps(index, indent=1) if args.json else summary(index))
    if args.plot:
        print(f"duration histogram saved to {plot_durations(index, args.plot)}")
    return 0


def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a folder written by build-shards (local path or URL)")
    p.add_argument("--storage-options", help="fsspec options as JSON")


def _run_verify(args: argparse.Namespace) -> int:
    from flexast.pipeline.shard_report import verify

    report = verify(args.dir, _storage_options(args.storage_options))
    for problem in report.problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    status = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(f"verify {args.dir}: {report.samples} samples in {report.shards} shards read back: {status}")
    return 0 if report.ok else 1


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to write the audio files and manifests into")
    p.add_argument("--clips", type=int, default=240, help="number of clips (240: 192 train + 48 eval)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same audio)")


def _run_demo(args: argparse.Namespace) -> int:
    from flexast.pipeline.demo_sounds import CLASSES, write_demo

    manifests = write_demo(args.out, args.clips, args.seed)
    print(f"wrote {args.clips} clips of {len(CLASSES)} classes ({', '.join(CLASSES)}) to {args.out}")
    for split, path in manifests.items():
        print(f"  {split:>5}: {path}")
    print(f"next: pipeline build-shards {manifests['train']} --out shards/demo-train --shifts 10,20,40")
    return 0


register("build-shards", "turn audio + a manifest into feature shards (WebDataset tars and/or Zarr)",
         _add_build, _run_build,
         "Decode every clip of a manifest (soundfile), mix to mono, resample (soxr), compute Kaldi/AST log-mel\n"
         "fbanks at one or more frame shifts and write them as shards with index.json and rejected.jsonl.\n"
         "Rerunning the same command after a crash resumes where it stopped. See docs/build-shards.md.\n\n"
         "examples:\n"
         "  pipeline build-shards data/demo/train.csv --out shards/demo-train --shifts 10,20,40\n"
         "  pipeline build-shards audioset/train.json --labels class_labels_indices.csv --shifts elastic \\\n"
         "      --max-seconds 10 --out s3://bucket/audioset --dask tcp://scheduler:8786")  # fmt: skip
register("inspect", "summarise a shard folder (samples, hours, labels, frames, mean/std)", _add_inspect, _run_inspect)
register("verify", "read every sample of a shard folder back and check it against index.json", _add_verify,
         _run_verify, "Exits with status 1, naming the shard, if anything is missing, truncated or wrong.")  # fmt: skip
register("demo-data", "generate the small built-in demo audio collection (8 classes, 0.5-8 s clips)", _add_demo,
         _run_demo)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: ``pipeline COMMAND ...``; typed flexast errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    return run_command(args._run, args)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one subparser per registered :class:`Command`."""
    parser = argparse.ArgumentParser(
        prog="pipeline", description="flexast data pipeline: audio → feature shards, and tools to check them."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.description or cmd.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


if __name__ == "__main__":
    sys.exit(main())
