"""The stream end to end on local shards, and its stages on plain lists."""

from __future__ import annotations

import io
import os
import tarfile
import threading

import numpy as np
import pytest
import torch

from flexast.pipeline.augment import normalise
from flexast.pipeline.errors import ConfigError, ShardError
from flexast.pipeline.loader import StreamLoader, equalise, make_loader, make_stream, split_plan
from flexast.pipeline.sources import ShardInfo, expand_braces, expand_urls
from flexast.pipeline.stream import assign_shards, shuffle_stage
from flexast.pipeline.stream_config import StreamConfig
from tests.factories import write_shard_folder

BASE = {"budget_tokens": 256, "patches": [[4, 4]], "pack_buffer": 24, "shuffle_buffer": 16}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    index = write_shard_folder(out, n_shards=5, per_shard=12, shifts_ms=(10.0, 20.0))
    return str(out), index


def all_keys(index):
    return {f"clip{s:03d}{i:04d}" for s in range(len(index["shards"])) for i in range(index["shards"][s]["samples"])}


def run(loader):
    return [(tuple(b.keys), b.patch, b.total_tokens) for b in loader]


# Stages on plain lists ---------------------------------------------------------------------------


def test_expand_braces_and_globs(tmp_path):
    assert expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    for n in ("t-0.tar", "t-1.tar"):
        (tmp_path / n).write_bytes(b"")
    _, found = expand_urls(str(tmp_path / "t-*.tar"))
    assert [os.path.basename(s.url) for s in found] == ["t-0.tar", "t-1.tar"]
    _, remote = expand_urls("https://host/d/s-{0..2}.tar")
    assert [s.url for s in remote] == [f"https://host/d/s-{i}.tar" for i in range(3)]
    with pytest.raises(ShardError, match="no shard matches"):
        expand_urls(str(tmp_path / "none-*.tar"))


def test_shuffle_stage_is_a_seeded_permutation():
    out = list(shuffle_stage(range(100), 10, np.random.default_rng(1)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert out == list(shuffle_stage(range(100), 10, np.random.default_rng(1)))


@pytest.mark.filterwarnings("ignore:.*splitting at sample level")
@pytest.mark.parametrize("n_shards", [2, 3, 8, 13])
@pytest.mark.parametrize("known", [True, False])
def test_assign_shards_covers_every_sample_once(n_shards, known):
    sizes = [7 + 5 * (j % 3) for j in range(n_shards)]
    shards = [ShardInfo(f"s{j}", sizes[j] if known else None) for j in range(n_shards)]
    seen, per_slot = [], []
    for slot in range(4):
        mine = assign_shards(shards, seed=0, epoch=3, shuffle=True, slot=slot, n_slots=4)
        kept = [(sh.url, i) for sh, every, offset in mine for i in range(sizes[int(sh.url[1:])]) if i % every == offset]
        seen += kept
        per_slot.append(len(kept))
    assert sorted(seen) == sorted((f"s{j}", i) for j in range(n_shards) for i in range(sizes[j]))
    if known and n_shards >= 4:
        assert max(per_slot) - min(per_slot) <= max(sizes), "dealt by sample count: within one shard"


def test_config_reports_every_unknown_and_bad_key():
    with pytest.raises(ConfigError, match=r"\['bogus', 'wat'\]"):
        StreamConfig.from_dict({"bogus": 1, "wat": 2})
    with pytest.raises(ConfigError) as err:
        StreamConfig(mode="diag", crop="sideways", budget_tokens=0)
    assert (
        "mode='diag'" in str(err.value) and "crop='sideways'" in str(err.value) and "budget_tokens=0" in str(err.value)
    )


# End to end ---------------------------------------------------------------------------------------


def test_epoch_emits_every_clip_once_deterministically(shards):
    folder, index = shards
    cfg = StreamConfig(**BASE, resolution={"kind": "random"}, freq_mask=4, time_mask=8, mixup_prob=0.5)
    a = run(make_stream(cfg, folder))
    keys = [k for step in a for k in step[0]]
    assert sorted(keys) == sorted(all_keys(index))
    assert all(t <= cfg.budget_tokens for *_, t in a)
    assert a == run(make_stream(cfg, folder))
    assert a != run(make_stream(cfg, folder, epoch=1))
    other_seed = StreamConfig(**{**BASE, "seed": 5}, resolution={"kind": "random"})
    assert a != run(make_stream(other_seed, folder))


def test_batch_content_is_the_stored_clip_cropped_and_normalised(shards):
    folder, index = shards
    cfg = StreamConfig(**BASE, train=False, label_mode="multi_hot")
    batch = next(iter(make_stream(cfg, folder)))
    key, n = batch.keys[0], int(batch.n_frames[0])
    shard = os.path.join(folder, f"train-{int(key[4:7]):06d}.tar")
    with tarfile.open(shard) as tar:
        stored = np.load(io.BytesIO(tar.extractfile(f"{key}.s10.npy").read())).astype(np.float32)
        meta = tar.extractfile(f"{key}.json").read()
    start = (stored.shape[0] - n) // 2  # evaluation crops the centre (here: only the trim to p_t)
    mean, std = index["stats"]["s10"]["mean"], index["stats"]["s10"]["std"]
    want = (stored[start : start + n] - mean) / (2 * std)
    torch.testing.assert_close(batch.clip_frames()[0], torch.from_numpy(want))
    torch.testing.assert_close(
        normalise(torch.from_numpy(stored), mean, std)[start : start + n], batch.clip_frames()[0]
    )
    label_ids = __import__("json").loads(meta)["label_ids"]
    assert batch.labels[0].nonzero().flatten().tolist() == label_ids
    assert batch.frame_shift_ms[0] == 10.0


def test_eval_mode_is_unshuffled_and_unaugmented(shards):
    folder, index = shards
    cfg = StreamConfig(**{**BASE, "train": False, "freq_mask": 8, "time_mask": 8, "mixup_prob": 1.0})
    steps = run(make_stream(cfg, folder))
    assert sorted(k for s in steps for k in s[0]) == sorted(all_keys(index))
    assert steps == run(make_stream(StreamConfig(**{**BASE, "train": False, "seed": 9}), folder))


class ThreadMax:
    """``reduce_max`` across ranks simulated by threads (what ``torch.distributed.all_reduce(MAX)`` does)."""

    def __init__(self, n):
        self.barrier, self.values, self.lock = threading.Barrier(n), [], threading.Lock()

    def __call__(self, k):
        with self.lock:
            self.values.append(k)
        self.barrier.wait(timeout=60)
        return max(self.values)


def ranks_run(cfg, folder, world, state=None):
    reducer, out, errors = ThreadMax(world), {}, []

    def go(rank):
        try:
            loader = make_stream(cfg, folder, rank=rank, world_size=world, reduce_max=reducer)
            out[rank] = [b.keys for b in loader]
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return out


@pytest.mark.parametrize("mode", ["flat", "rows"])
def test_two_ranks_two_workers_equal_steps_and_union_is_dataset(shards, mode):
    folder, index = shards
    extra = {"mode": "rows", "row_len": 64} if mode == "rows" else {}
    cfg = StreamConfig(**{**BASE, **extra, "num_workers": 2})
    out = ranks_run(cfg, folder, world=2)
    assert len(out[0]) == len(out[1])
    keys = [k for r in out for step in out[r] for k in step]
    assert sorted(keys) == sorted(all_keys(index))


def test_multi_rank_without_process_group_fails_loudly(shards):
    with pytest.raises(ConfigError, match=r"torch\.distributed is not initialised"):
        make_stream(StreamConfig(**BASE), shards[0], rank=0, world_size=2)


def test_fewer_shards_than_slots_splits_by_sample_with_warning(tmp_path):
    index = write_shard_folder(tmp_path, n_shards=1, per_shard=10)
    cfg = StreamConfig(**{**BASE, "num_workers": 2})
    with pytest.warns(UserWarning, match="splitting at sample level"):
        out = ranks_run(cfg, str(tmp_path), world=2)
    assert len(out[0]) == len(out[1])
    assert sorted(k for r in out for s in out[r] for k in s) == sorted(all_keys(index))


@pytest.mark.parametrize("stop", [1, 4, 9])
def test_resume_mid_epoch_reproduces_the_uninterrupted_order(shards, stop):
    folder, _ = shards
    cfg = StreamConfig(**{**BASE, "num_workers": 2}, resolution={"kind": "random"}, mixup_prob=0.5)
    full = [(b.keys, b.frames) for b in make_stream(cfg, folder, epoch=2)]
    loader = make_stream(cfg, folder, epoch=2)
    it = iter(loader)
    head = [next(it) for _ in range(stop)]
    state = loader.state_dict()
    resumed = make_stream(cfg, folder)
    resumed.load_state_dict(state)
    rest = [(b.keys, b.frames) for b in resumed]
    got = [(b.keys, b.frames) for b in head] + rest
    assert [k for k, _ in got] == [k for k, _ in full]
    for (_, x), (_, y) in zip(got, full, strict=True):
        assert torch.equal(x, y), "bit for bit"
    assert resumed.epoch == 3, "a finished epoch advances to the next"


def test_steps_in_epoch_is_exact_before_the_epoch_starts(shards):
    folder, _ = shards
    for epoch in (0, 1, 2):
        loader = make_stream(StreamConfig(**{**BASE, "pack_buffer": 60, "num_workers": 2}), folder, epoch=epoch)
        announced = loader.steps_in_epoch()
        real = len(list(loader))
        assert announced == real
        assert loader.last_stats.steps == real and loader.last_stats.padding < 0.2


def test_two_ranks_resume_inside_the_equalised_tail(shards):
    folder, _ = shards
    cfg = StreamConfig(**{**BASE, "num_workers": 2})
    full = ranks_run(cfg, folder, world=2)
    stop = len(full[0]) - 2  # near the end, where the rank with fewer planned steps has split steps
    states, head, reducer = {}, {}, ThreadMax(2)

    def first_part(rank):
        loader = make_stream(cfg, folder, rank=rank, world_size=2, reduce_max=reducer)
        it = iter(loader)
        head[rank] = [next(it).keys for _ in range(stop)]
        states[rank] = loader.state_dict()

    threads = [threading.Thread(target=first_part, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert states[0]["position"] == stop
    reducer, rest = ThreadMax(2), {}

    def second_part(rank):
        loader = make_stream(cfg, folder, rank=rank, world_size=2, reduce_max=reducer)
        loader.load_state_dict(states[rank])
        rest[rank] = [b.keys for b in loader]

    threads = [threading.Thread(target=second_part, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(2):
        assert head[r] + rest[r] == full[r]


def test_dataloader_workers_give_the_in_process_sequence(shards):
    folder, _ = shards
    cfg = StreamConfig(**{**BASE, "num_workers": 2})
    assert run(make_loader(cfg, folder)) == run(make_stream(cfg, folder))


def test_split_and_equalise_keep_every_clip_and_the_rows(shards):
    folder, _ = shards
    cfg = StreamConfig(**{**BASE, "mode": "rows", "row_len": 64, "train": False})
    loader = make_stream(cfg, folder)
    steps = loader.plan(0)
    a, b = split_plan(steps[0][1], 16)
    keys = [it["key"] for it in steps[0][1].items]
    assert [it["key"] for it in a.items + b.items] == keys
    assert set(a.rows) == set(range(max(a.rows) + 1)) and set(b.rows) == set(range(max(b.rows) + 1))
    more = equalise(steps[:3], 5, 16)
    assert len(more) == 8
    assert [it["key"] for _, p in more for it in p.items] == [it["key"] for _, p in steps[:3] for it in p.items]
    batches = list(make_stream(cfg, folder))
    assert [k for bt in batches[:1] for k in bt.keys] == keys


def test_corrupt_shard_raises_naming_it_or_is_skipped_and_counted(tmp_path):
    index = write_shard_folder(tmp_path, n_shards=3, per_shard=6)
    bad = tmp_path / "train-000001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated mid-member
    cfg = StreamConfig(**{**BASE, "shuffle_shards": False})
    with pytest.raises(ShardError, match=r"train-000001\.tar"):
        list(make_stream(cfg, str(tmp_path)))
    loader = make_stream(StreamConfig(**{**BASE, "on_error": "skip"}), str(tmp_path))
    keys = [k for b in loader for k in b.keys]
    assert loader.last_read["shard_errors"] == 1
    assert loader.last_read["failed_shards"][0].endswith("train-000001.tar")
    good = {k for k in all_keys(index) if not k.startswith("clip001")}
    assert good <= set(keys) and len(keys) == len(set(keys))


def test_corrupt_tar_header_is_named_and_not_retried(tmp_path):
    write_shard_folder(tmp_path, n_shards=2, per_shard=4)
    bad = tmp_path / "train-000000.tar"
    data = bytearray(bad.read_bytes())
    data[1024 + 2] ^= 0xFF  # inside the second member's header (the first member is 512 + 512 bytes)
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000000\.tar.*checksum"):
        list(make_stream(StreamConfig(**BASE), str(tmp_path)))


def test_balanced_sampling_repeats_rare_label_clips(tmp_path):
    write_shard_folder(tmp_path, n_shards=2, per_shard=20, n_classes=3)
    cfg = StreamConfig(**BASE, balanced=True)
    keys = [k for b in make_stream(cfg, str(tmp_path)) for k in b.keys]
    assert len(keys) > len(set(keys)), "two-label clips weigh about twice as much: some repeat"
    assert 24 < len(keys) < 64, "the expected epoch size is kept"


def test_class_index_labels_for_cross_entropy(tmp_path):
    write_shard_folder(tmp_path, n_shards=2, per_shard=6, max_labels=1)
    cfg = StreamConfig(**{**BASE, "label_mode": "index", "train": False})
    batches = list(make_stream(cfg, str(tmp_path)))
    assert all(b.labels.dtype == torch.int64 and b.labels.shape == (b.n_clips,) for b in batches)
    mixed = StreamConfig(**{**BASE, "label_mode": "index", "mixup_prob": 1.0})
    soft = list(make_stream(mixed, str(tmp_path)))
    assert all(b.labels.shape == (b.n_clips, 5) and b.labels.dtype == torch.float32 for b in soft)
    torch.testing.assert_close(torch.cat([b.labels for b in soft]).sum(1), torch.ones(12))
    with pytest.raises(ShardError, match="one label per clip"):
        list(make_stream(cfg, shards_with_two_labels(tmp_path)))


def shards_with_two_labels(tmp_path):
    out = tmp_path / "multi"
    write_shard_folder(out, n_shards=1, per_shard=20, max_labels=2)
    return str(out)


def test_index_labels_and_fixed_target_length(shards):
    folder, _ = shards
    cfg = StreamConfig(**{**BASE, "train": False, "target_frames": 40, "label_mode": "multi_hot"})
    batches = list(make_stream(cfg, folder))
    assert all(int(n) == 40 for b in batches for n in b.n_frames)
    assert batches[0].labels.shape[1] == 5
    loader = StreamLoader(cfg, folder)
    assert sum(b.n_clips for b in loader) == 60
