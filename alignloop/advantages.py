"""Pure advantage math for RL from feedback (torch only): per-token KL, KL-penalised rewards, GAE,
critic-free group advantages and the KL-coefficient controllers.

Conventions shared by every function here. Tensors of shape (B, T) cover the response tokens only,
aligned so that position t holds the quantity for response token t; `mask` is 1 at real response
tokens and 0 at padding (right or left). The episode of a row ends at its last real token.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from alignloop.tensors import exact_div, last_true_index

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens: (B, T), (B, T) -> (B, T).

    Schulman (2020), "Approximating KL divergence", with r = p_ref / p_policy: k1 = -log r (unbiased,
    can be negative), k2 = 0.5 (log r)^2 (low variance, biased), k3 = (r - 1) - log r (unbiased and >= 0).
    k3 uses expm1 so that it stays exact near r = 1 and never rounds below zero.
    """
    log_ratio = ref_logprobs - logprobs  # (B, T) log r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def token_rewards(
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    *,
    no_eos_penalty: float = 0.0,
    ended: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-penalised per-token rewards: score (B,), kl (B, T), mask (B, T) -> rewards, kl_rewards (B, T).

    Ziegler et al. 2019, eq. 2; Stiennon et al. 2020, eq. 1: every response token earns -kl_coef * kl
    and the last real token also earns the sequence score. Rows whose `ended` is False (truncated
    before EOS) score `score - no_eos_penalty`, a subtraction rather than a replacement by a constant,
    so unfinished rows keep their order. Padding earns 0; a row with no real token earns nothing.
    The second output is the KL part alone (for logging as the non-score reward).
    """
    real = mask.bool()  # (B, T)
    kl_rewards = torch.where(real, -kl_coef * kl, torch.zeros_like(kl))  # (B, T)
    final = score.to(kl_rewards.dtype)  # (B,)
    if ended is not None:
        final = final - no_eos_penalty * (~ended.bool()).to(final.dtype)
    has_token = real.any(dim=-1)  # (B,)
    last = last_true_index(real).clamp(min=0)  # (B,)
    score_part = torch.zeros_like(kl_rewards).scatter(
        -1, last[:, None], torch.where(has_token, final, torch.zeros_like(final))[:, None]
    )  # (B, T)
    return kl_rewards + score_part, kl_rewards


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation: rewards, values, mask (B, T) -> advantages, returns (B, T).

    Schulman et al. 2016, eq. 16, as a reverse scan over time, vectorised over the batch. Masked
    positions are skipped: they get 0 advantage and 0 return, and the recursion carries over them,
    so the value after a row's last real token is 0 (the episode ends there; no bootstrap) and
    whatever rewards or values sit at padding change nothing. Returns = advantages + values
    (the critic's target). Computed without gradient: these are targets, not predictions.
    """
    real = mask.bool()  # (B, T)
    advantages = torch.zeros_like(values)  # (B, T)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V(s_{t+1}) of the next real token
    next_adv = torch.zeros_like(values[:, 0])  # (B,) A_{t+1} of the next real token
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = delta + gamma * lam * next_adv  # (B,)
        advantages[:, t] = torch.where(real[:, t], adv, torch.zeros_like(adv))
        next_value = torch.where(real[:, t], values[:, t], next_value)
        next_adv = torch.where(real[:, t], adv, next_adv)
    returns = torch.where(real, advantages + values, torch.zeros_like(values))  # (B, T)
    return advantages, returns


def group_advantages(
    scores: torch.Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO outcome advantages (score - group mean) / (group std + eps): (N,) -> (N,).

    Shao et al. 2024 (DeepSeekMath), section 4.1.2. `scores` holds consecutive groups of `group_size`
    samples of the same prompt. The std is Bessel-corrected; `normalize_std=False` keeps only the
    mean baseline (Liu et al. 2025, Dr. GRPO), which avoids up-weighting near-constant groups.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}")
    groups = scores.view(exact_div(scores.numel(), group_size, "number of scores"), group_size)  # (G, K)
    centred = groups - groups.mean(dim=-1, keepdim=True)  # (G, K)
    if normalize_std:
        centred = centred / (groups.std(dim=-1, keepdim=True) + eps)
    return centred.reshape(scores.shape)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages r_i - mean_{j != i} r_j: (N,) -> (N,).

    Kool et al. 2019; Ahmadian et al. 2024, eq. 6. Consecutive groups of `group_size` samples per prompt.
    Equal to K / (K - 1) * (r_i - group mean), which is how it is computed.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}")
    groups = scores.view(exact_div(scores.numel(), group_size, "number of scores"), group_size)  # (G, K)
    centred = groups - groups.mean(dim=-1, keepdim=True)  # (G, K)
    return (centred * (group_size / (group_size - 1))).reshape(scores.shape)


class AdaptiveKLController:
    """KL coefficient steered towards a target KL (Ziegler et al. 2019, section 2.2).

    error = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + error * n_steps / horizon, where n_steps is
    the number of samples (episodes) the KL was measured on, as in lm-human-preferences.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target} and {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        """Move the coefficient after `n_steps` samples whose mean KL was `current_kl`; return it."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient exactly; the run's target and horizon are kept, as the config sets them."""
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient, with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
