"""Pure tensor helpers against float64 references."""

from __future__ import annotations

import pytest
import torch

from alignloop.tensors import exact_div, first_true_index, logprobs_of, masked_mean, masked_var, masked_whiten


def test_logprobs_of_matches_log_softmax_in_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    got = logprobs_of(logits, tokens, chunk_size=4)  # chunking across rows
    assert got.shape == (3, 5)
    assert torch.allclose(got.double(), ref, atol=1e-6)


def test_masked_stats_hand_computed():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.5)
    assert masked_var(values, mask).item() == pytest.approx(5.0 / 3.0)  # sum sq dev 5, n-1 = 3
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(1.25)
    w = masked_whiten(values, mask)
    assert w[:, 2].abs().sum() == 0
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-9)


def test_first_true_index_and_exact_div():
    mask = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert first_true_index(mask).tolist() == [1, 3, 0]
    assert exact_div(12, 4) == 3
    with pytest.raises(ValueError, match="not divisible"):
        exact_div(10, 4, "batch")


def test_pack_shared_prefix_layout_positions_and_mask():
    from alignloop.tensors import pack_shared_prefix

    packed = pack_shared_prefix([([5, 6, 7, 8], [5, 6, 9]), ([1, 2], [1, 2, 3])], pad_id=0)
    # row 0: common prefix [5, 6], then [7, 8], then [9]; row 1: the prefix stops one short of [1, 2]'s end
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 2, 3, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    assert packed["first_last"].tolist() == [3, 1] and packed["second_last"].tolist() == [4, 3]
    allowed = packed["attention_mask"][0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0],
                       [1, 1, 0, 0, 1]]  # the second rest sees the prefix and itself, never the first rest
    padded = packed["attention_mask"][1, 0].int().tolist()
    assert padded[3] == [1, 0, 1, 1, 0] and padded[4] == [0, 0, 0, 0, 1]  # a pad query sees only itself
    assert packed["real"].tolist() == [[True] * 5, [True] * 4 + [False]]
