"""``model export --to hf``: a checkpoint as a Hugging Face ``ASTForAudioClassification`` folder.

Notation: ``F`` mel bins, ``T`` frames at 10 ms, ``P`` the exported square patch, ``D`` width, ``(H, W)`` the
exported positional grid ``((F - P) // s_f + 1, (T - P) // s_t + 1)`` for strides ``(s_f, s_t)``.

The folder holds ``config.json`` (an ``ASTConfig``: ``id2label`` carries the display names, ``label_names``
the machine names, ``problem_type`` picks the pipeline's sigmoid or softmax), ``model.safetensors``
(transformers 4.x key names, which 5.x also loads) and ``preprocessor_config.json`` (``ASTFeatureExtractor``
with the run's normalisation mean/std at 10 ms and ``max_length`` = the model's ``max_frames``).

What HF's AST can hold: one square kernel with fixed strides, a full positional grid for exactly
``max_length`` frames, and [CLS] + [DIST] averaged (``pool="cls_dist"``). A FlexiAST model is exported at
any square patch ``P``: its kernel is PI-resized (:meth:`FlexiPatchEmbed.kernel`) and its positions resized
(:meth:`GridPosEmbed.forward_padded` / :meth:`FactorizedPosEmbed.forward_padded`), exactly as its own padded
forward does at that patch; factorised tables are summed into the grid they stand for at that length.
Other pooling (``cls``, ``mean``, ``attn``) has no HF equivalent and is refused: use ``--to onnx``.

HF's feature extractor pads or cuts every clip to ``max_length`` frames (padding with log-mel 0 before
normalising); flexast runs clips at their own length. Logits agree for clips of ``max_length`` frames; see
docs/interop.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flexast.model.ast import ASTModel, ModelConfig
from flexast.model.convert import to_hf
from flexast.model.errors import ConversionError

# Kaldi fbank options that HF's ASTFeatureExtractor reproduces (numpy path: 400-sample Hann frames, hop 160,
# 512-point FFT, pre-emphasis 0.97, DC removal, log power mel from 20 Hz to Nyquist). Others cannot be exported.
HF_FBANK = {
    "sample_frequency": 16000.0,
    "frame_length": 25.0,
    "frame_shift": 10.0,
    "window_type": "hanning",
    "dither": 0.0,
    "low_freq": 20.0,
    "preemphasis_coefficient": 0.97,
    "remove_dc_offset": True,
    "round_to_power_of_two": True,
    "use_energy": False,
    "use_log_fbank": True,
    "use_power": True,
    "subtract_mean": False,
}
_POOL_REASON = {
    "cls": "it pools one [CLS] token, while HF's AST always averages two ([CLS] and [DIST])",
    "mean": "it mean-pools the patch tokens, while HF's AST always averages [CLS] and [DIST]",
    "attn": "it pools with attention (a learned query over the tokens), which HF's AST class has no layer for",
}


def check_exportable(config: ModelConfig) -> None:
    """Raise :class:`ConversionError` naming why HF's AST cannot hold this model, and pointing to ONNX."""
    if config.pool != "cls_dist":
        raise ConversionError(
            f"cannot export to HF AST: pool={config.pool!r}: {_POOL_REASON.get(config.pool, 'unknown pool')}. "
            "Export with --to onnx instead (any pooling and positions, dynamic length)."
        )


def at_patch(model: ASTModel, patch: int | None = None) -> ASTModel:
    """A plain AST (grid positions, one fixed kernel) equal to ``model``'s padded forward at square ``patch``.

    ``patch=None`` keeps the model's own kernel and strides (overlapping ones included). Any other size uses
    non-overlapping patches, the PI- (or bilinearly) resized kernel and the resized positions, for inputs of
    ``max_frames`` frames.
    """
    c = model.config
    check_exportable(c)
    if patch is None or (patch, patch) == c.base_patch:
        size, stride = c.base_patch, (c.fstride, c.tstride)
    else:
        size, stride = (int(patch), int(patch)), (int(patch), int(patch))
    if size[0] != size[1]:
        raise ConversionError(f"HF AST needs a square patch; the model's own is {size}: pass --patch P")
    if size[0] > c.n_mels or size[1] > c.max_frames:
        raise ConversionError(f"patch {size} does not fit n_mels={c.n_mels}, max_frames={c.max_frames}")
    new = ModelConfig(
        **{
            **c.to_dict(),
            "base_patch": size,
            "fstride": stride[0],
            "tstride": stride[1],
            "pos_embed": "grid",
            "patch_resize": "none",
            "resize_axes": "both",
            "attention": "auto",
        }
    )
    rule = "ast" if (size, stride) == (c.base_patch, (c.fstride, c.tstride)) else "bilinear"
    out = ASTModel(new)
    with torch.no_grad():
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(("patch_embed.", "pos_embed."))}
        state["patch_embed.proj.weight"] = model.patch_embed.kernel(size)  # (D, 1, P, P)
        state["patch_embed.proj.bias"] = model.patch_embed.proj.bias
        grid = model.pos_embed.forward_padded(new.grid, rule)  # (H·W, D)
        state["pos_embed.weight"] = torch.cat([model.pos_embed.prefix(), grid], 0)[None]  # (1, 2 + H·W, D)
        out.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()})
    return out.eval()


def check_features(features: dict, sample_rate: int) -> None:
    """Raise :class:`ConversionError` listing every fbank option HF's ``ASTFeatureExtractor`` cannot reproduce."""
    from flexast.pipeline.build_config import AST_FBANK

    opts = {**AST_FBANK, **features, "sample_frequency": float(sample_rate), "frame_shift": 10.0}
    bad = [f"{k}={opts.get(k)!r} (HF: {v!r})" for k, v in HF_FBANK.items() if k in opts and opts[k] != v]
    high = float(opts.get("high_freq", 0.0))
    if high > 0.0 and high != sample_rate / 2:
        bad.append(f"high_freq={high} (HF: Nyquist)")
    if bad:
        raise ConversionError(
            f"cannot export to HF: the run's fbank differs from what ASTFeatureExtractor computes: {bad}. "
            "Export with --to onnx instead (features stay outside the graph)."
        )


def hf_config(model: ASTModel, names: list[str], display: list[str], single: bool) -> dict:
    """The ``config.json`` contents of the exported model."""
    c = model.config
    return {
        "architectures": ["ASTForAudioClassification"],
        "model_type": "audio-spectrogram-transformer",
        "hidden_size": c.embed_dim,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads,
        "intermediate_size": round(c.mlp_ratio * c.embed_dim),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": c.norm_eps,
        "patch_size": c.base_patch[0],
        "qkv_bias": c.qkv_bias,
        "frequency_stride": c.fstride,
        "time_stride": c.tstride,
        "max_length": c.max_frames,
        "num_mel_bins": c.n_mels,
        "id2label": {str(i): d for i, d in enumerate(display)},
        "label2id": {d: i for i, d in enumerate(display)},
        "label_names": list(names),
        "problem_type": "single_label_classification" if single else "multi_label_classification",
        "torch_dtype": "float32",
    }


def preprocessor_config(n_mels: int, max_length: int, mean: float, std: float, sample_rate: int = 16000) -> dict:
    """The ``preprocessor_config.json`` of an ``ASTFeatureExtractor`` with the run's normalisation."""
    return {
        "feature_extractor_type": "ASTFeatureExtractor",
        "feature_size": 1,
        "sampling_rate": sample_rate,
        "num_mel_bins": n_mels,
        "max_length": max_length,
        "padding_value": 0.0,
        "do_normalize": True,
        "mean": float(mean),
        "std": float(std),
        "return_attention_mask": False,
    }


def export_hf(checkpoint: str | Path, out: str | Path, patch: int | None = None) -> list[Path]:
    """Write ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` for ``checkpoint`` to ``out``.

    Args:
        checkpoint: a run's ``final/`` folder (weights plus ``labels.json``) or a ``.safetensors`` file.
        out: folder to write (created).
        patch: square patch size to export at; None keeps the model's own kernel and strides.

    Returns:
        The three files written.

    Raises:
        ConversionError: pooling or fbank options HF's AST cannot represent (the message says why), a
            non-square or oversized patch.
    """
    from safetensors.torch import save_file

    from flexast.model.predict import Predictor

    predictor = Predictor(checkpoint, "cpu")
    check_exportable(predictor.model.config)
    sample_rate = int(predictor.info.get("sample_rate", 16000))
    check_features(predictor.info.get("features", {}), sample_rate)
    model = at_patch(predictor.model, patch)
    mean, std = predictor._norm(10.0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "config.json", out / "model.safetensors", out / "preprocessor_config.json"]
    files[0].write_text(json.dumps(hf_config(model, predictor.names, predictor.display, predictor.single), indent=2))
    save_file(to_hf(model), str(files[1]), metadata={"format": "pt"})
    pre = preprocessor_config(model.config.n_mels, model.config.max_frames, mean, std, sample_rate)
    files[2].write_text(json.dumps(pre, indent=2))
    return files
