"""Generation: pure sampling helpers on hand-made distributions, the decoding loop on a scripted mock LM
(EOS, stop strings, early exit, the KV-cache protocol, train/eval mode), and the real tiny Llama
(seeds, cache vs full recomputation, left padding, log-probs against a training-style forward)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from alignloop.config import GenConfig, TinyModelConfig
from alignloop.generation import (
    Rollout,
    decode_responses,
    filter_top_k,
    filter_top_p,
    generate,
    left_pad,
    sample_next_tokens,
    sampling_logits,
)
from alignloop.models import tiny_model, train_tokenizer
from alignloop.tensors import logprobs_of, position_ids_from_mask

INF = float("inf")

# ----------------------------------------------------------------------------------------------
# Pure sampling helpers


def test_filter_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(filter_top_k(logits, 2), torch.tensor([[-INF, 3.0, 2.0, -INF]]))
    assert torch.equal(filter_top_k(logits, 0), logits)
    assert torch.equal(filter_top_k(logits, 4), logits)
    assert torch.equal(filter_top_k(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 1), torch.tensor([[-INF, 2.0, 2.0, -INF]]))


def test_filter_top_p_on_a_hand_made_distribution():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05; mass ahead: 0, .5, .8, .95
    logits = probs.log()
    kept = {p: torch.isfinite(filter_top_p(logits, p))[0].tolist() for p in (0.4, 0.75, 0.85, 0.97, 1.0)}
    assert kept[0.4] == [False, True, False, False]
    assert kept[0.75] == [False, True, False, True]
    assert kept[0.85] == [True, True, False, True]
    assert kept[0.97] == [True, True, True, True]
    assert kept[1.0] == [True, True, True, True]
    renormalised = filter_top_p(logits, 0.75).softmax(-1)
    assert torch.allclose(renormalised, torch.tensor([[0.0, 0.625, 0.0, 0.375]]), atol=1e-6)


def test_sampling_logits_divides_by_temperature_before_filtering():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.equal(sampling_logits(logits, 2.0, 0, 1.0), logits / 2.0)
    # top-p sees the tempered distribution: near-uniform at T=100, so 0.75 of the mass needs 3 tokens
    assert torch.isfinite(sampling_logits(logits, 1.0, 0, 0.75)).sum() == 2
    assert torch.isfinite(sampling_logits(logits, 100.0, 0, 0.75)).sum() == 3
    assert torch.isfinite(sampling_logits(logits, 100.0, 1, 0.75)).sum() == 1


def test_temperature_zero_is_argmax_and_leaves_the_generator_alone():
    logits = torch.randn(16, 11, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    assert torch.equal(sample_next_tokens(logits, 0.0, 0, 1.0, gen), logits.argmax(-1))
    assert torch.equal(gen.get_state(), state)


def test_top_k_one_and_tiny_top_p_sample_the_argmax():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next_tokens(logits, 1.0, 1, 1.0, gen), logits.argmax(-1))
    assert torch.equal(sample_next_tokens(logits, 1.7, 0, 1e-6, gen), logits.argmax(-1))


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(20000, 3)
    drawn = sample_next_tokens(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn, minlength=3).float() / drawn.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.015)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ----------------------------------------------------------------------------------------------
# The loop on a mock LM whose next-token logits are a fixed row per last token


PIECES = ["<pad>", "<eos>", "a", "b", "c", "d", "bc", "de", "x", "y"]
PAD, EOS, A, B, C, D, BC, DE, X, Y = range(len(PIECES))


class PieceTokenizer:
    """Each id decodes to a fixed piece of text; 0 is pad and 1 is EOS (the special tokens)."""

    pad_token_id, eos_token_id = PAD, EOS

    def __len__(self) -> int:
        return len(PIECES)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i in (PAD, EOS)))

    def batch_decode(self, rows: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]


class FakeCache:
    def __init__(self, length: int):
        self.length = length


class TableLM(torch.nn.Module):
    """Logits of the next token are `table[last token]`; checks the KV-cache protocol on every call:
    the prefill gets position ids from the mask, each later call one token, the cache it returned, a
    mask one column wider and the next position."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)  # (V, V)
        self.calls: list[bool] = []  # self.training at each forward

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=False):
        assert use_cache
        if past_key_values is None:
            cache = FakeCache(input_ids.shape[1])
            assert torch.equal(position_ids, position_ids_from_mask(attention_mask))
        else:
            cache = past_key_values
            assert cache is getattr(self, "_cache", None) and input_ids.shape[1] == 1
            cache.length += 1
            assert attention_mask.shape[1] == cache.length
            assert torch.equal(position_ids, position_ids_from_mask(attention_mask)[:, -1:])
        self._cache = cache
        self.calls.append(self.training)
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=cache)  # (B, T, V)


def chain_lm(successor: dict[int, int]) -> TableLM:
    """Greedy follows `successor`; other tokens go to Y."""
    table = torch.zeros(len(PIECES), len(PIECES))
    for token in range(len(PIECES)):
        table[token, successor.get(token, Y)] = 5.0
    return TableLM(table)


def test_eos_ends_a_row_and_masks_everything_after():
    model = chain_lm({A: B, B: C, C: EOS})
    cfg = GenConfig(temperature=0.0, max_new_tokens=5)
    r = generate(model, PieceTokenizer(), [[A], [D, X]], cfg)
    assert r.response_ids.tolist() == [[B, C, EOS, PAD, PAD], [Y, Y, Y, Y, Y]]
    assert r.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert r.ended.tolist() == [True, False]
    assert r.prompt_ids.tolist() == [[PAD, A], [D, X]] and r.prompt_mask.tolist() == [[0, 1], [1, 1]]
    assert (r.logprobs[0, 3:] == 0).all() and (r.logprobs[r.response_mask.bool()] < 0).all()
    expected = 5.0 - math.log(math.exp(5.0) + len(PIECES) - 1)  # log-softmax of the chosen token
    assert torch.allclose(r.logprobs[r.response_mask.bool()], torch.tensor(expected))
    assert decode_responses(r, PieceTokenizer()) == ["bc", "yyyyy"]
    assert len(model.calls) == 5


def test_stop_string_completed_across_tokens_ends_the_row_there():
    # x -> "bc" -> "de": "cd" appears only once "de" arrives; the prompt's own "cd" does not count
    model = chain_lm({X: BC, BC: DE, DE: A, C: D, D: A, A: B, B: C})
    cfg = GenConfig(temperature=0.0, max_new_tokens=6, stop_strings=["cd", "zz"])
    r = generate(model, PieceTokenizer(), [[X], [C, D]], cfg)
    assert r.response_ids.tolist() == [[BC, DE, PAD, PAD], [A, B, C, D]]  # "abcd" completes "cd" at "d"
    assert r.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert r.ended.tolist() == [True, True]
    assert decode_responses(r, PieceTokenizer()) == ["bcde", "abcd"]


def test_loop_exits_when_every_row_has_ended():
    model = chain_lm({A: B, B: C, C: EOS})
    r = generate(model, PieceTokenizer(), [[A], [B], [A]], GenConfig(temperature=0.0, max_new_tokens=10))
    assert len(model.calls) == 3  # the prefill gives token 1, two cached steps give tokens 2 and 3
    assert r.response_ids.shape == (3, 3) and r.ended.all()
    assert r.response_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1]]


def test_greedy_top_k_one_and_tiny_top_p_agree_on_a_random_table():
    table = 3 * torch.randn(len(PIECES), len(PIECES), generator=torch.Generator().manual_seed(0))
    table[:, [PAD, EOS]] = -10.0
    prompts = [[t] for t in range(2, len(PIECES))]
    greedy = generate(TableLM(table), PieceTokenizer(), prompts, GenConfig(temperature=0.0, max_new_tokens=6))
    chain = [[t] for t in range(2, len(PIECES))]
    for row in chain:  # argmax chain of the table, by hand
        for _ in range(6):
            row.append(int(table[row[-1]].argmax()))
    assert greedy.response_ids.tolist() == [row[1:] for row in chain]
    for cfg in (GenConfig(temperature=1.0, top_k=1, max_new_tokens=6), GenConfig(temperature=0.7, top_p=1e-6, max_new_tokens=6)):
        assert torch.equal(generate(TableLM(table), PieceTokenizer(), prompts, cfg, seed=3).response_ids, greedy.response_ids)


def test_eval_mode_while_sampling_and_training_mode_restored():
    model = chain_lm({A: B, B: EOS})
    model.train()
    generate(model, PieceTokenizer(), [[A]], GenConfig(temperature=0.0))
    assert model.calls == [False, False] and model.training
    model.eval()
    generate(model, PieceTokenizer(), [[A]], GenConfig(temperature=0.0))
    assert not model.training


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"top_p": 0.0}, {"temperature": -1.0}, {"batch_size": 0}])
def test_bad_settings_and_empty_prompts_are_refused(bad):
    with pytest.raises(ValueError):
        generate(chain_lm({}), PieceTokenizer(), [[A]], GenConfig(**bad))
    with pytest.raises(ValueError):
        generate(chain_lm({}), PieceTokenizer(), [[A], []], GenConfig())


# ----------------------------------------------------------------------------------------------
# The real tiny Llama (random init, fp32, CPU unless CUDA is named)


# Untied: with a tied LM head a freshly initialised model's argmax is just its last input token, so
# greedy would not depend on the context (nor on the cache, positions or padding under test).
TINY = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                       max_position_embeddings=128, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny():
    words = "the quick brown fox jumps over a lazy dog while seven red birds sing about data and models".split()
    texts = [" ".join(words[(i * k) % len(words)] for k in range(1, 4 + i % 9)) + f" {i}" for i in range(300)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = tiny_model(TINY, tokenizer, seed=0)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in
               ("the fox", "seven red birds sing about the lazy dog", "a quick brown fox jumps over data and models today")]
    return model, tokenizer, prompts


def test_fixed_seed_reproduces_other_seed_differs_and_global_rng_is_untouched(tiny):
    model, tok, prompts = tiny
    cfg = GenConfig(temperature=1.0, max_new_tokens=10, num_samples=2, batch_size=4)
    state = torch.get_rng_state()
    first, again = generate(model, tok, prompts, cfg, seed=1), generate(model, tok, prompts, cfg, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "prompt_index", "ended", "logprobs"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(generate(model, tok, prompts, cfg, seed=2).response_ids, first.response_ids)
    assert first.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert first.prompt_ids.shape == (6, max(len(p) for p in prompts))


def test_on_step_hears_every_sampled_token_in_order_and_can_stop_generation(tiny):
    """The streaming hook: per row, the tokens heard are the rollout's masked response tokens (EOS
    included, across batches), the last one flagged as ended exactly for rows that ended; an exception
    raised by the hook stops generation."""
    model, tok, prompts = tiny
    cfg = GenConfig(temperature=1.0, max_new_tokens=12, num_samples=3, batch_size=4)  # 9 rows, 3 batches
    heard: dict[int, list[int]] = {}
    ended_at: dict[int, int] = {}

    def listen(rows: torch.Tensor, tokens: torch.Tensor, ended: torch.Tensor) -> None:
        assert rows.shape == tokens.shape == ended.shape
        for row, token, done in zip(rows.tolist(), tokens.tolist(), ended.tolist(), strict=True):
            assert row not in ended_at  # nothing is heard for a row after it ended
            heard.setdefault(row, []).append(token)
            if done:
                ended_at[row] = len(heard[row])

    rollout = generate(model, tok, prompts, cfg, seed=4, on_step=listen)
    unheard = generate(model, tok, prompts, cfg, seed=4)
    for name in ("response_ids", "response_mask", "ended", "logprobs"):  # listening changes nothing
        assert torch.equal(getattr(rollout, name), getattr(unheard, name)), name
    for row in range(9):
        assert heard[row] == rollout.response_ids[row][rollout.response_mask[row].bool()].tolist()
    assert sorted(ended_at) == rollout.ended.nonzero().flatten().tolist()
    assert 0 < len(ended_at) < 9  # some rows ended at EOS, others ran to max_new_tokens

    class Enough(Exception):
        pass

    calls = []

    def stop_after_three(rows: torch.Tensor, tokens: torch.Tensor, ended: torch.Tensor) -> None:
        calls.append(len(rows))
        if len(calls) == 3:
            raise Enough

    model.train()
    with pytest.raises(Enough):
        generate(model, tok, prompts, cfg, seed=4, on_step=stop_after_three)
    assert len(calls) == 3 and model.training  # stopped at once; training mode restored


def test_no_seed_draws_from_the_global_rng(tiny):
    model, tok, prompts = tiny
    cfg = GenConfig(temperature=1.0, max_new_tokens=6)
    torch.manual_seed(7)
    a = generate(model, tok, prompts, cfg)
    torch.manual_seed(7)
    assert torch.equal(generate(model, tok, prompts, cfg).response_ids, a.response_ids)


def greedy_by_recomputation(model, prompt: list[int], steps: int, eos_id: int) -> list[int]:
    """Argmax of a full forward over everything so far, token by token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
            if ids[-1] == eos_id:
                break
    return ids[len(prompt) :]


def test_greedy_with_cache_equals_full_recomputation(tiny):
    model, tok, prompts = tiny
    r = generate(model, tok, prompts, GenConfig(temperature=0.0, max_new_tokens=12))
    assert len(set(r.response_ids[0].tolist())) > 2  # greedy follows the context, not the last token
    for row, prompt in enumerate(prompts):
        kept = r.response_ids[row][r.response_mask[row].bool()].tolist()
        assert kept == greedy_by_recomputation(model, prompt, 12, tok.eos_token_id)


def test_left_padding_and_batching_do_not_change_greedy(tiny):
    model, tok, prompts = tiny
    cfg = GenConfig(temperature=0.0, max_new_tokens=12)
    alone = generate(model, tok, prompts[:1], cfg)
    batched = generate(model, tok, [prompts[2], prompts[0], prompts[1]], cfg)
    assert batched.prompt_mask[1].sum() == len(prompts[0]) < batched.prompt_mask.shape[1]  # really padded
    width = alone.response_ids.shape[1]
    assert torch.equal(batched.response_ids[1, :width], alone.response_ids[0])
    assert torch.allclose(batched.logprobs[1, :width], alone.logprobs[0], atol=1e-5)
    one_per_batch = generate(model, tok, prompts, GenConfig(temperature=0.0, max_new_tokens=12, batch_size=1))
    assert torch.equal(one_per_batch.response_ids, generate(model, tok, prompts, cfg).response_ids)


def training_logprobs(model, r: Rollout) -> torch.Tensor:
    """Log-probs of the responses from one forward over prompt + response, positions from the mask."""
    ids = torch.cat([r.prompt_ids, r.response_ids], dim=1)  # (N, P + R)
    mask = torch.cat([r.prompt_mask, r.response_mask], dim=1)  # (N, P + R)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    width = r.prompt_ids.shape[1]
    return logprobs_of(logits[:, width - 1 : -1], r.response_ids)  # (N, R)


def test_logprobs_at_temperature_one_match_a_training_forward(tiny):
    model, tok, prompts = tiny
    r = generate(model, tok, prompts, GenConfig(temperature=1.0, max_new_tokens=16, num_samples=3), seed=0)
    mask = r.response_mask.bool()
    delta = (r.logprobs - training_logprobs(model, r))[mask]
    assert delta.abs().max() <= 1e-5
    assert (delta.exp() - 1).abs().mean() <= 0.01  # RELIABILITY T7f
    assert (r.logprobs[~mask] == 0).all() and r.logprobs.dtype == torch.float32


def test_stop_string_on_a_real_tokenizer_cuts_at_the_completing_token(tiny):
    model, tok, prompts = tiny
    cfg = GenConfig(temperature=1.0, max_new_tokens=12)
    free = generate(model, tok, prompts, cfg, seed=5)
    stop = tok.decode(free.response_ids[0, 2:4].tolist())
    cut = generate(model, tok, prompts, GenConfig(temperature=1.0, max_new_tokens=12, stop_strings=[stop]), seed=5)
    for row in range(len(prompts)):
        tokens = free.response_ids[row][free.response_mask[row].bool()].tolist()
        end = next((t for t in range(len(tokens)) if stop in tok.decode(tokens[: t + 1])), None)
        n = len(tokens) if end is None else end + 1
        assert cut.response_mask[row].sum() == n
        assert cut.ended[row] == (end is not None or bool(free.ended[row]))
        assert cut.response_ids[row, :n].tolist() == tokens[:n]
    assert cut.ended[0] and cut.response_mask[0].sum() <= 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_greedy_matches_cpu_and_seeds_reproduce(tiny):
    model, tok, prompts = tiny
    cfg = GenConfig(temperature=0.0, max_new_tokens=12)
    cpu = generate(model, tok, prompts, cfg)
    gpu_model = tiny_model(TINY, tok, seed=0).cuda()
    gpu = generate(gpu_model, tok, prompts, cfg)
    assert gpu.response_ids.device.type == "cpu"
    assert torch.equal(gpu.response_ids, cpu.response_ids)
    sampled = GenConfig(temperature=1.0, max_new_tokens=12, num_samples=2)
    assert torch.equal(generate(gpu_model, tok, prompts, sampled, seed=4).response_ids,
                       generate(gpu_model, tok, prompts, sampled, seed=4).response_ids)
    r = generate(gpu_model, tok, prompts, sampled, seed=4)
    gpu_r = Rollout(**{k: v.cuda() for k, v in vars(r).items()})
    delta = (gpu_r.logprobs - training_logprobs(gpu_model, gpu_r))[gpu_r.response_mask.bool()]
    assert delta.abs().max() <= 1e-4
