"""flexast models: a flexible Audio Spectrogram Transformer over packed variable-length clips.

Public API (see docs/model.md):
    ASTModel, ModelConfig                              the model and its JSON-round-tripping config
    save_checkpoint, load_checkpoint, read_config      our safetensors + JSON checkpoint format
    from_hf, from_official_ast, from_timm              foreign checkpoint converters
    batch_flops, model_flops, FlopCount                analytic forward/backward FLOPs
"""

from model.ast import ASTModel, ModelConfig
from model.attention import BACKENDS, Segments, resolve_backend
from model.checkpoint import load_checkpoint, load_state_dict, read_config, save_checkpoint
from model.encoder import PRESETS

__all__ = [
    "BACKENDS",
    "PRESETS",
    "ASTModel",
    "ModelConfig",
    "Segments",
    "load_checkpoint",
    "load_state_dict",
    "read_config",
    "resolve_backend",
    "save_checkpoint",
]
