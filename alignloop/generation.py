"""Batched sampling from a causal LM into a `Rollout` (knows nothing of rewards or losses).

Prompts are left-padded so every row's next token sits at the same position; responses are
right-padded, and everything after a row's EOS (or stop string) is masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from alignloop.config import GenConfig
from alignloop.tensors import first_true_index


@dataclass
class Rollout:
    """Sampled responses: row i answers prompt `prompt_index[i]`."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P)
    response_ids: torch.Tensor  # (N, R) right-padded with pad_id
    response_mask: torch.Tensor  # (N, R) 1 on generated tokens up to and including EOS
    prompt_index: torch.Tensor  # (N,)
    ended: torch.Tensor  # (N,) True when the response ended with EOS or a stop string


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (N, P) ids and mask, padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    return ids, mask


def _hf_generation_config(cfg: GenConfig, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    greedy = cfg.temperature == 0
    return GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else cfg.temperature,
        top_p=None if greedy or cfg.top_p >= 1 else cfg.top_p,
        top_k=None if greedy or cfg.top_k <= 0 else cfg.top_k,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=list(cfg.stop_strings) or None,
        use_cache=True,
    )


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    cfg: GenConfig,
    *,
    seed: int | None = None,
) -> Rollout:
    """Sample `cfg.num_samples` responses for each tokenised prompt, in batches of `cfg.batch_size`."""
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen_config = _hf_generation_config(cfg, tokenizer)
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(cfg.num_samples)]
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start : start + cfg.batch_size]
        ids, mask = left_pad([p for _, p in chunk], tokenizer.pad_token_id)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config,
            tokenizer=tokenizer if cfg.stop_strings else None,
        )
        response = out[:, ids.shape[1] :].cpu()  # (n, R)
        parts.append((ids, mask, response, torch.tensor([i for i, _ in chunk])))
    model.train(was_training)
    width = max(p[2].shape[1] for p in parts)
    response_ids = torch.cat(
        [torch.nn.functional.pad(p[2], (0, width - p[2].shape[1]), value=tokenizer.pad_token_id) for p in parts]
    )
    prompt_width = max(p[0].shape[1] for p in parts)
    prompt_ids = torch.cat([torch.nn.functional.pad(p[0], (prompt_width - p[0].shape[1], 0), value=tokenizer.pad_token_id) for p in parts])
    prompt_mask = torch.cat([torch.nn.functional.pad(p[1], (prompt_width - p[1].shape[1], 0), value=0) for p in parts])
    response_mask, ended = _mask_after_end(response_ids, tokenizer, cfg.stop_strings)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.cat([p[3] for p in parts]), ended)


def _mask_after_end(
    response_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase, stop_strings: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask = 1 up to and including the first EOS (or the token completing a stop string)."""
    is_eos = response_ids == tokenizer.eos_token_id  # (N, R)
    end = first_true_index(is_eos)  # (N,)
    if stop_strings:
        for row in range(response_ids.shape[0]):
            text = ""
            for t in range(int(end[row].item())):
                text += tokenizer.decode(response_ids[row, t : t + 1])
                if any(s in text for s in stop_strings):
                    end[row] = t
                    break
    width = response_ids.shape[1]
    ended = end < width
    positions = torch.arange(width).expand_as(response_ids)
    mask = (positions <= end[:, None]) & (positions < width)
    return mask.long(), ended


def decode_responses(rollout: Rollout, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Response texts without padding, EOS or special tokens."""
    texts = []
    for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True):
        kept = ids[mask.bool()].tolist()
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts
