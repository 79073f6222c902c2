"""``model import``: HF (4.x and 5.x names), official AST and timm files become folders that ``model.init``,
``model predict`` and ``model eval`` take; broken files are named with the first key that does not fit.

Peers: transformers' own ``ASTForAudioClassification`` (logits on the same input) and the exporters' inverse
layouts (:func:`to_official_ast`, a hand-built timm dict), compared tensor by tensor.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexast.model import to_official_ast
from flexast.model.ast import ASTModel
from flexast.model.checkpoint import load_checkpoint, load_init
from flexast.model.cli import main
from flexast.model.errors import CheckpointError, ConversionError
from flexast.model.import_weights import import_checkpoint
from flexast.model.predict import Predictor
from flexast.model.run_dir import read_labels
from tests.factories import write_audio, write_shard_folder
from tests.model.model_helpers import tiny_config, tiny_hf_ast
from tests.model.test_convert import _V4_TO_V5, _V5_TO_V4, _rename

LABELS = {0: "Speech", 1: "Dog", 2: "Music"}


@pytest.fixture(scope="module")
def hf_folder(hf_ast, tmp_path_factory):
    """A tiny random ``ASTForAudioClassification`` saved by transformers itself, with a preprocessor config."""
    model = tiny_hf_ast(hf_ast, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("hf") / "ast-tiny"
    model.save_pretrained(folder)
    pre = {"feature_extractor_type": "ASTFeatureExtractor", "mean": -5.5, "std": 3.25, "sampling_rate": 16000}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder, model


def test_hf_import_gives_the_same_logits_and_the_labels(hf_folder, tmp_path):
    folder, hf = hf_folder
    assert main(["import", "--from", "hf", str(folder), "--out", str(tmp_path / "init")]) == 0
    ours = load_checkpoint(tmp_path / "init").eval()
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0))  # (B, T, F)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(input_values=x).logits, atol=1e-5, rtol=0)
    info = json.loads((tmp_path / "init" / "labels.json").read_text())
    assert info["display_names"] == ["Speech", "Dog", "Music"] and info["norm"] == [-5.5, 3.25]


def test_hf_import_accepts_the_4x_and_5x_key_names(hf_folder, tmp_path):
    folder, _ = hf_folder
    saved = load_file(folder / "model.safetensors")  # transformers 5 saves the 4.x names
    for rules, probe in (
        (_V5_TO_V4, ".encoder.layer.0.attention.attention.query."),
        (_V4_TO_V5, ".layers.0.attention.q_proj."),
    ):
        layout = tmp_path / probe.strip(".").replace(".", "_")
        layout.mkdir()
        state = _rename(saved, rules)
        assert any(probe in k for k in state)
        save_file(state, layout / "model.safetensors")
        (layout / "config.json").write_text((folder / "config.json").read_text())
        import_checkpoint("hf", layout / "model.safetensors", layout / "init")
    a, b = (load_file(next(tmp_path.glob(f"{g}/init/model.safetensors"))) for g in ("encoder_*", "layers_*"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_imported_folder_works_as_init_for_predict_and_for_eval(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder
    out = tmp_path / "run" / "init"
    import_checkpoint("hf", folder, out)
    init = load_init(str(out), "flexast")  # what model.init=RUN/init loads
    want = load_checkpoint(out).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in init.state_dict().items())

    wav = write_audio(tmp_path / "a.wav", seconds=0.7)
    (pred,) = Predictor(out, "cpu").predict([wav], top_k=3)
    assert pred.error is None and {d for _, d, _ in pred.labels} == {"Speech", "Dog", "Music"}

    shards = tmp_path / "shards"
    index = write_shard_folder(shards, n_shards=1, per_shard=4, shifts_ms=(10.0,), n_mels=32, n_classes=3, split="eval")
    index["labels"]["names"] = read_labels(out)["names"]  # held-out labels are matched to the model's by name
    (shards / "index.json").write_text(json.dumps(index))
    args = ["eval", "--checkpoint", str(out), "--data", str(shards), "--out", str(tmp_path / "eval")]
    code = main([*args, "--patches", "8", "--max-frames", "64"])
    assert code == 0 and (tmp_path / "eval" / "results.csv").exists()


def test_official_import_round_trips_the_official_layout(tmp_path):
    torch.manual_seed(0)
    model = ASTModel(tiny_config(fstride=6, tstride=5, max_frames=60, num_classes=3))
    torch.save(to_official_ast(model), tmp_path / "audioset.pth")
    names = tmp_path / "names.csv"
    names.write_text("index,mid,display_name\n0,/m/09x0r,Speech\n1,/m/0bt9lr,Dog\n2,/m/04rlf,Music\n")
    args = ["import", "--from", "official", str(tmp_path / "audioset.pth"), "--out", str(tmp_path / "init")]
    args += ["--n-mels", "32", "--max-frames", "60", "--fstride", "6", "--tstride", "5", "--labels", str(names)]
    assert main(args) == 0
    back = load_checkpoint(tmp_path / "init").state_dict()
    assert all(torch.equal(v, back[k]) for k, v in model.state_dict().items())
    info = json.loads((tmp_path / "init" / "labels.json").read_text())
    assert info["names"] == ["/m/09x0r", "/m/0bt9lr", "/m/04rlf"] and info["display_names"][2] == "Music"


def test_timm_import_takes_the_encoder_and_makes_a_new_head(tmp_path):
    torch.manual_seed(0)
    src = ASTModel(tiny_config(max_frames=32, num_classes=3))  # grid (4, 4) at patch 8 over 32 bins
    sd = src.state_dict()
    timm = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    timm["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"].repeat(1, 3, 1, 1)  # (D, 3, p, p) RGB
    timm["patch_embed.proj.bias"] = sd["patch_embed.proj.bias"]
    timm.update(cls_token=sd["cls_token"], dist_token=sd["dist_token"], pos_embed=sd["pos_embed.weight"])
    timm["head.weight"] = torch.zeros(1000, 32)  # ImageNet head: ignored
    save_file({k: v.contiguous() for k, v in timm.items()}, tmp_path / "deit.safetensors")
    args = ["import", "--from", "timm", str(tmp_path / "deit.safetensors"), "--out", str(tmp_path / "init")]
    assert main([*args, "--num-classes", "7", "--n-mels", "32", "--max-frames", "32", "--patch", "8"]) == 0
    got = load_checkpoint(tmp_path / "init")
    assert got.config.num_classes == 7 and got.config.embed_dim == 32 and got.config.depth == 2
    for k, v in got.state_dict().items():
        if not k.startswith("head."):
            torch.testing.assert_close(v, sd[k], atol=1e-6, rtol=0, msg=k)


def test_truncated_file_is_named(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder
    data = (folder / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{bad}: cannot read weights"):
        import_checkpoint("hf", bad, tmp_path / "init")
    assert main(["import", "--from", "hf", str(bad), "--out", str(tmp_path / "init")]) == 2
    assert str(bad) in capsys.readouterr().err


def test_mismatched_file_names_the_file_and_the_first_key(hf_folder, tmp_path, capsys):
    folder, _ = hf_folder
    state = load_file(folder / "model.safetensors")
    gone = "audio_spectrogram_transformer.encoder.layer.1.output.dense.bias"
    del state[gone]
    bad = tmp_path / "model.safetensors"
    save_file(state, bad)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ConversionError, match=rf"{bad}: .*first missing key 'encoder.blocks.1.mlp.fc2.bias'"):
        import_checkpoint("hf", bad, tmp_path / "init")
    # an HF file read as an official checkpoint: the file and what it lacks
    assert main(["import", "--from", "official", str(folder / "model.safetensors"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(folder / "model.safetensors") in err and "module.v.pos_embed" in err
