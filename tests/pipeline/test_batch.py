"""PackedBatch: derived fields follow from the definition, and bad input names the clip."""

import pytest
import torch

from flexast.pipeline.batch import PackedBatch, token_count, trim_frames
from flexast.pipeline.errors import BatchError


def test_token_count_is_the_patch_grid():
    # 128 bins at 16x16 -> 8 rows; 100 frames -> 6 columns (remainder 4 dropped).
    assert token_count(100, 128, (16, 16)) == 8 * 6
    # Non-divisible frequency patch drops the remainder rows like a strided conv: 128 // 48 = 2.
    assert token_count(96, 128, (48, 48)) == 2 * 2
    n = torch.tensor([15, 16, 17, 160])
    assert token_count(n, 128, (16, 16)).tolist() == [0, 8, 8, 80]


def test_trim_frames():
    assert trim_frames(37, 8) == 32
    assert trim_frames(torch.tensor([7, 8, 9]), 8).tolist() == [0, 8, 8]


def test_from_clips_derives_offsets_from_token_count():
    clips = [torch.randn(35, 128), torch.randn(20, 128), torch.randn(64, 128)]
    b = PackedBatch.from_clips(clips, torch.zeros(3, 5), ["a", "b", "c"], (16, 16), frame_shift_ms=[10, 12, 20])
    assert b.n_frames.tolist() == [32, 16, 64]
    assert b.frames.shape == (112, 128)
    expected = [token_count(t, 128, (16, 16)) for t in (32, 16, 64)]
    assert b.tokens.tolist() == expected
    assert b.cu_seqlens.dtype == torch.int32
    assert b.cu_seqlens.tolist() == [0, expected[0], expected[0] + expected[1], sum(expected)]
    assert b.max_tokens == max(expected) and isinstance(b.max_tokens, int)
    # The trimmed clip keeps its leading frames.
    assert torch.equal(b.clip_frames()[0], clips[0][:32])


def test_rows_capacity_and_padding():
    clips = [torch.randn(16, 32) for _ in range(3)]
    b = PackedBatch.from_clips(clips, torch.zeros(3), ["a", "b", "c"], (16, 16), rows=[0, 0, 1], row_len=4)
    assert b.n_rows == 2
    # 3 clips x 2 tokens = 6 tokens in 2 rows of 4.
    assert b.padding_fraction() == pytest.approx(1 - 6 / 8)
    with pytest.raises(BatchError, match="row_len=3"):
        PackedBatch.from_clips(clips, torch.zeros(3), ["a", "b", "c"], (16, 16), rows=[0, 0, 1], row_len=3)


def test_errors_name_the_offending_clip():
    with pytest.raises(BatchError, match="'short'"):
        PackedBatch.from_clips([torch.randn(5, 128)], torch.zeros(1), ["short"], (16, 16))
    with pytest.raises(BatchError, match="not a multiple of p_t=16"):
        PackedBatch(
            frames=torch.randn(20, 128),
            n_frames=torch.tensor([20]),
            patch=(16, 16),
            labels=torch.zeros(1),
            keys=["odd"],
            frame_shift_ms=torch.tensor([10.0]),
        )


def test_to_keeps_python_ints_and_moves_tensors():
    b = PackedBatch.from_clips([torch.randn(16, 16)], torch.zeros(1, 2), ["a"], (16, 16))
    m = b.to("cpu", non_blocking=True)
    assert m.max_tokens == b.max_tokens and torch.equal(m.cu_seqlens, b.cu_seqlens)
