"""``model import``: a foreign checkpoint (HF transformers AST, official AST, timm DeiT/ViT) as a flexast run folder.

The folder (``RUN/init``) holds ``model.safetensors`` (+ ``.json`` config sidecar) and ``labels.json``
(class names, display names, the normalisation and fbank the weights expect), so that ``model.init``,
``model predict`` and ``model eval`` take it as they take a run's ``final/``. The conversion itself is
:mod:`model.convert`; this module reads the files and says which file went wrong and how.

* ``hf``: a ``save_pretrained`` folder (``config.json``, ``model.safetensors`` or ``pytorch_model.bin``,
  optional ``preprocessor_config.json``) or the weights file itself; transformers 4.x and 5.x key names.
  ``id2label`` gives the names, the feature extractor's ``mean``/``std`` the normalisation.
* ``official``: a YuanGongND/ast ``.pth`` (``module.v.*``); its strides, input length and mel bins are options.
* ``timm``: a DeiT/ViT state dict (ImageNet, as AST initialises); the encoder size comes from the weights,
  the audio geometry, positions, pooling and class count from options; the head stays freshly initialised.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import torch

from flexast.model.ast import ASTModel
from flexast.model.errors import CheckpointError, ConversionError

FORMATS = ("hf", "official", "timm")
AST_NORM = (-4.2677393, 4.5689974)  # AST's AudioSet statistics, what the published checkpoints expect
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of ``path``; a truncated or unreadable file is a :class:`CheckpointError` naming it."""
    from flexast.model.checkpoint import load_state_dict

    try:
        return load_state_dict(path)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: cannot read weights (truncated or not a weights file?): {exc}") from exc
    except Exception as exc:  # safetensors' own error type is not importable under a stable name
        raise CheckpointError(f"{path}: cannot read weights (truncated or not a weights file?): {exc}") from exc


def _convert(path: Path, fn, *args, **kwargs) -> ASTModel:
    """Run converter ``fn``; a key mismatch is re-raised naming the file it came from."""
    try:
        return fn(*args, **kwargs)
    except ConversionError as exc:
        raise ConversionError(f"{path}: {exc}") from exc
    except KeyError as exc:  # a converter looked up a key the file does not have
        raise ConversionError(f"{path}: missing key {exc.args[0]!r}; is this a {fn.__name__[5:]} checkpoint?") from exc


def _hf_files(src: Path) -> tuple[Path, Path | None, Path | None]:
    """``(weights, config.json or None, preprocessor_config.json or None)`` of an HF folder or weights file."""
    folder = src if src.is_dir() else src.parent
    if src.is_dir():
        found = [folder / n for n in _HF_WEIGHTS if (folder / n).exists()]
        if not found:
            raise CheckpointError(f"{src}: no {' or '.join(_HF_WEIGHTS)} in this folder")
        weights = found[0]
    else:
        weights = src
    config, pre = folder / "config.json", folder / "preprocessor_config.json"
    return weights, config if config.exists() else None, pre if pre.exists() else None


def import_hf(src: Path) -> tuple[ASTModel, dict]:
    """Model and ``labels.json`` contents from an HF AST folder or weights file."""
    from flexast.model.convert import from_hf

    weights, config_path, pre_path = _hf_files(src)
    state = read_weights(weights)
    config = json.loads(config_path.read_text()) if config_path else None
    model = _convert(weights, from_hf, state, config)
    n = model.config.num_classes
    id2label = (config or {}).get("id2label") or {}
    display = [str(id2label.get(str(i), id2label.get(i, i))) for i in range(n)]
    names = list((config or {}).get("label_names") or display)
    pre = json.loads(pre_path.read_text()) if pre_path else {}
    norm = [float(pre.get("mean", AST_NORM[0])), float(pre.get("std", AST_NORM[1]))]
    single = (config or {}).get("problem_type") == "single_label_classification"
    info = _labels_info(names, display, norm, int(pre.get("sampling_rate", 16000)), single)
    return model, info


def import_official(src: Path, fstride: int, tstride: int, input_tdim: int, n_mels: int) -> tuple[ASTModel, dict]:
    from flexast.model.convert import from_official_ast

    state = read_weights(src)
    model = _convert(src, from_official_ast, state, fstride, tstride, input_tdim, n_mels)
    names = [str(i) for i in range(model.config.num_classes)]
    return model, _labels_info(names, names, list(AST_NORM), 16000, False)


def import_timm(src: Path, config: dict) -> tuple[ASTModel, dict]:
    """``config`` holds ``num_classes``, ``n_mels``, ``max_frames``, ``patch``, ``pos_embed``, ``pool``."""
    from flexast.model.convert import deit_config, from_timm

    state = read_weights(src)
    for key in ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ConversionError(f"{src}: missing key {key!r}; is this a timm DeiT/ViT state dict?")
    p = int(config["patch"])
    model_config = deit_config(
        state,
        "",
        num_classes=int(config["num_classes"]),
        n_mels=int(config["n_mels"]),
        max_frames=int(config["max_frames"]),
        base_patch=(p, p),
        fstride=p,
        tstride=p,
        pos_embed=config["pos_embed"],
        pool=config["pool"],
    )
    model = _convert(src, from_timm, state, model_config)
    names = [str(i) for i in range(model.config.num_classes)]
    return model, _labels_info(names, names, list(AST_NORM), 16000, False)


def _labels_info(names, display, norm, sample_rate: int, single: bool) -> dict:
    return {
        "names": list(names),
        "display_names": list(display),
        "labels": "single" if single else "multi",
        "stats": {},
        "norm": list(norm),
        "features": {},
        "sample_rate": sample_rate,
    }


def read_label_file(path: Path, n: int) -> tuple[list[str], list[str]]:
    """Names and display names from AudioSet's ``class_labels_indices.csv`` (``mid``, ``display_name``) or a text
    file with one name per line; the count must be ``n``."""
    text = path.read_text()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if rows and {"mid", "display_name"} <= set(rows[0]):
            names, display = [r["mid"] for r in rows], [r["display_name"] for r in rows]
        else:
            raise CheckpointError(f"{path}: a label CSV needs 'mid' and 'display_name' columns")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
        display = names
    if len(names) != n:
        raise CheckpointError(f"{path}: {len(names)} labels for a model with {n} classes")
    return names, display


def import_checkpoint(fmt: str, src: str | Path, out: str | Path, labels: str | Path | None = None, **options) -> Path:
    """Convert ``src`` (format ``fmt``) and write it to the folder ``out``; returns the weights path.

    Args:
        fmt: ``hf``, ``official`` or ``timm``.
        src: the file (or HF folder) to read.
        out: folder to write (``RUN/init``).
        labels: optional class names (see :func:`read_label_file`); they replace the checkpoint's own.
        **options: ``official``: ``fstride``, ``tstride``, ``input_tdim``, ``n_mels``; ``timm``: ``num_classes``,
            ``n_mels``, ``max_frames``, ``patch``, ``pos_embed``, ``pool``.

    Raises:
        CheckpointError: a missing, truncated or unreadable file, named.
        ConversionError: weights that do not fit the format, naming the file and the first missing or
            unexpected key.
    """
    from flexast.model.run_dir import save_weights

    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    if fmt == "hf":
        model, info = import_hf(src)
    elif fmt == "official":
        model, info = import_official(src, **options)
    elif fmt == "timm":
        model, info = import_timm(src, options)
    else:
        raise ConversionError(f"unknown import format {fmt!r}; choose one of {FORMATS}")
    if labels:
        info["names"], info["display_names"] = read_label_file(Path(labels), model.config.num_classes)
    return save_weights(out, model, info, extra={"imported_from": str(src), "import_format": fmt})
