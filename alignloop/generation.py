"""Batched sampling from a causal LM into a `Rollout` (knows nothing of rewards or losses).

Our own decoding loop rather than `model.generate`, so that the rollout carries the per-token
log-probabilities PPO checks against its training forward, and so that masking, positions and
stopping are ours to test. Prompts are left-padded so every row's next token sits in the same
column; position ids count real tokens only, so a padded prompt sees the same logits as the prompt
alone. One prefill forward over the prompts fills the KV cache (`past_key_values`, a
`DynamicCache` in transformers 5), then each step feeds one token per row and grows the attention
mask by one column. A row ends at EOS or at the token that completes a stop string; everything
after is padding with mask 0, and the loop exits as soon as every row has ended.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignloop import llama_decode
from alignloop.config import GenConfig
from alignloop.models import accepts_logits_to_keep
from alignloop.tensors import logprobs_of, position_ids_from_mask


@dataclass
class Rollout:
    """Sampled responses: row i answers prompt `prompt_index[i]`. All tensors are on the CPU."""

    prompt_ids: torch.Tensor
    """(N, P) long: prompt tokens, left-padded with the pad id."""
    prompt_mask: torch.Tensor
    """(N, P) long: 1 on real prompt tokens."""
    response_ids: torch.Tensor
    """(N, R) long: sampled tokens, right-padded with the pad id after the row ended."""
    response_mask: torch.Tensor
    """(N, R) long: 1 on sampled tokens up to and including the EOS / stop-string-completing token."""
    prompt_index: torch.Tensor
    """(N,) long: which prompt each row answers (each prompt's `num_samples` rows are adjacent)."""
    ended: torch.Tensor
    """(N,) bool: True when the response ended with EOS or a stop string (False: cut at max_new_tokens)."""
    logprobs: torch.Tensor
    """(N, R) float32: log pi(token | prompt, earlier tokens) of each sampled token under the model's own
    distribution, softmax of the raw logits at temperature 1 with no top-k / top-p filtering, whatever
    `GenConfig` sampled with; it equals the sampling distribution only at T=1, top_k=0, top_p=1. 0 where
    `response_mask` is 0. PPO uses it only to check its training forward (ratio = 1)."""


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (N, P) ids and mask, padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------
# Pure sampling helpers


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set logits below the k-th largest of each row to -inf (ties with it are kept): (B, V) -> (B, V).

    `top_k <= 0` (or >= V) keeps everything.
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches `top_p`,
    -inf elsewhere: (B, V) -> (B, V). A token is kept when the tokens strictly ahead of it in the sorted
    order hold less than `top_p`, so the most likely token always survives; `top_p >= 1` keeps all."""
    if top_p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)  # (B, V)
    mass_ahead = probs.cumsum(dim=-1) - probs  # (B, V)
    drop = torch.zeros_like(mass_ahead, dtype=torch.bool).scatter(-1, order, mass_ahead >= top_p)
    return logits.masked_fill(drop, float("-inf"))


def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits whose softmax is the sampling distribution: divide by `temperature` (> 0), then top-k,
    then top-p on the tempered distribution (the order `transformers` uses): (B, V) -> (B, V)."""
    return filter_top_p(filter_top_k(logits.float() / temperature, top_k), top_p)


def sample_next_tokens(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One token per row: argmax when `temperature == 0` (the generator is untouched), else a draw
    from `softmax(sampling_logits(...))` with `generator`: (B, V) -> (B,).

    The draw inverts the cumulative distribution with one uniform per row (float64 sums, so the tail keeps
    its mass); `torch.multinomial` spends one exponential variate per vocabulary entry, which on a CPU
    costs more than a small model's whole decode step. A token of probability 0 is never drawn.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    cdf = sampling_logits(logits, temperature, top_k, top_p).softmax(dim=-1).double().cumsum(dim=-1)  # (B, V)
    u = torch.rand((logits.shape[0], 1), generator=generator, dtype=torch.float64, device=logits.device)  # (B, 1)
    drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1): first index whose cdf exceeds u
    return drawn.clamp(max=logits.shape[-1] - 1).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# The decoding loop


StepListener = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
"""Called after each sampling step with, for the rows still generating, their row index in the rollout,
the token just drawn (EOS included) and whether the row has now ended (EOS or a stop string); (A,) each."""


@dataclass
class _Chunk:
    """One batch's sampled part of a Rollout (tensors on the CPU)."""

    tokens: torch.Tensor  # (B, S) S = steps taken
    mask: torch.Tensor  # (B, S)
    logprobs: torch.Tensor  # (B, S)
    ended: torch.Tensor  # (B,)


def _check_config(cfg: GenConfig) -> None:
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.num_samples < 1:
        raise ValueError("generation: max_new_tokens, batch_size and num_samples must be >= 1")
    if cfg.temperature < 0 or cfg.top_k < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError("generation: need temperature >= 0, top_k >= 0 and 0 < top_p <= 1")


class _TransformersStepper:
    """The model's own forward with its `DynamicCache`: any causal LM (the fallback backend)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.cache, self.mask = model, None, torch.zeros(0)
        self.extra: dict[str, Any] = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.mask = mask
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
                         **self.extra)
        self.cache = out.past_key_values
        return out.logits[:, -1]  # (B, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)  # (B, T + 1)
        position = self.mask.sum(dim=1, keepdim=True) - 1  # (B, 1) = position_ids_from_mask(mask)[:, -1:]
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=position,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]  # (B, V)


def _stepper(model: torch.nn.Module, batch: int, max_len: int, weights: llama_decode.DecodeWeights | None) -> Any:
    """Our preallocated-cache Llama forward over `weights` where it applies, else the model's own."""
    if weights is not None:
        return llama_decode.LlamaDecoder(model, batch, max_len, weights)
    return _TransformersStepper(model)


def _decode_chunk(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cfg: GenConfig,
    generator: torch.Generator,
    weights: llama_decode.DecodeWeights | None,
    on_step: StepListener | None = None,
    first_row: int = 0,
) -> _Chunk:
    """Sample up to `cfg.max_new_tokens` for one left-padded batch, reusing the KV cache.

    Rows that have ended still draw (then get the pad id), so the random stream, and with it every
    other row's sample, does not depend on when a row stopped.
    """
    device = generator.device
    mask = prompt_mask.to(device)  # (B, P)
    batch, steps = mask.shape[0], cfg.max_new_tokens
    tokens = torch.full((batch, steps), tokenizer.pad_token_id, dtype=torch.long, device=device)  # (B, R)
    alive = torch.zeros((batch, steps), dtype=torch.bool, device=device)  # (B, R)
    logprobs = torch.zeros((batch, steps), dtype=torch.float32, device=device)  # (B, R)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,)
    stepper = _stepper(model, batch, mask.shape[1] + steps, weights)
    next_logits = stepper.prefill(prompt_ids.to(device), mask)  # (B, V)
    for step in range(steps):
        logits = next_logits.float()  # (B, V)
        drawn = sample_next_tokens(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)  # (B,)
        alive[:, step] = ~ended
        tokens[:, step] = torch.where(ended, tokenizer.pad_token_id, drawn)
        logprobs[:, step] = torch.where(ended, 0.0, logprobs_of(logits[:, None], drawn[:, None])[:, 0])
        stopped = drawn == tokenizer.eos_token_id  # (B,)
        if cfg.stop_strings:
            rows = (~ended).nonzero().flatten().tolist()
            texts = tokenizer.batch_decode(tokens[rows, : step + 1].tolist(), skip_special_tokens=False)
            hits = [any(stop in text for stop in cfg.stop_strings) for text in texts]
            stopped[rows] |= torch.tensor(hits, device=device)
        ended |= stopped
        if on_step is not None:
            rows = alive[:, step].nonzero().flatten()  # (A,)
            on_step((rows + first_row).cpu(), tokens[rows, step].cpu(), ended[rows].cpu())
        if step + 1 == steps or bool(ended.all()):
            break
        next_logits = stepper.step(tokens[:, step])
    taken = step + 1
    return _Chunk(tokens[:, :taken].cpu(), alive[:, :taken].long().cpu(), logprobs[:, :taken].cpu(), ended.cpu())


def _pad_to(t: torch.Tensor, width: int, value: float, left: bool = False) -> torch.Tensor:
    """Pad the last dimension of (B, T) to `width` on the right (or left)."""
    gap = width - t.shape[-1]
    return torch.nn.functional.pad(t, (gap, 0) if left else (0, gap), value=value)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    cfg: GenConfig,
    *,
    seed: int | None = None,
    on_step: StepListener | None = None,
) -> Rollout:
    """Sample `cfg.num_samples` responses for each tokenised prompt, `cfg.batch_size` rows per batch.

    The model runs in eval mode on its own device; its training mode is restored afterwards. A row
    stops at EOS or at the token whose addition makes the decoded response (special tokens kept)
    contain one of `cfg.stop_strings`; that token is kept in the mask. `on_step`, when given, hears
    every sampled token as it is drawn (for streaming); an exception it raises stops generation.
    """
    _check_config(cfg)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generation: need at least one prompt, and no empty prompt")
    device = next(model.parameters()).device
    # An explicit generator: a given seed leaves the global RNG alone; without one, the seed is drawn
    # from the global RNG so that a caller who seeds globally stays reproducible.
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = [i for i in range(len(prompts)) for _ in range(cfg.num_samples)]
    batches: list[tuple[torch.Tensor, torch.Tensor, _Chunk]] = []
    was_training = model.training
    model.eval()
    ours = cfg.backend == "auto" and llama_decode.supports(model)
    try:
        with llama_decode.decode_weights(model) if ours else nullcontext() as weights:
            for start in range(0, len(rows), cfg.batch_size):
                ids, mask = left_pad([prompts[i] for i in rows[start : start + cfg.batch_size]], tokenizer.pad_token_id)
                chunk = _decode_chunk(model, tokenizer, ids, mask, cfg, generator, weights, on_step, start)
                batches.append((ids, mask, chunk))
    finally:
        model.train(was_training)
    prompt_width = max(ids.shape[1] for ids, _, _ in batches)
    width = max(chunk.tokens.shape[1] for _, _, chunk in batches)
    return Rollout(
        prompt_ids=torch.cat([_pad_to(ids, prompt_width, tokenizer.pad_token_id, left=True) for ids, _, _ in batches]),
        prompt_mask=torch.cat([_pad_to(mask, prompt_width, 0, left=True) for _, mask, _ in batches]),
        response_ids=torch.cat([_pad_to(c.tokens, width, tokenizer.pad_token_id) for _, _, c in batches]),
        response_mask=torch.cat([_pad_to(c.mask, width, 0) for _, _, c in batches]),
        prompt_index=torch.tensor(rows, dtype=torch.long),
        ended=torch.cat([c.ended for _, _, c in batches]),
        logprobs=torch.cat([_pad_to(c.logprobs, width, 0.0) for _, _, c in batches]),
    )


def decode_responses(rollout: Rollout, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Response texts without padding, EOS or special tokens."""
    kept = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)]
    return [text.strip() for text in tokenizer.batch_decode(kept, skip_special_tokens=True)]
