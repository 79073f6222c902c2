"""The training loader over an in-memory source: resume mid-epoch, equal steps per rank, balanced sampling,
mixup, resolutions, normalisation and the padded AST view."""

from __future__ import annotations

import threading

import numpy as np
import torch

from flexast.model.data import padded_view
from flexast.pipeline.loader import make_stream
from flexast.pipeline.stream_config import StreamConfig
from tests.factories import synthetic_clipset

BASE = {"patches": [[8, 8]], "budget_tokens": 128, "max_frames": 64, "label_mode": "index"}


def loader(data, epoch=0, rank=0, world=1, reduce_max=None, **kw):
    return make_stream(StreamConfig(**{**BASE, **kw}), data, rank=rank, world_size=world, epoch=epoch,
                       reduce_max=reduce_max)  # fmt: skip


def keys_of(ld):
    return [(tuple(b.keys), b.patch, b.frames.sum().item()) for b in ld]


def test_resume_mid_epoch_replays_the_rest_exactly():
    data = synthetic_clipset(n_clips=30, seed=1)
    kw = dict(patches=[(8, 8), (8, 16)], freq_mask=4, time_mask=8, mixup_prob=0.5, seed=3)
    everything = keys_of(loader(data, epoch=2, **kw))
    part = loader(data, epoch=2, **kw)
    it = iter(part)
    head = [next(it) for _ in range(3)]
    resumed = loader(data, **kw)
    resumed.load_state_dict(part.state_dict())
    rest = keys_of(resumed)
    assert [tuple(b.keys) for b in head] + [k for k, _, _ in rest] == [k for k, _, _ in everything]
    assert rest == everything[3:]


def test_ranks_get_equal_steps_and_disjoint_clips():
    data = synthetic_clipset(n_clips=41, seed=2, n_shards=5)
    barrier, values, out = threading.Barrier(2), [], {}

    def reduce_max(k):
        values.append(k)
        barrier.wait(timeout=60)
        return max(values[-2:])

    def go(rank):
        out[rank] = keys_of(loader(data, rank=rank, world=2, reduce_max=reduce_max, budget_tokens=100))

    threads = [threading.Thread(target=go, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out[0]) == len(out[1]) > 0
    seen = [[k for s in out[r] for k in s[0]] for r in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"clip{i:04d}" for i in range(41))


def test_budget_is_respected_and_resolutions_are_used():
    data = synthetic_clipset(n_clips=20, seed=4)
    shifts = set()
    for res in ({"kind": "random", "shifts_ms": [10.0, 20.0]}, {"kind": "pool", "shift_ms": 10.0, "pool_factors": [4]}):
        for b in loader(data, budget_tokens=96, max_frames=200, resolution={**res, "pool_mode": "max"}):
            assert b.total_tokens <= 96
            shifts |= set(b.frame_shift_ms.tolist())
    assert shifts == {10.0, 20.0, 40.0}


def test_balanced_sampling_evens_out_classes():
    data = synthetic_clipset(n_clips=40, n_classes=2, seed=0)
    for sh in data.shards:
        for r in data.records(sh):
            r["meta"]["label_ids"] = [0] if int(r["key"][4:]) < 36 else [1]
    data.index["labels"]["counts"] = [36, 4]
    counts = np.zeros(2)
    for epoch in range(20):
        for b in loader(data, epoch=epoch, budget_tokens=100000, max_frames=16, balanced=True):
            counts += np.bincount(b.labels.numpy(), minlength=2)
    assert 0.4 < counts[1] / counts.sum() < 0.6  # 10% of the clips, about half of the draws


def test_mixup_mixes_features_and_labels_convexly():
    data = synthetic_clipset(n_clips=6, seed=5, n_shards=1)
    plain = loader(data, budget_tokens=100000, max_frames=32, seed=1)
    mixed = loader(data, budget_tokens=100000, max_frames=32, seed=1, mixup_prob=1.0, mixup_alpha=0.4)
    a, b = next(iter(plain)), next(iter(mixed))
    assert a.keys == b.keys
    assert b.labels.shape == (6, 4)
    torch.testing.assert_close(b.labels.sum(1), torch.ones(6))
    assert not torch.equal(a.frames, b.frames)


def test_eval_features_are_the_ast_normalised_pooled_centre_cut():
    data = synthetic_clipset(n_clips=5, seed=6)
    pool = {"kind": "pool", "shift_ms": 10.0, "pool_factors": [2]}
    batch = next(iter(loader(data, budget_tokens=100000, max_frames=16, resolution=pool, train=False)))
    mean, std = -6.5, 3.0  # the factory's statistics
    raws = {r["key"]: r["loc"]["s10"] for sh in data.shards for r in data.records(sh)}
    for key, got in zip(batch.keys, batch.clip_frames(), strict=True):
        raw = raws[key].astype(np.float64)
        t = raw.shape[0] // 2
        pooled = raw[: 2 * t].reshape(t, 2, -1).mean(1)  # (T // 2, F): avg pool, tail dropped
        start = (t - 16) // 2
        want = (pooled[start : start + 16] - mean) / (2.0 * std)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_time_mask_covers_the_same_duration_at_every_compression():
    data = synthetic_clipset(n_clips=24, seed=7, min_frames=200, max_frames=240)
    masked_value = (0.0 + 6.5) / (2.0 * 3.0)  # masks are 0 in raw log-mel space, as in AST
    longest = {}
    for pool in (1, 4):
        res = {"kind": "pool", "shift_ms": 10.0, "pool_factors": [pool]}
        runs = []
        for epoch in range(3):
            for b in loader(data, epoch=epoch, budget_tokens=100000, max_frames=200, resolution=res, time_mask=40,
                            seed=2):  # fmt: skip
                for x in b.clip_frames():
                    full = torch.isclose(x, torch.tensor(masked_value)).all(1).int().tolist()  # (T,) masked rows
                    runs.append(max((len(r) for r in "".join(map(str, full)).split("0")), default=0))
        longest[pool] = max(runs)
    assert 20 < longest[1] <= 40  # up to 40 frames of 10 ms
    assert 5 < longest[4] <= 10  # up to 10 frames of 40 ms: the same 400 ms


def test_padded_ast_input_is_a_view_counting_overlapping_tokens():
    data = synthetic_clipset(n_clips=7, seed=8, n_shards=1)
    per_clip = (1 + (32 - 8) // 4) * (1 + (64 - 8) // 6)
    b = next(iter(loader(data, budget_tokens=10**6, max_frames=None, target_frames=64, stride=[4, 6])))
    x = padded_view(b)
    assert x.shape == (7, 64, 32) and x.data_ptr() == b.frames.data_ptr()
    small = list(loader(data, budget_tokens=3 * per_clip, max_frames=None, target_frames=64, stride=[4, 6]))
    assert [bt.n_clips for bt in small] == [3, 3, 1]  # the budget counts the overlapping patches
