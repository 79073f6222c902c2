"""flexast models: a flexible Audio Spectrogram Transformer over packed variable-length clips.

Public API (see docs/model.md):
    ASTModel, ModelConfig                              the model and its JSON-round-tripping config
    save_checkpoint, load_checkpoint, read_config      our safetensors + JSON checkpoint format
    from_hf, from_official_ast, from_timm              foreign checkpoint converters
    batch_flops, model_flops, FlopCount                analytic forward/backward FLOPs
"""

from flexast.model.ast import ASTModel, ModelConfig
from flexast.model.attention import BACKENDS, Segments, resolve_backend
from flexast.model.checkpoint import load_checkpoint, load_state_dict, read_config, save_checkpoint
from flexast.model.convert import config_from_hf, from_hf, from_official_ast, from_timm, to_official_ast
from flexast.model.encoder import PRESETS
from flexast.model.flops import FlopCount, batch_flops, model_flops, padded_flops, train_flops

__all__ = [
    "BACKENDS",
    "PRESETS",
    "ASTModel",
    "FlopCount",
    "ModelConfig",
    "Segments",
    "batch_flops",
    "config_from_hf",
    "from_hf",
    "from_official_ast",
    "from_timm",
    "load_checkpoint",
    "load_state_dict",
    "model_flops",
    "padded_flops",
    "read_config",
    "resolve_backend",
    "save_checkpoint",
    "to_official_ast",
    "train_flops",
]
