"""The training loader: resume mid-epoch, equal steps per rank, balanced sampling, mixup, resolutions."""

from __future__ import annotations

import numpy as np
import torch

from flexast.model.data import ClipLoader
from flexast.pipeline.resolution import TimeScale
from tests.factories import synthetic_clipset


def keys_of(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        if n is not None and i >= n:
            break
        out.append((tuple(b.keys), b.patch, b.frames.sum().item()))
    return out


def test_resume_mid_epoch_replays_the_rest_exactly():
    data = synthetic_clipset(n_clips=30, seed=1)
    kw = dict(patches=[(8, 8), (8, 16)], budget=128, max_frames=64, freq_mask=4, time_mask=8, mixup=0.5, seed=3)
    full = ClipLoader(data, **kw)
    full.set_epoch(2)
    everything = keys_of(full)
    part = ClipLoader(data, **kw)
    part.set_epoch(2)
    it = iter(part)
    head = [next(it) for _ in range(3)]
    state = part.state_dict()
    resumed = ClipLoader(data, **kw)
    resumed.load_state_dict(state)
    rest = keys_of(resumed)
    assert [tuple(b.keys) for b in head] + [k for k, _, _ in rest] == [k for k, _, _ in everything]
    assert rest == everything[3:]


def test_ranks_get_equal_steps_and_disjoint_clips():
    data = synthetic_clipset(n_clips=41, seed=2)
    loaders = [ClipLoader(data, budget=100, max_frames=64, rank=r, world=2, seed=0) for r in range(2)]
    steps = [keys_of(ld) for ld in loaders]
    assert len(steps[0]) == len(steps[1]) > 0
    seen = [{k for s in st for k in s[0]} for st in steps]
    assert not seen[0] & seen[1]


def test_budget_is_respected_and_resolutions_are_used():
    data = synthetic_clipset(n_clips=20, seed=4)
    ld = ClipLoader(
        data,
        budget=96,
        max_frames=200,
        resolutions=[TimeScale(10.0), TimeScale(20.0), TimeScale(10.0, 4)],
        pool_mode="max",
    )
    shifts = set()
    for b in ld:
        assert b.total_tokens <= 96
        shifts |= set(b.frame_shift_ms.tolist())
    assert shifts == {10.0, 20.0, 40.0}


def test_balanced_sampling_evens_out_classes():
    data = synthetic_clipset(n_clips=40, n_classes=2, seed=0)
    for c in data.clips[:36]:
        c.label_ids = [0]
    for c in data.clips[36:]:
        c.label_ids = [1]
    ld = ClipLoader(data, budget=100000, max_frames=16, balanced=True, labels="single")
    counts = np.zeros(2)
    for epoch in range(20):
        ld.set_epoch(epoch)
        for b in ld:
            counts += np.bincount(b.labels.numpy(), minlength=2)
    assert 0.4 < counts[1] / counts.sum() < 0.6  # 10% of the clips, about half of the draws


def test_mixup_mixes_features_and_labels_convexly():
    data = synthetic_clipset(n_clips=6, seed=5)
    plain = ClipLoader(data, budget=100000, max_frames=32, labels="single", seed=1)
    mixed = ClipLoader(data, budget=100000, max_frames=32, labels="single", seed=1, mixup=1.0, mixup_alpha=0.4)
    a, b = next(iter(plain)), next(iter(mixed))
    assert a.keys == b.keys
    assert b.labels.shape == (6, 4)
    torch.testing.assert_close(b.labels.sum(1), torch.ones(6))
    lam = b.labels.max(1).values.min().item()
    assert 0.0 < lam < 1.0 or lam == 1.0
    assert not torch.equal(a.frames, b.frames)


def test_eval_features_are_the_ast_normalised_pooled_centre_cut():
    data = synthetic_clipset(n_clips=5, seed=6)
    ld = ClipLoader(data, patches=[(8, 8)], budget=100000, max_frames=16, resolutions=[TimeScale(10.0, 2)], train=False)
    batch = next(iter(ld))
    mean, std = data.stats[10.0]
    for key, got in zip(batch.keys, batch.clip_frames(), strict=True):
        raw = next(c for c in data.clips if c.key == key).feats[10.0].astype(np.float64)
        t = raw.shape[0] // 2
        pooled = raw[: 2 * t].reshape(t, 2, -1).mean(1)  # (T // 2, F): avg pool, tail dropped
        start = (t - 16) // 2
        want = (pooled[start : start + 16] - mean) / (2.0 * std)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_time_mask_covers_the_same_duration_at_every_compression():
    data = synthetic_clipset(n_clips=24, seed=7, min_frames=200, max_frames=240)
    mean, std = data.stats[10.0]
    masked_value = (0.0 - mean) / (2.0 * std)  # masks are 0 in raw log-mel space, as in AST
    longest = {}
    for pool in (1, 4):
        ld = ClipLoader(data, budget=100000, max_frames=200, resolutions=[TimeScale(10.0, pool)], time_mask=40, seed=2)
        runs = []
        for epoch in range(3):
            ld.set_epoch(epoch)
            for b in ld:
                for x in b.clip_frames():
                    full = torch.isclose(x, torch.tensor(masked_value)).all(1).int().tolist()  # (T,) masked rows
                    runs.append(max((len(r) for r in "".join(map(str, full)).split("0")), default=0))
        longest[pool] = max(runs)
    assert 20 < longest[1] <= 40  # up to 40 frames of 10 ms
    assert 5 < longest[4] <= 10  # up to 10 frames of 40 ms: the same 400 ms


def test_padded_batches_count_overlapping_tokens():
    data = synthetic_clipset(n_clips=7, seed=8)
    ld = ClipLoader(data, budget=10**6, max_frames=64, pad_to=64, pad_patch=(8, 8, 4, 6), labels="single")
    b = next(iter(ld))
    assert b.x.shape == (7, 64, 32)
    assert b.total_tokens == 7 * (1 + (32 - 8) // 4) * (1 + (64 - 8) // 6)
