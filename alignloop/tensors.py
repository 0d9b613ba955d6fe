"""Pure tensor helpers shared by the losses and trainers (torch only)."""

from __future__ import annotations

import torch


def exact_div(a: int, b: int, what: str = "") -> int:
    """a / b as an int, or a ValueError when b does not divide a (derived sizes must be exact)."""
    if b <= 0 or a % b != 0:
        raise ValueError(f"{what or 'value'}: {a} is not divisible by {b}")
    return a // b


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Log-probability of `tokens` under `logits`: (B, T, V), (B, T) -> (B, T).

    Gathers the token logit and subtracts the logsumexp, in chunks of rows, so no full-vocabulary
    float32 log_softmax copy of the whole batch is ever materialised.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    flat_tokens = tokens.reshape(-1)  # (B*T,)
    out = torch.empty(flat_tokens.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, flat_tokens.shape[0], chunk_size):
        rows = flat_logits[start : start + chunk_size].float()  # (C, V)
        picked = rows.gather(-1, flat_tokens[start : start + chunk_size, None]).squeeze(-1)  # (C,)
        out[start : start + chunk_size] = picked - torch.logsumexp(rows, dim=-1)
    return out.view(tokens.shape)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of `values` where `mask` is true (mask broadcastable to values)."""
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is true; 0 when the mask is empty."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over masked positions (Bessel-corrected by default)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    count = mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / count.clamp(min=1)
    if unbiased:
        var = var * count / (count - 1).clamp(min=1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over masked positions; masked-out positions are left as 0."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def first_true_index(mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Index of the first True along `dim`, or the size of `dim` when there is none: (B, T) -> (B,)."""
    size = mask.shape[dim]
    positions = torch.arange(size, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.full_like(positions, size)).min(dim=dim).values


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True in each row (the last real token under left or right padding): (B, T) -> (B,)."""
    width = mask.shape[-1]
    return width - 1 - first_true_index(mask.bool().flip(-1))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so left-padded rows see the same positions as right-padded ones."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def pack_shared_prefix(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Each pair of token lists as one right-padded row: their common prefix once, then the rest of the first,
    then the rest of the second, with a mask under which each rest sees the prefix and itself only.

    For a causal decoder this is exact (a prefix's states never depend on what follows) and the shared prompt
    of a comparison is computed once instead of twice. The common prefix stops at least one token before the
    end of either list, so both last tokens are in their own part. Returns input_ids and position_ids (B, T),
    a boolean attention_mask (B, 1, T, T) (True: may attend; a padding query sees itself, so softmax stays
    defined), the index of each side's last token `first_last`, `second_last` (B,) and `real` (B, T).
    """
    rows, positions, segments, first_last, second_last = [], [], [], [], []
    for first, second in pairs:
        shared = 0
        limit = min(len(first), len(second)) - 1
        while shared < limit and first[shared] == second[shared]:
            shared += 1
        rows.append(first + second[shared:])
        positions.append(list(range(len(first))) + list(range(shared, len(second))))
        segments.append([0] * shared + [1] * (len(first) - shared) + [2] * (len(second) - shared))
        first_last.append(len(first) - 1)
        second_last.append(len(first) + len(second) - shared - 1)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    for i, (r, p, s) in enumerate(zip(rows, positions, segments, strict=True)):
        ids[i, : len(r)], pos[i, : len(r)], seg[i, : len(r)] = torch.tensor(r), torch.tensor(p), torch.tensor(s)
    query, key = seg[:, :, None], seg[:, None, :]  # (B, T, 1), (B, 1, T)
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # (T, T)
    allowed = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))  # (B, T, T)
    allowed |= torch.eye(width, dtype=torch.bool)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": allowed[:, None], "real": seg >= 0,
            "first_last": torch.tensor(first_last), "second_last": torch.tensor(second_last)}
