"""Chat formatting, tokenisation with prompt masking, and batching.

Chat format: the tokenizer's own `chat_template`, else `DEFAULT_CHAT_TEMPLATE`, which renders
`<|system|>{content}\\n`, `<|user|>{content}\\n`, `<|assistant|>{content}{eos_token}` and, with
`add_generation_prompt`, a final `<|assistant|>`; it adds no BOS.

Loss mask: each assistant turn's character span is found by rendering prefixes (`render(msgs[:i], gen
prompt)` and `render(msgs[:i+1])` must be prefixes of the full text); the full text is tokenised once with
offsets and `add_special_tokens=False`. A token is a loss token when it overlaps the assistant content, and
so are the tokens after it up to and including the first EOS token of that turn. A turn whose template
renders no EOS gets one inserted right after its content (so later prompts differ from `encode_prompt` of
the same prefix by those EOS tokens). Boundary rule (RELIABILITY T7c): a token that straddles the edge of
the content (BPE/SentencePiece merges across it, e.g. `"Assistant: hi"` -> `"▁hi"`) counts as a loss token;
its position is recorded in `TokenizedExample.boundaries`, as is a turn's first loss token whenever the
tokens before it differ from tokenising the rendered prompt alone (the prefix property fails, so the model
sees other tokens at inference). Such examples are counted in `LengthReport.boundaries` and logged.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from alignloop.data import DataError, Message, SFTExample, _Bad, _fail, _msgs, _turns

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Chat formatting and tokenisation with prompt masking.

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
Truncation = Literal["drop", "truncate_prompt", "error"]


@dataclass
class TokenizedExample:
    """Token ids and a 0/1 loss mask (1 on assistant content and its EOS); `boundaries` (T7c): positions of
    loss tokens at a prompt/response boundary that does not tokenise cleanly (see the module docstring)."""

    id: str
    input_ids: list[int]
    loss_mask: list[int]
    boundaries: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class LengthReport:
    """What the length policy did: `kept` untouched, `truncated` (kept, prompt cut), `dropped`; `boundaries`
    counts output examples with a recorded boundary token (T7c)."""

    kept: int
    truncated: int
    dropped: int
    boundaries: int = 0


def format_chat(messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool = False) -> str:
    """Render messages with the tokenizer's chat template, or DEFAULT_CHAT_TEMPLATE when it has none."""
    template = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _conversation(messages: Any, end: str, tokenizer: PreTrainedTokenizerBase, record_id: str | None) -> list[Message]:
    """Validate turn order and text, and refuse special-token strings inside content (D111)."""
    try:
        msgs = _turns(_msgs(list(messages) if isinstance(messages, tuple) else messages, "messages", None), end)
        for i, msg in enumerate(msgs):
            hit = next((t for t in tokenizer.all_special_tokens if t and t in msg["content"]), None)
            if hit:
                _fail("D111", f"messages[{i}].content", f"contains the special token {hit!r}")
    except _Bad as bad:
        raise DataError(bad.code, bad.detail, field=bad.field, record_id=record_id) from None
    return msgs


def _assistant_spans(
    messages: list[Message], tokenizer: PreTrainedTokenizerBase
) -> tuple[str, list[tuple[int, int, int, int]]]:
    """Full text and, per assistant turn, (prompt end, content start, content end, turn end) in characters."""
    text, spans = format_chat(messages, tokenizer), []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head = format_chat(messages[:i], tokenizer, add_generation_prompt=True)
        turn = format_chat(messages[: i + 1], tokenizer)
        if not (text.startswith(head) and text.startswith(turn) and len(head) <= len(turn)):
            raise ValueError("the chat template is not prefix-stable (rendering a prefix of the conversation "
                             "changes earlier text), so assistant turns cannot be located")
        content = msg["content"]
        start = text.find(content, len(head), len(turn))
        if start < 0:  # templates that trim content
            content = content.strip()
            start = text.find(content, len(head), len(turn))
        if start < 0:
            raise ValueError(f"the chat template does not render assistant turn {i} verbatim")
        spans.append((len(head), start, start + len(content), len(turn)))
    return text, spans


def _mask_turns(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int, int, int]], eos_id: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Loss mask from character spans. Returns the mask, tokens crossing a content edge, each turn's first
    loss token, and where an EOS must be inserted (before that token) for turns the template left without."""
    n, mask, crossing, firsts, inserts, t = len(ids), [0] * len(ids), [], [], [], 0
    for _, cs, ce, end in spans:
        while t < n and max(offsets[t][1], offsets[t][0] + 1) <= cs:  # zero-width tokens count as one char
            t += 1
        firsts.append(t)
        while t < n and offsets[t][0] < ce:
            mask[t] = 1
            if offsets[t][0] < cs or offsets[t][1] > ce:
                crossing.append(t)
            t += 1
        eos = t
        while eos < n and offsets[eos][0] < end and ids[eos] != eos_id:
            eos += 1
        if eos < n and offsets[eos][0] < end:  # the template's EOS (and any tokens before it) are trained
            mask[t : eos + 1] = [1] * (eos + 1 - t)
            t = eos + 1
        else:
            inserts.append(t)
    return mask, crossing, firsts, inserts


def _tokenize_one(
    messages: Any, tokenizer: PreTrainedTokenizerBase, max_length: int | None, truncation: str, example_id: str
) -> tuple[TokenizedExample | None, str]:
    if truncation not in ("drop", "truncate_prompt", "error"):
        raise ValueError(f"truncation must be 'drop', 'truncate_prompt' or 'error', got {truncation!r}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; every response must end with EOS")
    text, spans = _assistant_spans(_conversation(messages, "assistant", tokenizer, example_id), tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask, crossing, firsts, inserts = _mask_turns(ids, enc["offset_mapping"], spans, eos_id)
    boundaries = set(crossing)
    for (head_end, *_), first in zip(spans, firsts, strict=True):  # T7c prefix property, per turn
        if first not in boundaries and tokenizer(text[:head_end], add_special_tokens=False)["input_ids"] != ids[:first]:
            boundaries.add(first)
    for pos in reversed(inserts):
        ids[pos:pos], mask[pos:pos] = [eos_id], [1]
    marked = sorted(t + bisect.bisect_right(inserts, t) for t in boundaries)
    final_start = firsts[-1] + bisect.bisect_left(inserts, firsts[-1])
    n, status = len(ids), "kept"
    if max_length is not None and n > max_length:
        if truncation == "error":
            raise DataError("D110", f"{n} tokens > max_length {max_length}", field="messages", record_id=example_id)
        if truncation == "drop" or n - final_start > max_length:
            return None, "dropped"
        cut, status = n - max_length, "truncated"
        ids, mask, marked = ids[cut:], mask[cut:], [t - cut for t in marked if t >= cut]
    if not any(mask):  # D2: cannot happen (every turn has an EOS loss token); never let one reach the loss
        return None, "dropped"
    return TokenizedExample(example_id, ids, mask, marked), status


def tokenize_conversation(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, max_length: int | None = None,
    truncation: Truncation = "error", *, example_id: str = "",
) -> TokenizedExample | None:
    """Tokenise one SFT conversation with the loss on every assistant turn plus its EOS; None if dropped.

    truncation: "drop" (longer than max_length -> None), "truncate_prompt" (cut tokens from the left,
    keeping the final assistant turn and EOS whole; None if those alone do not fit), "error" (DataError D110).
    """
    return _tokenize_one(messages, tokenizer, max_length, truncation, example_id)[0]


def tokenize_sft(
    examples: Iterable[SFTExample], tokenizer: PreTrainedTokenizerBase, max_length: int | None,
    truncation: Truncation = "drop",
) -> tuple[list[TokenizedExample], LengthReport]:
    """Tokenise demonstrations under the length policy (see tokenize_conversation) and count what it did."""
    out, counts = [], Counter[str]()
    for ex in examples:
        tok, status = _tokenize_one(ex.messages, tokenizer, max_length, truncation, ex.id)
        counts[status] += 1
        if tok is not None:
            out.append(tok)
            counts["boundaries"] += bool(tok.boundaries)
    report = LengthReport(counts["kept"], counts["truncated"], counts["dropped"], counts["boundaries"])
    logger.info("tokenised SFT examples (max_length=%s, truncation=%s): %d kept, %d truncated, %d dropped",
                max_length, truncation, report.kept, report.truncated, report.dropped)
    if report.boundaries:
        logger.warning("%d examples have a prompt/response boundary that does not tokenise cleanly (the chat "
                       "template has no separator token there); see TokenizedExample.boundaries", report.boundaries)
    return out, report


def encode_prompt(messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a conversation ending with a user turn, rendered with the generation prompt."""
    text = format_chat(_conversation(messages, "user", tokenizer, None), tokenizer, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------------
# Batching.


def collate_sft(batch: Sequence[TokenizedExample], pad_id: int, padding_side: Literal["right", "left"] = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example: input_ids, attention_mask and labels (B, T); labels are input_ids where
    loss_mask is 1 and -100 elsewhere (prompt and padding), NOT shifted (the model shifts)."""
    if not batch:
        raise ValueError("empty batch")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T)
    for row, ex in enumerate(batch):
        if len(ex.loss_mask) != len(ex.input_ids):
            raise ValueError(f"example {ex.id!r}: loss_mask and input_ids differ in length")
        n = len(ex.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids = torch.tensor(ex.input_ids, dtype=torch.long)  # (n,)
        input_ids[row, cols] = ids
        attention_mask[row, cols] = 1
        labels[row, cols] = torch.where(torch.tensor(ex.loss_mask, dtype=torch.bool), ids, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket_size_multiplier: int = 50,
    drop_last: bool = False,
) -> list[list[int]]:
    """Batches of indices with similar lengths, deterministic in (seed, epoch): shuffle, sort by length
    within mega-buckets of batch_size * bucket_size_multiplier, cut batches, shuffle the batch order.
    Every index appears once, except the final short batch when drop_last."""
    if batch_size < 1 or bucket_size_multiplier < 1:
        raise ValueError("batch_size and bucket_size_multiplier must be >= 1")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    mega = batch_size * bucket_size_multiplier
    for start in range(0, len(order), mega):
        order[start : start + mega] = sorted(order[start : start + mega], key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


