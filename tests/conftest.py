"""Shared fixtures: small tokenizers of three families, trained locally (no network) once per session.

Each has the special tokens `<|pad|>`, `<|eos|>`, `<|unk|>`, `<|user|>`, `<|assistant|>`, `<|system|>` and no
chat template (so `alignloop.tokenization.DEFAULT_CHAT_TEMPLATE` applies) unless one is given.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|unk|>", "<|user|>", "<|assistant|>", "<|system|>"]

# A template without special role tokens and without EOS: turn boundaries fall inside ordinary text, so
# SentencePiece-style tokenizers merge the space before a response into its first token.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### User: ' + m['content'] + '\\n' }}"
    "{% else %}{{ '### Assistant: ' + m['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant: ' }}{% endif %}"
)


def training_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic sentences: common words (cases, digits, punctuation, accents, CJK, emoji, template words)
    and pseudo-words, Zipf-weighted so that every tokenizer family learns multi-character pieces."""
    rng = random.Random(seed)
    common = (
        "the a quick brown fox jumps over lazy dog hello world data model loss train test user assistant "
        "system User Assistant Hello The What How why yes no café naïve Straße über 東京 数据 😀 🎉 ### : "
        "? ! . , ; ' \" ( ) [ ] { } - _ / 0 1 2 3 42 2024 3.14 x y z abc xyz"
    ).split()
    syllables = "ka to ri mu se na lo pe ti ra vo shi an en in on er th st ch".split()
    words = common + ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(400)]
    weights = [1.0 / (i + 1) for i in range(len(words))]
    return [" ".join(rng.choices(words, weights, k=rng.randint(2, 14))) for _ in range(n)]


def _train(kind: str) -> Tokenizer:
    if kind == "bpe":  # GPT-2 style byte-level BPE: lossless on any Unicode text
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer: trainers.Trainer = trainers.BpeTrainer(
            vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "wordpiece":  # BERT style: lowercases, strips accents, drops whitespace
        tok = Tokenizer(models.WordPiece(unk_token="<|unk|>"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False)
    elif kind == "unigram":  # SentencePiece style: NFKC, "▁" marks spaces and is merged into the next word
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=300, special_tokens=SPECIAL_TOKENS, unk_token="<|unk|>", show_progress=False
        )
    else:
        raise ValueError(kind)
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    return tok


@functools.cache
def build_tokenizer(kind: str, pad_is_eos: bool = False, template: str | None = None) -> PreTrainedTokenizerFast:
    """A cached tokenizer of `kind` ("bpe", "wordpiece", "unigram"), with pad == eos if asked and no chat
    template, or PLAIN_CHAT_TEMPLATE when template="plain". Do not mutate the returned object."""
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=_train(kind),
        eos_token="<|eos|>",
        pad_token="<|eos|>" if pad_is_eos else "<|pad|>",
        unk_token="<|unk|>",
        extra_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    wrapped.chat_template = {None: None, "plain": PLAIN_CHAT_TEMPLATE}[template]
    return wrapped


@pytest.fixture(scope="session")
def make_tokenizer() -> Callable[..., PreTrainedTokenizerFast]:
    """The cached builder, for tests that parametrize over tokenizer kinds and variants."""
    return build_tokenizer


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("bpe")


@pytest.fixture(scope="session")
def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("wordpiece")


@pytest.fixture(scope="session")
def unigram_tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer("unigram")


@pytest.fixture(scope="session")
def pad_eos_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose pad token is its EOS token (as for many released models)."""
    return build_tokenizer("bpe", pad_is_eos=True)


@pytest.fixture(scope="session")
def templated_tokenizer() -> PreTrainedTokenizerFast:
    """Unigram with its own chat template (PLAIN_CHAT_TEMPLATE: plain-text roles, no EOS)."""
    return build_tokenizer("unigram", template="plain")
