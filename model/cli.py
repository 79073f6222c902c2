"""The ``model`` command: thin wrappers over :mod:`model.train`, :mod:`model.evaluate`, :mod:`model.predict`
and :mod:`model.demo`.

    model train   --config configs/X.yaml [--set key=value ...] [--resume]
    model eval    --checkpoint RUN/final [--checkpoint RUN2/final ...] --data SHARDS [--patches 8,16,32] ...
    model predict --checkpoint RUN/final FILE [FILE ...] [--patch 16] [--shift 10] [--json] [--embeddings e.npy]
    model demo    [--out DIR]
    model export  --checkpoint RUN/final --to hf|onnx --out DIR [--patch P]
    model import  --from hf|official|timm SRC --out RUN/init [--labels FILE]
    model ls                                    list the built-in recipes (``--config NAME`` finds them)
    model cp NAME DEST [--force]                copy a built-in recipe out for editing
"""

from __future__ import annotations

import argparse
import json
import sys


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()] if text else []


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def _patch(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def cmd_train(args: argparse.Namespace) -> int:
    from flexast.model.config import load_config
    from flexast.model.train import train

    cfg = load_config(args.config, args.set)
    result = train(cfg, resume=args.resume)
    if result:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=1, default=str))
        print(f"report: {cfg.run.out_dir}/report.md   weights: {cfg.run.out_dir}/final/")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from flexast.model.evaluate import GridSpec, run_eval

    spec = GridSpec(
        patch_sizes=_ints(args.patches),
        shifts_ms=_floats(args.shifts),
        pool_factors=_ints(args.pools),
        pool_mode=args.pool_mode,
        max_lengths=_ints(args.lengths),
        base_max_frames=args.max_frames,
        base_shift_ms=args.shift,
    )
    out = run_eval(args.checkpoint, args.data, args.out, spec, args.name, args.device, args.max_clips)
    print(out["table"])
    print(f"wrote {args.out}/results.csv, {args.out}/table.md and {len(out['plots'])} plots")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from flexast.model.predict import Predictor, format_table

    predictor = Predictor(args.checkpoint, args.device)
    results = predictor.predict(
        args.files, patch=_patch(args.patch), shift_ms=args.shift, top_k=args.top_k, embeddings_out=args.embeddings
    )
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=1))
    else:
        print(format_table(results))
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"{failed} of {len(results)} files could not be read", file=sys.stderr)
    return 1 if failed == len(results) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flexast.model.demo import run_demo

    summary = run_demo(args.out, quick=args.quick, full=args.full, jobs=args.jobs)
    return 0 if summary else 1


def cmd_export(args: argparse.Namespace) -> int:
    if args.to == "hf":
        from flexast.model.export_hf import export_hf

        patch = _patch(args.patch)
        if patch is not None and patch[0] != patch[1]:
            print(f"error: HF AST needs a square patch, got --patch {args.patch}", file=sys.stderr)
            return 2
        files = export_hf(args.checkpoint, args.out, None if patch is None else patch[0])
    else:
        from flexast.model.export_onnx import export_onnx

        files = export_onnx(args.checkpoint, args.out, _patch(args.patch), shift_ms=args.shift, opset=args.opset)
    for f in files:
        print(f"wrote {f}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from flexast.model.import_weights import import_checkpoint

    options = {}
    if args.fmt == "official":
        options = dict(fstride=args.fstride, tstride=args.tstride, input_tdim=args.max_frames, n_mels=args.n_mels)
    elif args.fmt == "timm":
        if not args.num_classes:
            print("error: --from timm needs --num-classes (the head is new)", file=sys.stderr)
            return 2
        options = dict(
            num_classes=args.num_classes,
            n_mels=args.n_mels,
            max_frames=args.max_frames,
            patch=args.patch,
            pos_embed=args.pos,
            pool=args.pool,
        )
    path = import_checkpoint(args.fmt, args.src, args.out, args.labels, **options)
    print(f"wrote {path} and {path.parent / 'labels.json'}")
    print(f"use it as: --set model.init={path.parent}   or   model predict --checkpoint {path.parent} FILE")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from flexast.model.recipes_registry import describe_recipes

    rows = describe_recipes()
    width = max(len(n) for n, _ in rows)
    for name, header in rows:
        print(f"{name:<{width}}  {header}")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    from flexast.model.recipes_registry import copy_recipe

    dest = copy_recipe(args.name, args.dest, force=args.force)
    print(f"copied {args.name} to {dest}; train it with: model train --config {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model",
        description="flexast models: train AST / FlexiAST / ElasticAST / coarse-to-fine recipes, evaluate "
        "flexibility grids, predict on audio files, or run the end-to-end demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="train a recipe from a YAML config",
        description="Train from a YAML recipe "
        "(see configs/). The resolved config, metrics.jsonl, checkpoints and report.md go to run.out_dir.",
    )
    p.add_argument(
        "--config",
        required=True,
        help="a YAML file, or the name of a built-in recipe (e.g. demo; `model ls` lists them)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields, e.g. --set optim.lr=1e-4 data.max_frames=512",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.out_dir")
    p.set_defaults(_run=cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate checkpoints over patch sizes, resolutions and lengths",
        description="Sweeps patch size, frame shift (or pool factor) and max length for each "
        "checkpoint; writes results.csv, table.md (rows = models, columns = patch sizes) and PNG plots.",
    )
    p.add_argument("--checkpoint", action="append", required=True, help="a run's final/ folder (repeatable)")
    p.add_argument("--name", action="append", help="display name per checkpoint (repeatable, same order)")
    p.add_argument("--data", required=True, help="shard folder or its index.json (held-out set)")
    p.add_argument("--out", default="eval_out", help="output folder")
    p.add_argument("--patches", default="8,10,12,16,20,24,30,32,40,48", help="patch sizes, comma-separated")
    p.add_argument("--shifts", default="", help="frame shifts in ms to sweep (must be stored in the shards)")
    p.add_argument("--pools", default="", help="pool factors R to sweep (of the --shift features)")
    p.add_argument("--pool-mode", default="avg", choices=["avg", "max"])
    p.add_argument("--lengths", default="", help="max lengths in frames to sweep (cut only, never padded)")
    p.add_argument("--max-frames", type=int, default=1024, help="length cap of the patch and resolution sweeps")
    p.add_argument("--shift", type=float, default=10.0, help="base frame shift in ms")
    p.add_argument("--max-clips", type=int, default=0, help="evaluate only the first N clips (0 = all)")
    p.add_argument("--device", default="auto")
    p.set_defaults(_run=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="top-k labels for audio files",
        description="Decode any length / sample rate / format, featurise like the training shards, "
        "and print the top-k labels (table or --json). Unreadable files are reported; the rest still run.",
    )
    p.add_argument("--checkpoint", required=True, help="a run's final/ folder")
    p.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, mp3, ...)")
    p.add_argument("--patch", help="patch size, e.g. 32 or 16x32 (default: the model's own)")
    p.add_argument("--shift", type=float, default=10.0, help="frame shift in ms (coarser = fewer tokens)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--embeddings", help="save the pooled embeddings of the readable files to this .npy")
    p.add_argument("--device", default="auto")
    p.set_defaults(_run=cmd_predict)

    p = sub.add_parser(
        "demo",
        help="the end-to-end demo: data → shards → train → evaluate → report",
        description="Generates the demo audio (train/valid from seed 0, a held-out set of 816 clips from seed 1), "
        "builds shards, trains six tiny models on the same data (fixed AST, FlexiAST only, ElasticAST only, "
        "both, coarse-to-fine and a FLOP-matched shorter baseline), evaluates them over patch sizes, frame "
        "shifts and lengths with 95% intervals and writes DIR/report.md and DIR/claims.json (about 6 min on "
        "2 CPU cores; --full: two seeds, about twice as long). See docs/demo.md.",
    )
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; does not learn much)")
    p.add_argument("--full", action="store_true", help="every row with two training seeds (about twice as long)")
    p.add_argument("--jobs", type=int, default=0, help="trainings at a time (default: 2, or 1 on one core)")
    p.set_defaults(_run=cmd_demo)

    p = sub.add_parser(
        "export",
        help="export a checkpoint to Hugging Face transformers or ONNX",
        description="--to hf writes config.json, model.safetensors and preprocessor_config.json for "
        "ASTForAudioClassification.from_pretrained(DIR) and pipeline('audio-classification', model=DIR); "
        "--to onnx writes model.onnx (fbank features (B, T, F) to logits, dynamic T) and a JSON of the "
        "fbank and normalisation it expects. See docs/interop.md.",
    )
    p.add_argument("--checkpoint", required=True, help="a run's final/ folder (weights and labels.json)")
    p.add_argument("--to", required=True, choices=["hf", "onnx"], help="target format")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--patch", help="patch size to export at, e.g. 16 or 16x32 (hf: square only; default: the model's own)"
    )
    p.add_argument("--shift", type=float, default=10.0, help="frame shift in ms of the features (onnx only)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (onnx only)")
    p.set_defaults(_run=cmd_export)

    p = sub.add_parser(
        "import",
        help="convert an HF / official AST / timm checkpoint into a flexast run folder",
        description="Writes OUT/model.safetensors and OUT/labels.json, which model.init, model predict and "
        "model eval take directly. hf: a save_pretrained folder or its weights file (transformers 4.x or 5.x "
        "names; labels and normalisation from config.json and preprocessor_config.json). official: a "
        "YuanGongND/ast .pth. timm: a DeiT/ViT state dict (ImageNet init; new head). See docs/model.md.",
    )
    p.add_argument("--from", dest="fmt", required=True, choices=["hf", "official", "timm"], help="source format")
    p.add_argument("src", help="file (or HF folder) to convert")
    p.add_argument("--out", required=True, help="output folder, e.g. runs/mine/init")
    p.add_argument("--labels", help="class names: AudioSet's class_labels_indices.csv, or one name per line")
    p.add_argument("--n-mels", type=int, default=128, help="mel bins (official, timm)")
    p.add_argument("--max-frames", type=int, default=1024, help="input frames (official: input_tdim; timm)")
    p.add_argument("--fstride", type=int, default=10, help="frequency stride (official)")
    p.add_argument("--tstride", type=int, default=10, help="time stride (official)")
    p.add_argument("--num-classes", type=int, default=0, help="classes of the new head (timm)")
    p.add_argument("--patch", type=int, default=16, help="square base kernel (timm; resized by PI)")
    p.add_argument("--pos", default="grid", choices=["grid", "factorized"], help="positions (timm)")
    p.add_argument("--pool", default="cls_dist", choices=["cls", "cls_dist", "attn", "mean"], help="pooling (timm)")
    p.set_defaults(_run=cmd_import)

    p = sub.add_parser(
        "ls",
        help="list the built-in recipes",
        description="Lists the recipes shipped with flexast (the repository's configs/) with the run command "
        "of each header. `model train --config NAME` trains one as it is.",
    )
    p.set_defaults(_run=cmd_ls)

    p = sub.add_parser(
        "cp",
        help="copy a built-in recipe out for editing",
        description="Copies built-in recipe NAME to DEST (a file, or a folder that gets NAME.yaml); then edit it "
        "and train with `model train --config DEST`.",
    )
    p.add_argument("name", help="built-in recipe name, e.g. demo (see `model ls`)")
    p.add_argument("dest", help="file or folder to copy it to")
    p.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    p.set_defaults(_run=cmd_cp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point ``model COMMAND ...``; config and data errors print one message and exit 2."""
    from flexast.pipeline.errors import run_command

    args = build_parser().parse_args(argv)
    return run_command(args._run, args)


if __name__ == "__main__":
    sys.exit(main())
