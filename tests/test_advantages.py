"""Advantage math against hand-computed values and float64 loop references."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

import alignloop.advantages
import alignloop.losses
import alignloop.tensors
from alignloop.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    kl_penalty,
    rloo_advantages,
    token_rewards,
)
from alignloop.tensors import masked_mean, masked_var, masked_whiten

F64 = torch.float64


def gae_reference(
    rewards: list[float], values: list[float], length: int, gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """One right-padded row, as a plain loop: the episode ends after `length` tokens (no bootstrap)."""
    advantages = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    returns = [a + v if t < length else 0.0 for t, (a, v) in enumerate(zip(advantages, values, strict=True))]
    return advantages, returns


def random_right_padded(batch: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(batch, width, generator=g, dtype=F64)
    values = torch.randn(batch, width, generator=g, dtype=F64)
    lengths = torch.randint(0, width + 1, (batch,), generator=g)
    lengths[0] = width  # at least one full row
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, T)
    return rewards, values, mask


# --- GAE -------------------------------------------------------------------------------------------


def test_gae_hand_computed_single_row():
    # gamma = lam = 0.5 (gamma * lam = 0.25); 3 real tokens then one pad (whose 9.0 / 7.0 are ignored).
    # t=2: delta = 1.0 + 0.5 * 0   - 0.2 =  0.8   A =  0.8
    # t=1: delta = 0.0 + 0.5 * 0.2 - 0.4 = -0.3   A = -0.3 + 0.25 * 0.8    = -0.1
    # t=0: delta = 0.0 + 0.5 * 0.4 - 0.5 = -0.3   A = -0.3 + 0.25 * (-0.1) = -0.325
    # returns = A + V = [0.175, 0.3, 1.0] and 0 at the pad.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.4, 0.2, 7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    assert torch.allclose(adv, torch.tensor([[-0.325, -0.1, 0.8, 0.0]], dtype=F64), rtol=0, atol=1e-15)
    assert torch.allclose(ret, torch.tensor([[0.175, 0.3, 1.0, 0.0]], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.7, 0.0), (1.0, 1.0)])
def test_gae_matches_loop_reference_on_random_batches(gamma: float, lam: float):
    rewards, values, mask = random_right_padded(batch=6, width=9, seed=int(gamma * 100 + lam * 10))
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i in range(rewards.shape[0]):
        ref_adv, ref_ret = gae_reference(rewards[i].tolist(), values[i].tolist(), int(mask[i].sum()), gamma, lam)
        assert torch.allclose(adv[i], torch.tensor(ref_adv, dtype=F64), rtol=0, atol=1e-12)
        assert torch.allclose(ret[i], torch.tensor(ref_ret, dtype=F64), rtol=0, atol=1e-12)


def test_gae_gamma_lam_one_gives_sum_of_future_rewards():
    rewards, values, mask = random_right_padded(batch=5, width=8, seed=3)
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    future = (rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask  # (B, T) sum_{k >= t} r_k
    assert torch.allclose(ret, future, rtol=0, atol=1e-12)


def test_gae_padding_is_exactly_zero_and_inert():
    rewards, values, mask = random_right_padded(batch=6, width=7, seed=4)
    adv, ret = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    pad = mask == 0
    assert pad.any()
    assert torch.equal(adv[pad], torch.zeros_like(adv[pad]))
    assert torch.equal(ret[pad], torch.zeros_like(ret[pad]))
    noise = torch.randn(rewards.shape, generator=torch.Generator().manual_seed(5), dtype=F64) * 1e3
    adv2, ret2 = gae(torch.where(pad, noise, rewards), torch.where(pad, -noise, values), mask, 0.99, 0.95)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_gae_left_padding_gives_the_same_per_token_result():
    rewards, values, mask = random_right_padded(batch=5, width=6, seed=6)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    lengths = mask.sum(-1)
    shift = [6 - int(n) for n in lengths]  # roll each row so its real tokens sit at the right
    left = [torch.stack([x[i].roll(s) for i, s in enumerate(shift)]) for x in (rewards, values, mask)]
    adv_l, ret_l = gae(*left, 0.9, 0.8)
    for i, s in enumerate(shift):
        assert torch.allclose(adv_l[i].roll(-s), adv[i], rtol=0, atol=1e-12)
        assert torch.allclose(ret_l[i].roll(-s), ret[i], rtol=0, atol=1e-12)


def test_gae_skips_masked_holes_inside_a_row():
    """A masked position between real tokens (e.g. an environment token) is skipped, not an episode end."""
    rewards = torch.tensor([[0.3, 50.0, -0.2, 1.0]], dtype=F64)
    values = torch.tensor([[0.1, -50.0, 0.4, 0.7]], dtype=F64)
    adv, ret = gae(rewards, values, torch.tensor([[1, 0, 1, 1]]), 0.9, 0.8)
    compact_adv, compact_ret = gae(rewards[:, [0, 2, 3]], values[:, [0, 2, 3]], torch.ones(1, 3), 0.9, 0.8)
    assert torch.equal(adv[:, [0, 2, 3]], compact_adv) and adv[0, 1].item() == 0.0
    assert torch.equal(ret[:, [0, 2, 3]], compact_ret) and ret[0, 1].item() == 0.0


def test_gae_outputs_carry_no_gradient():
    values = torch.zeros(2, 3, requires_grad=True)
    adv, ret = gae(torch.ones(2, 3), values, torch.ones(2, 3), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


# --- whitening (as used on advantages) -------------------------------------------------------------


def test_masked_whiten_unit_variance_and_shift_mean_false():
    rewards, _, mask = random_right_padded(batch=4, width=6, seed=7)
    values = rewards * 3.0 + 2.0
    w = masked_whiten(values, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-6)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(values, mask).item(), rel=1e-12)
    assert torch.equal(kept[mask == 0], torch.zeros_like(kept[mask == 0]))


# --- KL estimators ---------------------------------------------------------------------------------


def test_kl_estimators_hand_computed():
    # token 0: p = 0.5, p_ref = 0.25 -> log r = -log 2; token 1: p = 0.25, p_ref = 0.5 -> log r = log 2
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]], dtype=F64)
    ref = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=F64)
    ln2 = math.log(2)
    expected = {
        "k1": [ln2, -ln2],
        "k2": [0.5 * ln2**2, 0.5 * ln2**2],
        "k3": [0.5 - 1 + ln2, 2 - 1 - ln2],  # r - 1 - log r
    }
    for name, values in expected.items():
        got = kl_penalty(logp, ref, name)  # type: ignore[arg-type]
        assert torch.allclose(got, torch.tensor([values], dtype=F64), rtol=0, atol=1e-15), name
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_and_k3_is_nonnegative():
    g = torch.Generator().manual_seed(8)
    logp = torch.log_softmax(torch.randn(7, generator=g, dtype=F64), -1)  # a policy over 7 tokens
    ref = torch.log_softmax(torch.randn(7, generator=g, dtype=F64), -1)
    exact_kl = (logp.exp() * (logp - ref)).sum()
    for name in ("k1", "k3"):
        expectation = (logp.exp() * kl_penalty(logp[None], ref[None], name)[0]).sum()  # type: ignore[arg-type]
        assert expectation.item() == pytest.approx(exact_kl.item(), abs=1e-12), name
    a = torch.randn(1000, generator=g) * 5
    near = torch.cat([a, a + 1e-7, a + torch.randn(1000, generator=g) * 1e-4])
    assert (kl_penalty(near[None], torch.cat([a, a, a])[None], "k3") >= 0).all()


# --- token rewards ---------------------------------------------------------------------------------


def test_token_rewards_score_at_last_real_token_with_no_eos_penalty():
    kl = torch.tensor(
        [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=F64
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]])  # row 2 left-padded; row 3 empty
    score = torch.tensor([2.0, 3.0, 5.0, 7.0], dtype=F64)
    ended = torch.tensor([True, False, True, False])
    rewards, kl_part = token_rewards(score, kl, mask, kl_coef=0.1, no_eos_penalty=1.5, ended=ended)
    expected_kl = torch.tensor(
        [[-0.1, -0.2, -0.3, 0.0], [-0.5, 0.0, 0.0, 0.0], [0.0, 0.0, -0.1, -0.1], [0.0, 0.0, 0.0, 0.0]], dtype=F64
    )
    expected = expected_kl.clone()
    expected[0, 2] += 2.0  # ended: the score as it is
    expected[1, 0] += 3.0 - 1.5  # truncated before EOS: score - no_eos_penalty
    expected[2, 3] += 5.0
    assert torch.allclose(kl_part, expected_kl, rtol=0, atol=1e-15)
    assert torch.allclose(rewards, expected, rtol=0, atol=1e-15)
    assert torch.equal(rewards[mask == 0], torch.zeros_like(rewards[mask == 0]))


def test_token_rewards_without_ended_applies_no_penalty():
    kl = torch.zeros(2, 3, dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, _ = token_rewards(torch.tensor([1.0, -1.0], dtype=F64), kl, mask, 0.2, no_eos_penalty=10.0)
    assert rewards.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, -1.0]]


# --- critic-free advantages ------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=F64)  # group 1: mean 2, sample std 1
    got = group_advantages(scores, group_size=3)
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=F64) / (1.0 + 1e-4)
    assert torch.allclose(got, expected, rtol=0, atol=1e-15)
    assert group_advantages(scores, 3, normalize_std=False).tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="not divisible"):
        group_advantages(scores, 4)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(scores, 1)


def test_rloo_advantages_match_leave_one_out_loop():
    assert rloo_advantages(torch.tensor([1.0, 2.0, 3.0], dtype=F64), 3).tolist() == [-1.5, 0.0, 1.5]
    scores = torch.randn(12, generator=torch.Generator().manual_seed(9), dtype=F64)
    got = rloo_advantages(scores, group_size=4)
    s = scores.tolist()
    for i in range(12):
        group = s[(i // 4) * 4 : (i // 4) * 4 + 4]
        others = [x for j, x in enumerate(group) if j != i % 4]
        assert got[i].item() == pytest.approx(s[i] - sum(others) / 3, abs=1e-12)


# --- KL controllers --------------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_computed_sequence():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # KL 9: error 0.5 clipped to 0.2; 500 samples -> x (1 + 0.2 * 0.05) = x 1.01
    assert ctl.update(9.0, n_steps=500) == pytest.approx(0.202, rel=1e-14)
    # KL 3: error -0.5 clipped to -0.2; 1000 samples -> x (1 - 0.2 * 0.1) = x 0.98
    assert ctl.update(torch.tensor(3.0), n_steps=1000) == pytest.approx(0.19796, rel=1e-14)
    # KL 6.6: error 0.1 (inside the clip); 10000 samples -> x 1.1
    assert ctl.update(6.6, n_steps=10_000) == pytest.approx(0.217756, rel=1e-14)
    # KL on target: unchanged
    assert ctl.update(6.0, n_steps=10_000) == pytest.approx(0.217756, rel=1e-14)
    assert ctl.value == pytest.approx(0.217756, rel=1e-14)


def test_kl_controllers_state_dict_round_trip_is_exact():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    for kl in (1.3, 7.7, 6.01, 12.0):
        ctl.update(kl, n_steps=64)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    resumed.load_state_dict(json.loads(json.dumps(ctl.state_dict())))  # through a JSON checkpoint
    assert resumed.value == ctl.value
    assert resumed.update(4.2, 64) == ctl.update(4.2, 64)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_pure_math_modules_import_only_torch_and_each_other():
    """Static twin of test_losses' subprocess check, covering advantages.py too, at no start-up cost."""
    allowed = {"__future__", "typing", "math", "torch", "alignloop.tensors"}
    for module in (alignloop.advantages, alignloop.losses, alignloop.tensors):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported <= allowed, (module.__name__, imported - allowed)
