"""SpecAugment, mixup within a packed batch, the one normalisation, and balanced sampling weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexast.pipeline.augment import mixup, normalise, spec_augment
from flexast.pipeline.errors import BatchError
from flexast.pipeline.sampling import clip_weights, label_weights, mean_clip_weight, reweight_stage


def test_normalise_is_the_ast_formula():
    x = torch.tensor([[-4.2677393, 4.8702581]])
    torch.testing.assert_close(normalise(x, -4.2677393, 4.5689974), torch.tensor([[0.0, 1.0]]))


def test_spec_augment_masks_whole_bands_and_returns_a_copy():
    x = torch.ones(200, 32)
    out = spec_augment(x, freq_mask=8, time_mask=40, rng=np.random.default_rng(3))
    assert torch.equal(x, torch.ones(200, 32)), "input untouched"
    zero_cols = (out == 0).all(0).sum().item()
    zero_rows = (out == 0).all(1).sum().item()
    assert 0 <= zero_cols <= 8 and 0 <= zero_rows <= 40
    masked = out == 0
    # every zero lies in a fully masked row or a fully masked column
    assert bool((masked <= ((out == 0).all(0)[None, :] | (out == 0).all(1)[:, None])).all())


def test_time_mask_scales_with_compression():
    widths = {}
    for c in (1.0, 4.0):
        w = []
        for seed in range(300):
            out = spec_augment(torch.ones(400, 8), 0, 80, np.random.default_rng(seed), compression=c)
            w.append(int((out == 0).all(1).sum()))
        widths[c] = w
    assert max(widths[1.0]) > 60 and max(widths[4.0]) <= 20
    assert np.mean(widths[1.0]) == pytest.approx(4 * np.mean(widths[4.0]), rel=0.25)


def test_mixup_mixes_features_and_labels_with_the_same_lambda():
    clips = [torch.full((6, 2), 1.0), torch.full((3, 2), 5.0)]
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out, y = mixup(clips, labels, alpha=10.0, prob=1.0, rng=np.random.default_rng(0))
    assert [c.shape for c in out] == [c.shape for c in clips]
    lam0 = float(y[0, 0])
    # clip 0 (6 frames) mixes with clip 1 tiled to 6 frames: all values 1·λ + 5·(1−λ)
    torch.testing.assert_close(out[0], torch.full((6, 2), lam0 + 5 * (1 - lam0)))
    lam1 = float(y[1, 1])
    # clip 1 (3 frames) mixes with clip 0 cut to its first 3 frames
    torch.testing.assert_close(out[1], torch.full((3, 2), 5 * lam1 + (1 - lam1)))
    torch.testing.assert_close(y.sum(1), torch.ones(2))
    same, y2 = mixup(clips, labels, 10.0, 0.0, np.random.default_rng(0))
    assert all(torch.equal(a, b) for a, b in zip(same, clips, strict=True)) and torch.equal(y2, labels)
    with pytest.raises(BatchError, match="float labels"):
        mixup(clips, torch.tensor([0, 1]), 10.0, 1.0, np.random.default_rng(0))


def test_balanced_weights_follow_the_ast_repository():
    counts = [10, 1000, 0]
    np.testing.assert_allclose(label_weights(counts), [1000 / 10.01, 1000 / 1000.01, 1000 / 0.01])
    w = clip_weights([[0], [1], [0, 1], []], counts)
    np.testing.assert_allclose(w, [1000 / 10.01, 1000 / 1000.01, 1000 / 10.01 + 1000 / 1000.01, 0.0])
    # the mean clip weight from label counts equals the mean over the clips that produced the counts
    label_ids = [[0]] * 6 + [[0, 1]] * 4 + [[1]] * 996
    counts = [10, 1000]
    assert mean_clip_weight(counts, len(label_ids)) == pytest.approx(clip_weights(label_ids, counts).mean())


def test_reweight_stage_preserves_the_expected_epoch_and_balances_labels():
    label_ids = [[0]] * 50 + [[1]] * 950
    counts = [50, 950]
    samples = [{"key": f"k{i}", "meta": {"label_ids": ids}} for i, ids in enumerate(label_ids)]
    out = list(reweight_stage(samples, counts, mean_clip_weight(counts, 1000), np.random.default_rng(0)))
    rare = sum(1 for s in out if s["meta"]["label_ids"] == [0])
    assert 900 < len(out) < 1100
    assert 0.4 < rare / len(out) < 0.6, "both labels now equally likely"
    assert {s["occurrence"] for s in out} >= {0, 1}
