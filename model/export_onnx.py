"""``model export --to onnx``: a checkpoint as an ONNX graph from normalised fbank ``(1, T, F)`` to logits ``(1, C)``.

Notation: ``T`` frames at the run's frame shift (10 ms unless chosen otherwise), ``F`` mel bins, ``(p_f, p_t)``
the exported patch, ``Hf = F // p_f``, ``Wt = T // p_t`` (trailing frames that fill no patch are dropped, as
``model predict`` trims them), ``C`` classes.

The graph is the model's packed forward (what ``model predict`` runs) on one clip at its own length: the
kernel at ``(p_f, p_t)`` (PI-resized), positions from the table resized to ``max(Wt, max_frames // p_t)``
columns of which the clip takes the first ``Wt`` (so clips longer than the table work too), any positional
layout (grid, factorised) and any pooling (CLS, CLS+DIST, mean, attention). ``T`` is a dynamic axis with
``T ≥ 2·p_t``; the batch axis is 1: clips of different lengths cannot share a batch without padding, which
would change their logits.

Outside the graph, as other audio ONNX exports keep it: decoding, resampling to ``sample_rate``, the
waveform's mean subtracted, Kaldi fbank with the options in ``model.json`` at ``shift_ms``, then AST
normalisation ``(x − mean) / (2·std)``. ``model.json`` beside ``model.onnx`` holds all of it plus the label
names. Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript), opset 18 by default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flexast.model.ast import ASTModel
from flexast.model.attention import Segments


class FbankToLogits(nn.Module):
    """``model``'s packed forward for one clip ``(1, T, F)`` at a fixed patch, written without shape branches.

    The patch embedding runs as the strided convolution (the same kernel as the packed path's linear map)
    and is reordered time-major; the segments are built from tensor shapes so that ``T`` stays symbolic.
    """

    def __init__(self, model: ASTModel, patch: tuple[int, int]):
        super().__init__()
        self.model = model.eval()
        self.patch = (int(patch[0]), int(patch[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, (p_f, p_t) = self.model, self.patch
        b, t, f = x.shape
        wt, hf = t // p_t, f // p_f
        n_tok = hf * wt
        img = x.transpose(1, 2).unsqueeze(1)  # (1, 1, F, T)
        tok = m.patch_embed(img, self.patch)  # (1, D, Hf, Wt)
        tok = tok.permute(0, 3, 2, 1).reshape(b * wt * hf, -1)  # (Wt·Hf, D), time-major as the packed path
        cu = torch.arange(b + 1, dtype=torch.int32, device=x.device) * n_tok  # (2,)
        seg = Segments(cu, n_tok, b * n_tok, n_tok, [n_tok])
        seg.cache["ids"] = torch.zeros(n_tok, dtype=torch.int64, device=x.device)  # (L,) one clip
        seg.cache["pos"] = torch.arange(n_tok, device=x.device)  # (L,)
        w_full = torch.sym_max(wt, m.config.max_frames // p_t)  # the table covers the clip, however long
        tok = tok + m.pos_embed.forward_packed(seg, hf, w_full).to(tok.dtype)  # (L, D)
        return m._encode(tok, seg, False)  # (1, C)


def onnx_metadata(predictor, patch: tuple[int, int], shift_ms: float) -> dict:
    """What a consumer needs around the graph: fbank options, normalisation, labels, patch and limits."""
    from flexast.pipeline.build_config import AST_FBANK

    c = predictor.model.config
    sr = int(predictor.info.get("sample_rate", 16000))
    mean, std = predictor._norm(shift_ms)
    features = {**AST_FBANK, **predictor.info.get("features", {}), "sample_frequency": float(sr)}
    features.update(num_mel_bins=c.n_mels, frame_shift=float(shift_ms))
    return {
        "input": "fbank (1, T, F): Kaldi fbank of the mean-subtracted waveform, normalised (x - mean) / (2 std)",
        "output": "logits (1, C)" + ("; softmax for scores" if predictor.single else "; sigmoid for scores"),
        "sample_rate": sr,
        "shift_ms": float(shift_ms),
        "fbank": features,
        "norm": {"mean": float(mean), "std": float(std)},
        "patch": list(patch),
        "min_frames": 2 * patch[1],
        "labels": "single" if predictor.single else "multi",
        "names": list(predictor.names),
        "display_names": list(predictor.display),
    }


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    patch: tuple[int, int] | None = None,
    shift_ms: float = 10.0,
    opset: int = 18,
) -> list[Path]:
    """Write ``model.onnx`` and ``model.json`` (its fbank, normalisation and labels) for ``checkpoint`` to ``out``.

    Args:
        checkpoint: a run's ``final/`` folder or a ``.safetensors`` file.
        out: folder to write (created).
        patch: ``(p_f, p_t)`` to export at; None uses the model's own kernel size.
        shift_ms: the frame shift the features will be computed at (selects the normalisation statistics).
        opset: ONNX opset.

    Returns:
        The two files written.
    """
    from flexast.model.predict import Predictor

    predictor = Predictor(checkpoint, "cpu")
    model = predictor.model.eval()
    patch = tuple(patch) if patch else tuple(model.config.base_patch)
    model.patch_embed.kernel(patch)  # a patch the model cannot run at fails here, with the model's own error
    wrapper = FbankToLogits(model, patch).eval()
    c = model.config
    example = torch.zeros(1, max(c.max_frames, 2 * patch[1]) + 3, c.n_mels)  # (1, T, F): T off every multiple
    time = torch.export.Dim("time", min=2 * patch[1], max=1 << 20)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "model.onnx", out / "model.json"]
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            dynamic_shapes={"x": {1: time}},
            input_names=["fbank"],
            output_names=["logits"],
            opset_version=opset,
            verbose=False,
        )
    program.save(str(files[0]))
    files[1].write_text(json.dumps(onnx_metadata(predictor, patch, shift_ms), indent=1))
    return files
