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
    with llama_decode.decode_weights(model) as weights:
        decoder = llama_decode.LlamaDecoder(model, len(PROMPTS), ids.shape[1] + 6, weights)
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
    with llama_decode.decode_weights(model) as weights:
        got = llama_decode.LlamaDecoder(model, 3, ids.shape[1] + 1, weights).prefill(ids, mask)
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
    with llama_decode.decode_weights(model) as weights:
        before = llama_decode.LlamaDecoder(model, 3, ids.shape[1] + 1, weights).prefill(ids, mask)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
    optimizer.step()
    with llama_decode.decode_weights(model) as weights:
        after = llama_decode.LlamaDecoder(model, 3, ids.shape[1] + 1, weights).prefill(ids, mask)
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, reference_logits(model, ids, mask), atol=1e-5, rtol=0)


def _matrices(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.dim() == 2}


def test_decoding_borrows_the_weights_in_place_and_gives_them_back_unchanged():
    """No second copy of the model while generating: each projection becomes a view of its fused (in, out)
    matrix, and after the call (also one that raised) it is a contiguous (out, in) tensor again, bit for bit."""
    model = llama(2, seed=4)
    before = {name: p.detach().clone() for name, p in _matrices(model).items()}
    params = _matrices(model)
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    seen: list[tuple[bool, bool, bool]] = []

    def look(*_):
        attn = model.model.layers[1].self_attn
        shared = attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
        seen.append((attn.q_proj.weight.is_contiguous(), shared, model.lm_head.weight.is_contiguous()))

    cfg = GenConfig(temperature=1.0, max_new_tokens=4, num_samples=1, batch_size=2)
    generate(model, tok, PROMPTS, cfg, seed=0, on_step=look)
    assert seen and all(view == (False, True, False) for view in seen)  # q, k, v in one buffer while decoding
    for name, p in _matrices(model).items():
        assert p is params[name] and p.is_contiguous() and torch.equal(p, before[name]), name
    assert all(p.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
               for a, p in _matrices(model).items() for b, q in _matrices(model).items() if a < b)

    def fail(*_):
        raise RuntimeError("listener gave up")

    with pytest.raises(RuntimeError, match="gave up"):
        generate(model, tok, PROMPTS, cfg, seed=0, on_step=fail)
    for name, p in _matrices(model).items():
        assert p.is_contiguous() and torch.equal(p, before[name]), name


def test_tied_embeddings_and_weights_that_are_views_decode_right():
    """A tied LM head is the embedding matrix (laid out once, read by both); a weight that is a view of a larger
    storage (as under FSDP) is copied, not moved, and left exactly as it was."""
    model = llama(2, seed=5, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    flat = torch.cat([p.detach().flatten() for p in (model.model.layers[0].self_attn.q_proj.weight,
                                                      model.model.layers[0].self_attn.k_proj.weight)])
    q = model.model.layers[0].self_attn.q_proj.weight
    q.data = flat[: q.numel()].view_as(q)  # q now a view into `flat`
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    cfg = dict(temperature=1.0, max_new_tokens=8, num_samples=2, batch_size=4)
    fast = generate(model, tok, PROMPTS, GenConfig(**cfg, backend="auto"), seed=2)
    slow = generate(model, tok, PROMPTS, GenConfig(**cfg, backend="transformers"), seed=2)
    assert torch.equal(fast.response_ids, slow.response_ids)
    assert (fast.logprobs - slow.logprobs).abs().max() <= 1e-5
    assert q.data.data_ptr() == flat.data_ptr() and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.is_contiguous()


def test_training_after_generation_is_training_without_it():
    """The borrowed layout is fully given back: a fused AdamW step after a generate call matches the same step
    on a twin model that never generated, exactly."""
    twins = [llama(2, seed=6), llama(2, seed=6)]
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    generate(twins[0], tok, PROMPTS, GenConfig(temperature=1.0, max_new_tokens=5, num_samples=2, batch_size=4), seed=1)
    ids, mask = left_pad(PROMPTS, 0)
    for model in twins:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
        model(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
        optimizer.step()
    for (name, a), (_, b) in zip(twins[0].named_parameters(), twins[1].named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_failure_while_laying_out_leaves_the_model_as_it_was(monkeypatch):
    """Out of memory part-way through (here: the fifth fused matrix) must not leave weights as views."""
    model = llama(2, seed=7)
    before = {name: p.detach().clone() for name, p in _matrices(model).items()}
    real, calls = llama_decode._fused, []

    def fail_on_fifth(group, relay, dtype):
        calls.append(relay)
        if len(calls) == 5:
            raise MemoryError("no room for the fused matrix")
        return real(group, relay, dtype)

    monkeypatch.setattr(llama_decode, "_fused", fail_on_fifth)
    with pytest.raises(MemoryError):
        llama_decode.DecodeWeights(model)
    assert calls[:4] == [True] * 4  # the first layer had been moved
    for name, p in _matrices(model).items():
        assert p.is_contiguous() and torch.equal(p, before[name]), name


def test_under_autocast_the_matrices_are_cast_once_per_call_and_give_the_same_logits():
    """bf16 autocast: the fused matrices are bf16 copies made when the call starts (autocast would otherwise
    cast every weight again at every decode step), the model's own weights stay where and what they were, and
    the logits are exactly those of products that autocast casts itself."""
    model = llama(2, seed=5)
    ids, mask = left_pad(PROMPTS, 0)
    values = {name: p.detach().clone() for name, p in _matrices(model).items()}
    with llama_decode.decode_weights(model) as per_step:  # built outside autocast: float32, cast by every product
        assert per_step.lm_head is not None and per_step.lm_head.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = llama_decode.LlamaDecoder(model, 3, ids.shape[1] + 1, per_step).prefill(ids, mask)
    addresses = {name: p.data_ptr() for name, p in _matrices(model).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16), llama_decode.decode_weights(model) as once:
        assert once.lm_head is not None and once.lm_head.dtype == torch.bfloat16
        assert all(m.dtype == torch.bfloat16 for layer in once.layers if layer is not None for m in layer)
        for name, p in _matrices(model).items():  # copies: nothing borrowed, nothing moved
            assert p.dtype == torch.float32 and p.data_ptr() == addresses[name]
        got = llama_decode.LlamaDecoder(model, 3, ids.shape[1] + 1, once).prefill(ids, mask)
    assert torch.equal(got, expected)
    for name, p in _matrices(model).items():
        assert p.is_contiguous() and torch.equal(p, values[name])


def test_autocast_leaves_a_float64_model_in_float64():
    """Autocast does not cast float64, so neither may the decoder: its matrices and cache stay float64."""
    model = llama(seed=6).double()
    ids, mask = left_pad(PROMPTS, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16), llama_decode.decode_weights(model) as weights:
        assert weights.lm_head is not None and weights.lm_head.dtype == torch.float64
        decoder = llama_decode.LlamaDecoder(model, 3, ids.shape[1] + 1, weights)
        assert decoder.keys.dtype == torch.float64
        got = decoder.prefill(ids, mask)
    assert got.dtype == torch.float64
    assert torch.allclose(got, reference_logits(model, ids, mask), atol=1e-10, rtol=0)
