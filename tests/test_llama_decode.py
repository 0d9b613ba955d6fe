"""The preallocated-cache Llama forward against transformers' own: logits at prefill and at every decode step
(left padding, grouped key/value heads, LoRA adapters, a pre-scaled rotary), and whole rollouts per backend."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignloop import llama_decode
from alignloop.config import GenConfig
from alignloop.generation import generate, left_pad, sample_next_tokens
from alignloop.tensors import position_ids_from_mask


def llama(kv_heads: int = 4, seed: int = 0, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2, **extra)
    return LlamaForCausalLM(config).eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def reference_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last-position logits of a full forward without cache, positions from the mask: (B, T) -> (B, V)."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False).logits[:, -1]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_prefill_and_every_step_match_a_full_forward(kv_heads):
    model = llama(kv_heads)
    ids, mask = left_pad(PROMPTS, 0)
    decoder = llama_decode.LlamaDecoder(model, len(PROMPTS), ids.shape[1] + 6)
    got = decoder.prefill(ids, mask)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        assert torch.allclose(got, reference_logits(model, ids, mask), atol=1e-5, rtol=0)
        nxt = torch.randint(3, 97, (len(PROMPTS),), generator=g)
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        got = decoder.step(nxt)
    assert torch.allclose(got, reference_logits(model, ids, mask), atol=1e-5, rtol=0)


def test_lora_adapters_are_applied():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    model.eval()
    assert llama_decode.supports(model)
    ids, mask = left_pad(PROMPTS, 0)
    got = llama_decode.LlamaDecoder(model, 3, ids.shape[1] + 1).prefill(ids, mask)
    assert torch.allclose(got, reference_logits(model, ids, mask), atol=1e-5, rtol=0)
    with model.disable_adapter():
        assert not torch.allclose(got, reference_logits(model, ids, mask), atol=1e-3)


def test_unsupported_architectures_and_rope_scalings_take_the_transformers_path():
    assert llama_decode.supports(llama())
    assert not llama_decode.supports(llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))
    assert not llama_decode.supports(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_backends_give_the_same_rollout(temperature):
    model = llama(2, seed=1)
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    cfg = dict(temperature=temperature, max_new_tokens=12, num_samples=2, batch_size=4)
    fast = generate(model, tok, PROMPTS, GenConfig(**cfg, backend="auto"), seed=3)
    slow = generate(model, tok, PROMPTS, GenConfig(**cfg, backend="transformers"), seed=3)
    assert torch.equal(fast.response_ids, slow.response_ids) and torch.equal(fast.response_mask, slow.response_mask)
    assert (fast.logprobs - slow.logprobs).abs().max() <= 1e-5


def test_inverse_cdf_draw_never_picks_a_zero_probability_token():
    logits = torch.tensor([[0.0, -float("inf"), 0.0, -float("inf")]]).expand(5000, 4)
    drawn = sample_next_tokens(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4)
    assert counts[1] == counts[3] == 0 and abs(int(counts[0]) - 2500) < 150


def test_weights_updated_in_place_by_a_fused_optimizer_are_seen_by_the_next_decoder():
    """Fused AdamW does not bump tensor versions, so nothing derived from the weights may outlive one decoder."""
    model = llama()
    ids, mask = left_pad(PROMPTS, 0)
    before = llama_decode.LlamaDecoder(model, 3, ids.shape[1] + 1).prefill(ids, mask)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
    optimizer.step()
    after = llama_decode.LlamaDecoder(model, 3, ids.shape[1] + 1).prefill(ids, mask)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, reference_logits(model, ids, mask), atol=1e-5, rtol=0)
