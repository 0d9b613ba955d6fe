"""PPO losses, entropy and explained variance against hand-computed values and float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from alignloop.losses import entropy_from_logits, explained_variance, ppo_policy_loss, value_loss
from alignloop.tensors import masked_mean

F64 = torch.float64


def policy_inputs(ratios: list[float], advantages: list[float], pad: int = 1):
    """Log-probs realising `ratios` against fixed old log-probs, plus `pad` masked tokens holding garbage."""
    old = torch.tensor([[-1.0 - 0.1 * i for i in range(len(ratios))] + [-2.0] * pad], dtype=F64)
    logp = old.clone()
    logp[0, : len(ratios)] += torch.tensor(ratios, dtype=F64).log()
    logp[0, len(ratios) :] = -math.inf  # padding may hold anything, even -inf
    adv = torch.tensor([advantages + [1e6] * pad], dtype=F64)
    mask = torch.tensor([[1] * len(ratios) + [0] * pad])
    return logp.requires_grad_(), old, adv, mask


def test_policy_loss_hand_computed_inside_and_outside_the_clip():
    # clip 0.2; per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=+1 r=1.1 -> -1.1   (inside)
    #   A=+1 r=1.5 -> -1.2   (clipped: no incentive to push r further up)
    #   A=+1 r=0.5 -> -0.5   (unclipped: the pessimistic bound keeps the gradient)
    #   A=-1 r=0.5 ->  0.8   (clipped)
    #   A=-1 r=1.5 ->  1.5   (unclipped)
    #   A=-2 r=1.1 ->  2.2   (inside)
    # mean = 1.7 / 6; clipfrac = 2 / 6; the 7th token is padding.
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5, 1.1]
    advantages = [1.0, 1.0, 1.0, -1.0, -1.0, -2.0]
    logp, old, adv, mask = policy_inputs(ratios, advantages)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(1.7 / 6, abs=1e-14)
    assert stats["ppo/policy/clipfrac"].item() == pytest.approx(2 / 6, abs=1e-15)
    assert stats["ppo/policy/dual_clipfrac"].item() == 0.0
    assert stats["ppo/policy/ratio_mean"].item() == pytest.approx(sum(ratios) / 6, abs=1e-14)
    logs = [math.log(r) for r in ratios]
    assert stats["ppo/policy/approxkl_k2"].item() == pytest.approx(sum(0.5 * x * x for x in logs) / 6, abs=1e-14)
    assert stats["ppo/policy/approxkl_k3"].item() == pytest.approx(
        sum(r - 1 - x for r, x in zip(ratios, logs, strict=True)) / 6, abs=1e-14
    )
    loss.backward()
    grad = logp.grad[0]
    # d/dlogp of -A r is -A r; clipped and padded tokens get exactly nothing
    for t in (0, 2, 4, 5):
        assert grad[t].item() == pytest.approx(-advantages[t] * ratios[t] / 6, abs=1e-14)
    assert grad[1].item() == 0.0 and grad[3].item() == 0.0 and grad[6].item() == 0.0
    assert torch.isfinite(grad).all()


def test_dual_clip_caps_the_loss_of_negative_advantages():
    # clip 0.2, dual clip 3:
    #   A=-1 r=5   -> max(5, 1.2) = 5, capped at 3 * 1 = 3 (no gradient)
    #   A=-1 r=2   -> 2 (below the cap)
    #   A=+1 r=5   -> -1.2 (ordinary clip; the dual clip only touches A < 0)
    #   A=-1 r=0.5 -> 0.8
    ratios, advantages = [5.0, 2.0, 5.0, 0.5], [-1.0, -1.0, 1.0, -1.0]
    logp, old, adv, mask = policy_inputs(ratios, advantages)
    plain, _ = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert plain.item() == pytest.approx((5 + 2 - 1.2 + 0.8) / 4, abs=1e-14)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx((3 + 2 - 1.2 + 0.8) / 4, abs=1e-14)
    assert stats["ppo/policy/dual_clipfrac"].item() == pytest.approx(0.25)
    loss.backward()
    grad = logp.grad[0]
    assert grad[0].item() == 0.0 and grad[2].item() == 0.0 and grad[3].item() == 0.0 and grad[4].item() == 0.0
    assert grad[1].item() == pytest.approx(2.0 / 4, abs=1e-14)
    with pytest.raises(ValueError, match="exceed 1"):
        ppo_policy_loss(logp, old, adv, mask, clip_range=0.2, dual_clip=1.0)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_and_zero_kl():
    """The first minibatch of a PPO epoch: new = old log-probs."""
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g, dtype=F64)
    logp = old.clone().requires_grad_()
    adv = torch.randn(4, 6, generator=g, dtype=F64)
    mask = (torch.rand(4, 6, generator=g) > 0.3).long()
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2, dual_clip=3.0)
    assert loss.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-15)
    assert stats["ppo/policy/approxkl_k2"].item() == 0.0
    assert stats["ppo/policy/approxkl_k3"].item() == 0.0
    assert stats["ppo/policy/clipfrac"].item() == 0.0
    assert stats["ppo/policy/ratio_mean"].item() == 1.0
    loss.backward()  # the vanilla policy gradient -A / N on real tokens
    assert torch.allclose(logp.grad, -adv * mask / mask.sum(), rtol=0, atol=1e-15)


def test_value_loss_hand_computed_clipped_and_unclipped():
    # clip 0.2; per token 0.5 max((v - R)^2, (clip(v, old +- 0.2) - R)^2):
    #   v=1.0 old=0.9 R=2 -> inside the clip: 0.5 * 1                      = 0.5
    #   v=1.5 old=1.0 R=2 -> v_clip=1.2: max(0.25, 0.64) -> clipped branch = 0.32
    #   v=1.5 old=1.0 R=1 -> v_clip=1.2: max(0.25, 0.04) -> unclipped      = 0.125
    #   v=0.0 old=1.0 R=3 -> v_clip=0.8: max(9, 4.84)    -> unclipped      = 4.5
    # mean = 5.445 / 4; the 5th token is padding with garbage.
    values = torch.tensor([[1.0, 1.5, 1.5, 0.0, 1e3]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.9, 1.0, 1.0, 1.0, -1e3]], dtype=F64)
    returns = torch.tensor([[2.0, 2.0, 1.0, 3.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert loss.item() == pytest.approx(5.445 / 4, abs=1e-14)
    assert stats["ppo/value/clipfrac"].item() == pytest.approx(0.25)
    assert stats["ppo/value/mse"].item() == pytest.approx((1 + 0.25 + 0.25 + 9) / 4, abs=1e-14)
    loss.backward()
    expected_grad = torch.tensor([[(1.0 - 2.0) / 4, 0.0, 0.5 / 4, (0.0 - 3.0) / 4, 0.0]], dtype=F64)
    assert torch.allclose(values.grad, expected_grad, rtol=0, atol=1e-15)
    assert values.grad[0, 1].item() == 0.0 and values.grad[0, 4].item() == 0.0


def test_entropy_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g) * 3  # float32, like a model's output
    ref_logits = logits.double()
    ref = -(ref_logits.softmax(-1) * ref_logits.log_softmax(-1)).sum(-1)  # (B, T)
    got = entropy_from_logits(logits, chunk_size=4)  # chunks cross row boundaries
    assert got.shape == (3, 5)
    assert torch.allclose(got.double(), ref, rtol=0, atol=1e-6)
    assert torch.allclose(entropy_from_logits(torch.zeros(2, 1, 7)), torch.full((2, 1), math.log(7)), atol=1e-6)


def test_entropy_is_stable_for_huge_and_infinite_logits():
    logits = torch.tensor([[[1e4, 1e4, 1e4 - 1.0, -1e4], [1e4, 0.0, -1e4, -1e4], [0.0, 0.0, -math.inf, -math.inf]]])
    ref_logits = logits[0, :2].double()
    ref = -(ref_logits.softmax(-1) * ref_logits.log_softmax(-1)).sum(-1)
    logits.requires_grad_()
    got = entropy_from_logits(logits)  # (1, 3)
    assert torch.allclose(got[0, :2].double(), ref, rtol=0, atol=1e-6)
    assert got[0, 2].item() == pytest.approx(math.log(2), abs=1e-7)  # two equal tokens, two banned ones
    got.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[0, 2, 2:], torch.zeros(2))
    assert masked_mean(got, torch.tensor([[1, 0, 1]])).isfinite()


def test_explained_variance_hand_computed():
    # returns [1, 2, 3, 4] (pop. var 1.25); error [0, 0, 0, -1] (pop. var 0.1875) -> 1 - 0.15 = 0.85
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]], dtype=F64)
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0, -99.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.85, abs=1e-14)
    assert explained_variance(returns, returns, mask).item() == 1.0
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0, abs=1e-14)
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask).item())
