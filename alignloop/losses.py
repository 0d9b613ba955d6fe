"""Pure loss functions (torch only). Each takes log-probs and masks, never a model, and returns
`(loss, stats)` with stats named exactly as they are logged."""

from __future__ import annotations

import torch

from alignloop.tensors import masked_mean, masked_var


def sft_nll(
    token_logprobs: torch.Tensor, loss_mask: torch.Tensor, num_loss_tokens: int | float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Prompt-masked negative log-likelihood: (B, T), (B, T), N -> scalar.

    Sums the NLL of response tokens and divides by `num_loss_tokens`, the count over the whole
    optimizer step (all micro-batches and ranks), so that micro-batch x accumulation and data-parallel
    splits of the same global batch give the same gradient (a per-micro-batch mean would not).
    """
    mask = loss_mask.to(token_logprobs.dtype)
    nll_sum = -(token_logprobs * mask).sum()
    return nll_sum / num_loss_tokens, {"sft/nll_sum": nll_sum.detach(), "sft/tokens": mask.sum().detach()}


def bradley_terry(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss -log sigmoid(r_c - r_r - m): (N,), (N,), (N,)?, (N,)? -> scalar.

    Bradley & Terry (1952); InstructGPT eq. 1 (Ouyang et al. 2022); the margin m is Llama 2's (Touvron
    et al. 2023, eq. 2). `weights` (summing to the number of pairs in the optimizer step, or any positive
    weights) let all C(K,2) pairs of one ranking count as one comparison.
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff - margin if margin is not None else diff
    per_pair = -torch.nn.functional.logsigmoid(logits)
    w = torch.ones_like(per_pair) if weights is None else weights
    loss = (per_pair * w).sum() / w.sum()
    stats = {
        "rm/accuracy": (diff > 0).float().mean().detach(),
        "rm/reward_gap": diff.mean().detach(),
    }
    return loss, stats


def reward_centering(rewards: torch.Tensor, coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Auxiliary loss coef * mean(r^2) that pins the reward's mean near zero: (N,) -> scalar.

    Eisenstein et al. 2023 ("Helping or Herding?"), eq. 3: BT is shift-invariant, so without it the
    offset of the reward drifts freely across runs and ensemble members.
    """
    loss = coef * rewards.pow(2).mean()
    return loss, {"rm/centering_loss": loss.detach(), "rm/reward_mean": rewards.mean().detach()}


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, masked mean over tokens: (B, T) x 4 -> scalar.

    Schulman et al. 2017, eq. 7, as a loss: max(-A r, -A clip(r, 1 - c, 1 + c)) per token. With
    `dual_clip` (Ye et al. 2020, eq. 5) the loss of a token with A < 0 is also capped at -dual_clip * A,
    so a huge ratio on a bad action cannot blow up the step. Padding may hold any log-prob (even -inf):
    it is replaced before the exp, so it gets an exactly zero gradient.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must exceed 1, got {dual_clip}")
    real = mask.bool()  # (B, T)
    log_ratio = torch.where(real, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    per_token = torch.maximum(unclipped, clipped)  # (B, T)
    dual_active = torch.zeros_like(real)
    if dual_clip is not None:
        cap = -dual_clip * advantages  # (B, T)
        dual_active = (advantages < 0) & (per_token > cap)
        per_token = torch.where(dual_active, cap, per_token)
    loss = masked_mean(torch.where(real, per_token, torch.zeros_like(per_token)), real)
    with torch.no_grad():
        stats = {
            "ppo/policy/clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), real),
            "ppo/policy/dual_clipfrac": masked_mean(dual_active.to(ratio.dtype), real),
            "ppo/policy/approxkl_k2": masked_mean(0.5 * log_ratio.square(), real),
            "ppo/policy/approxkl_k3": masked_mean(torch.expm1(log_ratio) - log_ratio, real),
            "ppo/policy/ratio_mean": masked_mean(ratio, real),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 max((v - R)^2, (clip(v, v_old +- c) - R)^2), masked mean: (B, T) x 4 -> scalar.

    The value clipping of OpenAI baselines' PPO2 (Dhariwal et al. 2017), as used by Ziegler et al. 2019:
    the critic moves at most c from the rollout's values before the loss stops pulling on it.
    """
    real = mask.bool()  # (B, T)
    clipped_values = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)  # (B, T)
    unclipped_sq = (values - returns).square()  # (B, T)
    clipped_sq = (clipped_values - returns).square()  # (B, T)
    per_token = 0.5 * torch.maximum(unclipped_sq, clipped_sq)  # (B, T)
    loss = masked_mean(torch.where(real, per_token, torch.zeros_like(per_token)), real)
    with torch.no_grad():
        stats = {
            "ppo/value/clipfrac": masked_mean((clipped_sq > unclipped_sq).to(values.dtype), real),
            "ppo/value/mse": masked_mean(unclipped_sq, real),
        }
    return loss, stats


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Entropy of the softmax over the last axis, H = logsumexp(z) - sum softmax(z) z: (B, T, V) -> (B, T).

    Shifting by the row max keeps every term small, so logits of 1e4 lose nothing to cancellation, and
    -inf logits (banned tokens) count as probability 0. Rows are processed in chunks, in float32, so no
    full-batch float32 copy of the vocabulary axis exists at once. Average it with
    `masked_mean(entropy_from_logits(logits), mask)`.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    parts = []
    for start in range(0, flat.shape[0], chunk_size):
        rows = flat[start : start + chunk_size].float()  # (C, V)
        shifted = rows - rows.max(dim=-1, keepdim=True).values.detach()  # (C, V), max 0
        probs = torch.softmax(shifted, dim=-1)  # (C, V)
        # 0 * -inf is NaN, in the forward and in the gradient: zero the logit first, not the product
        finite = torch.where(probs > 0, shifted, torch.zeros_like(shifted))  # (C, V)
        parts.append(torch.logsumexp(shifted, dim=-1) - (probs * finite).sum(dim=-1))  # (C,)
    return torch.cat(parts).view(logits.shape[:-1])


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over real tokens: (B, T) x 3 -> scalar; NaN when the returns are constant.

    1 means the critic predicts the returns exactly, 0 no better than their mean, < 0 worse than that.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_error = masked_var(returns - values, mask, unbiased=False)
    return torch.where(var_returns > 0, 1.0 - var_error / var_returns, torch.full_like(var_returns, float("nan")))
