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
