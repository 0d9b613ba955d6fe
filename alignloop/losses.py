"""Pure loss functions (torch only). Each takes log-probs and masks, never a model, and returns
`(loss, stats)` with stats named exactly as they are logged."""

from __future__ import annotations

import torch


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
