"""Reward sources. Every source maps (prompts, responses) to one score per response.

A reward model is a sequence classifier whose score is read at the last real token (so left and
right padding give the same score); an ensemble is one backbone with K heads, whose mean is the
reward and whose spread is its uncertainty.
"""

from __future__ import annotations

import torch

from alignloop.tensors import last_true_index, position_ids_from_mask


def _decoder_backbone(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformer under a causal-LM sequence classifier (`model.model` with a `score` head), else None."""
    if hasattr(model, "score") and hasattr(model, "base_model"):
        return model.base_model  # type: ignore[return-value]
    return None


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head outputs at each row's last real token: (B, T) -> (B, K) with K = number of heads.

    Decoder backbones are run with position ids counted over real tokens and read at the last non-pad
    index from the attention mask (never from pad ids: pad may equal EOS, which ends every response).
    Encoders (BERT-like) keep their own pooling and must be fed right-padded input.
    """
    backbone = _decoder_backbone(model)
    if backbone is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, K)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state  # (B, T, H)
    last = last_true_index(attention_mask)  # (B,)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
    return model.score(picked)  # (B, K)
