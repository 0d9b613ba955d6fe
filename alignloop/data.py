"""Record types shared by training, the sandbox and the feedback app; loaders, validation and tokenisation.

Every record is a frozen dataclass with a stable `id` and a free-form `meta` dict. A conversation is a
list of `{"role": ..., "content": ...}` messages with roles `system` (optional, first), then `user` and
`assistant` alternating.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SFTExample:
    """A demonstration: a conversation whose assistant turns are the training targets."""

    id: str
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prompt:
    """A conversation that ends with a user turn, waiting for a response."""

    id: str
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreferencePair:
    """`chosen` preferred over `rejected` for `prompt`; `margin` (>= 0) or `strength` say by how much."""

    id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float | None = None
    strength: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ranking:
    """K responses to one prompt, best first."""

    id: str
    prompt: list[Message]
    responses: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rating:
    """Scores for one response, by axis (e.g. helpful/honest/harmless on 1-5), with optional flags."""

    id: str
    prompt: list[Message]
    response: str
    scores: dict[str, float]
    flags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Edit:
    """A person rewrote `original` into `edited`: the edit is preferred over the original."""

    id: str
    prompt: list[Message]
    original: str
    edited: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Thumb:
    """An unpaired judgement of one response: up (desirable) or down (undesirable)."""

    id: str
    prompt: list[Message]
    response: str
    up: bool
    meta: dict[str, Any] = field(default_factory=dict)
