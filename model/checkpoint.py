"""Our checkpoint format: one safetensors file with the model config as JSON in its metadata, plus a sidecar.

Layout of ``PATH.safetensors``:
    tensors   the model's state dict (names as :class:`model.ast.ASTModel`), contiguous, unshared
    metadata  ``{"format": "flexast", "format_version": "1", "model_config": <ModelConfig JSON>, ...extra}``
and ``PATH.json`` beside it holds the same config (and extra) for people and tools.

Every reader takes the file itself or a checkpoint folder holding ``model.safetensors`` (a run's
``final/``, ``ema/``, ``checkpoints/step_*``; the rest of such a folder belongs to :mod:`model.run_dir`).

Loading executes no code: safetensors is a plain tensor container and the config is JSON. Foreign files
(``.pth``/``.pt``/``.bin``) are read by :func:`load_state_dict` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexast.model.ast import ASTModel, ModelConfig
from flexast.model.errors import CheckpointError

FORMAT = "flexast"
FORMAT_VERSION = "1"
WEIGHTS = "model.safetensors"  # the file's name inside a checkpoint folder


def weights_path(path: str | Path) -> Path:
    """The ``model.safetensors`` inside a checkpoint folder, or the file itself.

    Raises:
        CheckpointError: naming the path, when there is nothing there.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} (expected a run's final/ folder or a weights file)")
    return path


def save_checkpoint(model: ASTModel, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """Write ``model`` to ``path`` (``.safetensors`` is appended if missing) and its config to ``path.json``.

    Args:
        model: the model to save (its ``config`` is stored with it).
        path: file to write.
        extra: more string metadata (step, epoch, git commit, ...), stored in both files.

    Returns:
        The safetensors path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {str(k): str(v) for k, v in (extra or {}).items()}
    for reserved in ("format", "format_version", "model_config"):
        if reserved in extra:
            raise CheckpointError(f"extra metadata key {reserved!r} is reserved")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    config_json = model.config.to_json()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": config_json, **extra}
    save_file(tensors, str(path), metadata=meta)
    sidecar = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": json.loads(config_json), **extra}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of one of our checkpoints (config JSON included), without reading tensors."""
    from safetensors import safe_open

    path = weights_path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a flexast checkpoint (metadata format={meta.get('format')!r})")
    return meta


def read_config(path: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` stored in a checkpoint."""
    return ModelConfig.from_json(read_metadata(path)["model_config"])


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> ASTModel:
    """Rebuild the model from its stored config and load its weights (strict), on ``device``."""
    from safetensors.torch import load_file

    path = weights_path(path)
    config = read_config(path)
    model = ASTModel(config)
    state = load_file(str(path), device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights disagree with its config: missing={missing}, unexpected={unexpected}")
    return model.to(device)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of any weights file: safetensors, or a torch pickle read with ``weights_only=True``.

    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.
    """
    path = weights_path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_init(path: str | Path, fmt: str) -> ASTModel:
    """A model to initialise from: our checkpoint (``flexast``), an official AST ``.pth`` or an HF state dict."""
    if fmt == "flexast":
        return load_checkpoint(path, "cpu")
    from flexast.model import convert

    state = load_state_dict(path)
    if fmt == "official":
        return convert.from_official_ast(state)
    return convert.from_hf(state)
