"""Chat formatting, loss masks (T7a, T7c), length policy (D2, T7b), Unicode (D3) and the collator (D4).

Masks are checked against conversations rendered by hand (not through alignloop), over three tokenizer
families, a pad == eos variant, and a plain-text template without EOS that makes SentencePiece-style
tokenizers merge across the prompt/response boundary.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from alignloop.data import DataError, Prompt, SFTExample, validate_records
from alignloop.tokenization import (
    DEFAULT_CHAT_TEMPLATE,
    LengthReport,
    TokenizedExample,
    collate_sft,
    encode_prompt,
    format_chat,
    tokenize_conversation,
    tokenize_sft,
)

TOKENIZER_KINDS = ("bpe", "wordpiece", "unigram")  # the families built in conftest.py
SPECIAL_TOKENS = ("<|pad|>", "<|eos|>", "<|unk|>", "<|user|>", "<|assistant|>", "<|system|>")

# make_tokenizer(kind, pad_is_eos, template): the default template on three families, pad == eos, and the
# plain-text template without EOS (conftest.PLAIN_CHAT_TEMPLATE) on the same three.
CONFIGS = [(k, False, None) for k in TOKENIZER_KINDS] + [("bpe", True, None)]
CONFIGS += [(k, False, "plain") for k in TOKENIZER_KINDS]
CONFIG_IDS = ["bpe", "wordpiece", "unigram", "bpe-pad-eos", "bpe-plain", "wordpiece-plain", "unigram-plain"]

ALPHABET = st.one_of(
    st.sampled_from(list(" \n\t.,!?;:'\"()-_#/<|>ABCxyz0123éüßñ東京😀🎉")), st.characters(categories=("L", "N"))
)
CONTENT = st.text(ALPHABET, min_size=1, max_size=24).filter(
    lambda s: bool(s.strip()) and not any(t in s for t in SPECIAL_TOKENS)
)


@st.composite
def conversations(draw: Any, max_turns: int = 3) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": draw(CONTENT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, max_turns))):
        msgs += [{"role": "user", "content": draw(CONTENT)}, {"role": "assistant", "content": draw(CONTENT)}]
    return msgs


def render_by_hand(messages: list[dict[str, str]], plain: bool, eos: str) -> tuple[str, list[tuple[int, int]]]:
    """The text either template must produce, and each assistant content's character span."""
    text, spans = "", []
    for m in messages:
        if plain:
            pre, post = {"system": ("", "\n\n"), "user": ("### User: ", "\n"), "assistant": ("### Assistant: ", "\n")}[m["role"]]
        else:
            pre, post = f"<|{m['role']}|>", eos if m["role"] == "assistant" else "\n"
        text += pre
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(m["content"])))
        text += m["content"] + post
    return text, spans


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------------------------
# Chat formatting.


def test_default_template_text(bpe_tokenizer: Any) -> None:
    msgs = [{"role": "system", "content": "S"}, user("Hi"), bot("Hello"), user("Bye")]
    assert bpe_tokenizer.chat_template is None
    assert format_chat(msgs, bpe_tokenizer) == "<|system|>S\n<|user|>Hi\n<|assistant|>Hello<|eos|><|user|>Bye\n"
    assert format_chat(msgs, bpe_tokenizer, add_generation_prompt=True).endswith("<|user|>Bye\n<|assistant|>")
    assert "eos_token" in DEFAULT_CHAT_TEMPLATE


def test_tokenizer_template_wins_over_default(templated_tokenizer: Any) -> None:
    text = format_chat([user("Hi"), bot("Yo")], templated_tokenizer)
    assert text == "### User: Hi\n### Assistant: Yo\n"


def test_encode_prompt_ends_with_generation_prompt(bpe_tokenizer: Any) -> None:
    ids = encode_prompt([user("Hi there")], bpe_tokenizer)
    assert ids[0] == bpe_tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == bpe_tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert bpe_tokenizer.decode(ids) == "<|user|>Hi there\n<|assistant|>"


# ---------------------------------------------------------------------------------------------------------
# T7a / T7c / D4: the loss mask covers exactly the assistant contents plus one EOS per response.


def check_mask(ex: TokenizedExample, messages: list[dict[str, str]], tok: Any, plain: bool) -> None:
    text, spans = render_by_hand(messages, plain, tok.eos_token)
    assert format_chat(messages, tok) == text
    eos = tok.eos_token_id
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert len(ex.input_ids) == len(ex.loss_mask) and set(ex.loss_mask) <= {0, 1}

    # T7a: each response is one run of loss tokens ending in EOS (even when pad == eos).
    runs, prev = [], 0
    for pos, m in enumerate(ex.loss_mask):
        if m and not prev:
            runs.append([])
        if m:
            runs[-1].append(pos)
        prev = m
    assert len(runs) == len(spans) and all(ex.input_ids[r[-1]] == eos for r in runs)
    assert sum(m for i, m in zip(ex.input_ids, ex.loss_mask, strict=True) if i == eos) == len(spans)

    # Map back to the tokens of the rendered text: EOS was inserted only when the template has none.
    kept = [p for p, i in enumerate(ex.input_ids) if not (plain and i == eos)]
    assert [ex.input_ids[p] for p in kept] == ids
    mask = [ex.loss_mask[p] for p in kept]
    for t, (s, e) in enumerate(offsets):
        hit = [k for k, (cs, ce) in enumerate(spans) if s < ce and max(e, s + 1) > cs]
        if ids[t] == eos:
            assert mask[t] == 1 and any(s == ce for _, ce in spans)
        else:
            assert mask[t] == bool(hit), (t, text[s:e])
        crossing = hit and (s < spans[hit[0]][0] or e > spans[hit[0]][1])
        assert bool(crossing) <= (kept[t] in ex.boundaries)

    # T7c prefix property: the tokens before each response are the prompt's own tokens, or a boundary is recorded.
    for cs, ce in spans:
        first = next(t for t, (s, e) in enumerate(offsets) if s < ce and max(e, s + 1) > cs)
        clean = tok(text[:cs], add_special_tokens=False)["input_ids"] == ids[:first]
        assert clean or kept[first] in ex.boundaries
    if not plain:
        assert ex.boundaries == []  # role tokens are special, so nothing merges across a turn edge


@settings(max_examples=1000, deadline=None)
@given(messages=conversations())
def test_T7a_T7c_loss_mask_is_assistant_content_plus_eos(make_tokenizer: Any, messages: list) -> None:
    """Each drawn conversation goes through every tokenizer config: 1000 cases per config."""
    for config, name in zip(CONFIGS, CONFIG_IDS, strict=True):
        note(f"tokenizer config: {name}")
        tok = make_tokenizer(*config)
        ex = tokenize_conversation(messages, tok, example_id="x")
        assert ex is not None and ex.id == "x"
        check_mask(ex, messages, tok, plain=config[2] is not None)
        if config[0] == "bpe":  # byte-level BPE is lossless: the trained tokens decode to the responses exactly
            trained = [i for i, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]
            decoded = tok.decode(trained, clean_up_tokenization_spaces=False)
            responses = "".join(m["content"] + tok.eos_token for m in messages if m["role"] == "assistant")
            # with the plain template a boundary token may carry the template's space before the response
            assert decoded == responses if config[2] is None else decoded.replace(" ", "") == responses.replace(" ", "")


def test_T7a_eos_is_trained_when_pad_equals_eos(pad_eos_tokenizer: Any) -> None:
    tok = pad_eos_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    ex = tokenize_conversation([user("a"), bot("b"), user("c"), bot("d")], tok)
    assert ex is not None
    eos_positions = [p for p, i in enumerate(ex.input_ids) if i == tok.eos_token_id]
    assert len(eos_positions) == 2 and all(ex.loss_mask[p] == 1 for p in eos_positions)
    batch = collate_sft([ex, TokenizedExample("y", ex.input_ids[:3], [0, 0, 1])], pad_id=tok.pad_token_id)
    assert (batch["labels"][0] == tok.eos_token_id).sum() == 2  # labels never come from input_ids != pad
    assert (batch["labels"][1, 3:] == -100).all() and (batch["input_ids"][1, 3:] == tok.pad_token_id).all()


def test_T7a_eos_inserted_when_the_template_has_none(templated_tokenizer: Any) -> None:
    tok = templated_tokenizer
    messages = [user("hello the world"), bot("ka to ri"), user("more"), bot("mu se")]
    assert tok.eos_token not in format_chat(messages, tok)
    ex = tokenize_conversation(messages, tok)
    assert ex is not None
    eos_positions = [p for p, i in enumerate(ex.input_ids) if i == tok.eos_token_id]
    assert len(eos_positions) == 2 and all(ex.loss_mask[p] == 1 and ex.loss_mask[p - 1] == 1 for p in eos_positions)


def test_T7c_boundary_merge_is_recorded_and_reported(templated_tokenizer: Any, caplog: Any) -> None:
    tok = templated_tokenizer  # "### Assistant: " + "Hello": SentencePiece merges the space into "▁H"
    messages = [user("hello"), bot("Hello the world")]
    ex = tokenize_conversation(messages, tok)
    assert ex is not None and ex.boundaries
    first = ex.boundaries[0]
    assert ex.loss_mask[first] == 1 and tok.convert_ids_to_tokens(ex.input_ids[first]).startswith("▁")
    assert encode_prompt(messages[:1], tok) != ex.input_ids[:first]  # the prefix property fails here
    with caplog.at_level(logging.INFO, logger="alignloop.tokenization"):
        _, report = tokenize_sft([SFTExample("a", messages), SFTExample("b", messages)], tok, None)
    assert report == LengthReport(kept=2, truncated=0, dropped=0, boundaries=2)
    assert "do not tokenise cleanly" not in caplog.text and "does not tokenise cleanly" in caplog.text


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_T7c_prefix_property_with_the_default_template(make_tokenizer: Any, kind: str) -> None:
    tok = make_tokenizer(kind)
    messages = [{"role": "system", "content": "Be brief."}, user("What is 2+2?"), bot(" Four."), user("Why?"), bot("Math!")]
    ex = tokenize_conversation(messages, tok)
    assert ex is not None and ex.boundaries == []
    for i in (2, 4):
        prompt = encode_prompt(messages[:i], tok)
        assert ex.input_ids[: len(prompt)] == prompt and ex.loss_mask[len(prompt) - 1 : len(prompt) + 1] == [0, 1]


# ---------------------------------------------------------------------------------------------------------
# D2 / T7b: length policy.


def _final_turn_tokens(ex: TokenizedExample) -> int:
    """Tokens from the last response's first loss token to the end."""
    start = len(ex.loss_mask) - 1
    while start > 0 and not (ex.loss_mask[start - 1] == 0 and ex.loss_mask[start] == 1):
        start -= 1
    return len(ex.loss_mask) - start


@settings(max_examples=500, deadline=None)
@given(messages=conversations(), max_length=st.integers(1, 80))
def test_D2_length_policy(make_tokenizer: Any, messages: list, max_length: int) -> None:
    for config in (CONFIGS[0], CONFIGS[-1]):  # bpe (EOS from the template), unigram-plain (EOS inserted)
        note(f"tokenizer config: {config}")
        check_length_policy(make_tokenizer(*config), messages, max_length)


def check_length_policy(tok: Any, messages: list, max_length: int) -> None:
    full = tokenize_conversation(messages, tok)
    assert full is not None
    fits, tail = len(full.input_ids) <= max_length, _final_turn_tokens(full)
    dropped = tokenize_conversation(messages, tok, max_length, "drop")
    assert dropped == (full if fits else None)
    cut = tokenize_conversation(messages, tok, max_length, "truncate_prompt")
    if fits:
        assert cut == full
    elif tail > max_length:
        assert cut is None
    else:
        assert cut is not None and len(cut.input_ids) == max_length
        assert cut.input_ids == full.input_ids[-max_length:] and cut.loss_mask == full.loss_mask[-max_length:]
        assert _final_turn_tokens(cut) == tail  # the last response and its EOS are whole
    for ex in (dropped, cut):
        assert ex is None or (sum(ex.loss_mask) >= 1 and len(ex.input_ids) <= max_length)
    if not fits:
        with pytest.raises(DataError) as info:
            tokenize_conversation(messages, tok, max_length, "error", example_id="long")
        assert (info.value.code, info.value.record_id) == ("D110", "long")


def test_T7b_prompt_longer_than_max_length_is_counted(bpe_tokenizer: Any, caplog: Any) -> None:
    long_prompt = " ".join(["the quick brown fox"] * 20)
    examples = [
        SFTExample("short", [user("hi"), bot("yes")]),
        SFTExample("long-prompt", [user(long_prompt), bot("yes")]),
        SFTExample("long-answer", [user("hi"), bot(long_prompt)]),
    ]
    with caplog.at_level(logging.INFO, logger="alignloop.tokenization"):
        kept, report = tokenize_sft(examples, bpe_tokenizer, 24, "drop")
    assert [e.id for e in kept] == ["short"] and report == LengthReport(1, 0, 2)
    assert "1 kept, 0 truncated, 2 dropped" in caplog.text
    kept, report = tokenize_sft(examples, bpe_tokenizer, 24, "truncate_prompt")
    assert [e.id for e in kept] == ["short", "long-prompt"] and report == LengthReport(1, 1, 1)
    assert all(len(e.input_ids) <= 24 and sum(e.loss_mask) > 0 for e in kept)
    with pytest.raises(DataError) as info:
        tokenize_sft(examples, bpe_tokenizer, 24, "error")
    assert info.value.code == "D110" and "long-prompt" in str(info.value)
    with pytest.raises(ValueError, match="truncation"):
        tokenize_sft(examples, bpe_tokenizer, 24, "cut")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# D1 at tokenisation time.


def test_D1_tokenisation_rejects_bad_conversations(bpe_tokenizer: Any) -> None:
    cases = [
        (lambda: tokenize_conversation([user("a")], bpe_tokenizer, example_id="q"), "D106", "messages[0].role"),
        (lambda: tokenize_conversation([user("a <|eos|> b"), bot("c")], bpe_tokenizer), "D111", "messages[0].content"),
        (lambda: tokenize_conversation([user("a"), bot("<|user|>x")], bpe_tokenizer), "D111", "messages[1].content"),
        (lambda: encode_prompt([user("a"), bot("b")], bpe_tokenizer), "D106", "messages[1].role"),
        (lambda: encode_prompt([user(" ")], bpe_tokenizer), "D104", "messages[0].content"),
        (lambda: encode_prompt([{"role": "tool", "content": "x"}], bpe_tokenizer), "D105", "messages[0].role"),
    ]
    for call, code, fld in cases:
        with pytest.raises(DataError) as info:
            call()
        assert (info.value.code, info.value.field) == (code, fld)


# ---------------------------------------------------------------------------------------------------------
# D3: Unicode round trip or a coded rejection.

UNICODE = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, b, c: a + c + b, st.text(max_size=10), st.text(max_size=10), st.sampled_from(["\ud800", "\udfff", "\x00"])),
)


@settings(max_examples=1000, deadline=None)
@given(text=UNICODE)
def test_D3_unicode_round_trips_or_is_rejected_with_a_code(bpe_tokenizer: Any, text: str) -> None:
    bad_unicode = "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    try:
        validate_records([Prompt("u", [user(text)])])
        ids = encode_prompt([user(text)], bpe_tokenizer)
    except DataError as err:
        expected = "D108" if bad_unicode else "D104" if not text.strip() else "D111"
        assert err.code == expected
        return
    assert not bad_unicode and text.strip()
    decode = bpe_tokenizer.decode
    assert decode(ids, clean_up_tokenization_spaces=False) == f"<|user|>{text}\n<|assistant|>"
    assert decode(bpe_tokenizer(text, add_special_tokens=False)["input_ids"], clean_up_tokenization_spaces=False) == text


# ---------------------------------------------------------------------------------------------------------
# D4: the collator.


@st.composite
def batches(draw: Any) -> tuple[list[TokenizedExample], int]:
    pad_id = draw(st.integers(0, 9))
    examples = []
    for i in range(draw(st.integers(1, 6))):
        n = draw(st.integers(1, 12))
        ids = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))  # may contain pad_id (pad == eos)
        examples.append(TokenizedExample(str(i), ids, draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))))
    return examples, pad_id


@settings(max_examples=1000, deadline=None)
@given(batch=batches(), side=st.sampled_from(["right", "left"]))
def test_D4_collator_labels_are_minus_100_exactly_on_prompt_and_padding(batch: tuple, side: str) -> None:
    examples, pad_id = batch
    out = collate_sft(examples, pad_id, padding_side=side)  # type: ignore[arg-type]
    width = max(len(e.input_ids) for e in examples)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(v.shape == (len(examples), width) and v.dtype == torch.long for v in out.values())
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        real = slice(0, n) if side == "right" else slice(width - n, width)
        pad = slice(n, width) if side == "right" else slice(0, width - n)
        assert out["input_ids"][row, real].tolist() == ex.input_ids
        assert out["attention_mask"][row, real].tolist() == [1] * n
        expected = [i if m else -100 for i, m in zip(ex.input_ids, ex.loss_mask, strict=True)]
        assert out["labels"][row, real].tolist() == expected  # not shifted
        assert (out["input_ids"][row, pad] == pad_id).all() and (out["attention_mask"][row, pad] == 0).all()
        assert (out["labels"][row, pad] == -100).all()


def test_D4_collate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        collate_sft([], 0)
    with pytest.raises(ValueError, match="differ"):
        collate_sft([TokenizedExample("a", [1, 2], [1])], 0)
