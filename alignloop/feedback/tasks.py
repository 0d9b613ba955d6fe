"""The five annotation tasks: what an item holds, what an answer and a gold answer look like, and the
nominal units that agreement and quality are measured on.

- **pairwise**: 2 responses; a vote is `Label.choice` ("a", "b", "tie", "both_bad") with a strength.
- **rank**: 2-9 responses (one digit key each); answer `{"ranking": [positions, best first]}`.
- **rate**: 1 response; answer `{"scores": {"helpful": 1-5, "honest": 1-5, "harmless": 1-5},
  "flags": [a subset of RATE_FLAGS]}`.
- **edit**: 1 response; answer `{"edited": text, "changed": bool}` (line endings normalised to "\\n";
  an unchanged text says the response needs no edit).
- **chat**: a prompt and no responses: the annotator talks to the project's model (conversations.py); the
  label that closes a conversation is `{"turns": n}`, its judgements are picks and thumbs per turn.

Positions are import order, never display order: the page's order is `presented_order`, recorded on
the assignment and the label. A gold answer has the answer's shape (pairwise: `{"choice": "a"}`; rate:
any non-empty subset of the axes); edit and chat items take no gold (free text has no right answer).

Units: every answer is split into nominal judgements keyed by a unit, so one agreement and quality
computation serves every task: pairwise, one unit per item (the choice); rank, one unit per pair of
responses (is the lower position ranked above the higher?); rate, one per axis (the score, compared
at the ordinal level by Krippendorff's alpha); edit, one per item (changed or not); chat, none (each
annotator judges their own drafts, so no two annotators ever label the same thing).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Hashable
from typing import Any

from alignloop.data import _fail, _tname
from alignloop.feedback.db import CHOICES, TASKS

RESPONSES: dict[str, tuple[int, int]] = {"pairwise": (2, 2), "rank": (2, 9), "rate": (1, 1), "edit": (1, 1),
                                         "chat": (0, 0)}
"""How many responses an item of each task holds (least, most)."""
RATE_AXES = ("helpful", "honest", "harmless")
RATE_SCALE = (1, 2, 3, 4, 5)
RATE_FLAGS = ("unsafe", "made_up_facts", "off_topic")
MAX_EDIT_CHARS = 100_000
ALPHA_LEVEL: dict[str, str] = {"pairwise": "nominal", "rank": "nominal", "rate": "ordinal", "edit": "nominal",
                               "chat": "nominal"}
"""The level of Krippendorff's alpha on each task's units (rating scores are ordered)."""

Unit = tuple[Any, ...]


class BadAnswer(ValueError):
    """A submitted answer that does not fit the task (answered 400)."""


def check_task(task: str) -> str:
    if task not in TASKS:
        raise BadAnswer(f"task must be one of {TASKS}, got {task!r}")
    return task


def responses_rule(task: str) -> str:
    """'exactly 2' or '2-9': for error messages."""
    lo, hi = RESPONSES[task]
    return f"exactly {lo}" if lo == hi else f"{lo}-{hi}"


# ---------------------------------------------------------------------------------------------------------
# Gold answers (import), checked with the loaders' error codes: they raise data._Bad naming the field.


def _score(value: Any, fld: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail("D103", fld, f"expected an integer 1-5, got {_tname(value)}")
    if value not in RATE_SCALE:
        _fail("D109", fld, f"expected 1-5, got {value}")
    return int(value)


def _gold_ranking(value: Any, n_responses: int) -> list[int]:
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        _fail("D103", "gold.ranking", f"expected a list of response positions, got {_tname(value)}")
    if sorted(value) != list(range(n_responses)):
        _fail("D109", "gold.ranking", f"expected each position 0-{n_responses - 1} once, best first, got {value}")
    return list(value)


def parse_gold(task: str, raw: Any, n_responses: int) -> dict[str, Any]:
    """A gold answer of `task` in the answer's shape (positions in import order)."""
    if task in ("edit", "chat"):
        _fail("D109", "gold", f"{task} items take no gold answer")
    if not isinstance(raw, dict):
        _fail("D103", "gold", f"expected an object, got {_tname(raw)}")
    key = {"pairwise": "choice", "rank": "ranking", "rate": "scores"}[task]
    extra = sorted(set(raw) - {key})
    if extra or key not in raw:
        _fail("D103", "gold", f"a {task} gold answer is {{{key!r}: ...}}, got keys {sorted(raw)}")
    value = raw[key]
    if task == "pairwise":
        if value not in CHOICES:
            _fail("D109", "gold.choice", f"expected one of {CHOICES}, got {value!r}")
        return {"choice": value}
    if task == "rank":
        return {"ranking": _gold_ranking(value, n_responses)}
    if not isinstance(value, dict) or not value:
        _fail("D103", "gold.scores", f"expected an object of axis -> 1-5, got {_tname(value)}")
    unknown = sorted(set(value) - set(RATE_AXES))
    if unknown:
        _fail("D109", "gold.scores", f"unknown axes {unknown}; expected some of {RATE_AXES}")
    return {"scores": {axis: _score(value[axis], f"gold.scores.{axis}") for axis in RATE_AXES if axis in value}}


# ---------------------------------------------------------------------------------------------------------
# Answers (submitted forms) -> the stored answer, in import positions


def rank_answer(ranking: str, presented_order: list[int]) -> dict[str, Any]:
    """`ranking` lists the numbers shown on the page (1 = first shown), best first: "2,1,3", "2 1 3" or,
    with at most 9 responses, "213". Every response once."""
    k = len(presented_order)
    tokens = re.findall(r"\d+", ranking)
    if len(tokens) == 1 and len(tokens[0]) == k:
        tokens = list(tokens[0])
    shown = [int(t) for t in tokens]
    if sorted(shown) != list(range(1, k + 1)):
        raise BadAnswer(f"rank every response once: the numbers 1-{k}, best first (got {ranking.strip()!r})")
    return {"ranking": [presented_order[d - 1] for d in shown]}


def rate_answer(scores: dict[str, int | None], flags: list[str]) -> dict[str, Any]:
    """Every axis scored 1-5; flags from RATE_FLAGS (repeats ignored, kept in RATE_FLAGS order)."""
    for axis in RATE_AXES:
        if scores.get(axis) not in RATE_SCALE:
            raise BadAnswer(f"score {axis} from 1 to 5 (got {scores.get(axis)!r})")
    unknown = sorted(set(flags) - set(RATE_FLAGS))
    if unknown:
        raise BadAnswer(f"unknown flags {unknown}; expected some of {RATE_FLAGS}")
    return {"scores": {axis: scores[axis] for axis in RATE_AXES}, "flags": [f for f in RATE_FLAGS if f in flags]}


def normalise_newlines(text: str) -> str:
    """Browsers send a textarea's line breaks as CRLF; we store and compare LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def edit_answer(edited: str, original: str) -> dict[str, Any]:
    """The edited text (not blank, at most MAX_EDIT_CHARS) and whether it differs from the original."""
    text = normalise_newlines(edited)
    if not text.strip():
        raise BadAnswer("the edited response is empty; skip the item instead if it cannot be fixed")
    if len(text) > MAX_EDIT_CHARS or "\x00" in text:
        raise BadAnswer(f"the edited response must be text of at most {MAX_EDIT_CHARS} characters")
    return {"edited": text, "changed": text != normalise_newlines(original)}


# ---------------------------------------------------------------------------------------------------------
# Units for agreement and quality


def units(task: str, answer: dict[str, Any]) -> dict[Unit, Hashable]:
    """The nominal judgements in one answer (or gold answer), by unit (see the module docstring)."""
    if task == "pairwise":
        return {(): answer["choice"]}
    if task == "rank":
        place = {p: i for i, p in enumerate(answer["ranking"])}
        return {(a, b): place[a] < place[b] for a, b in itertools.combinations(sorted(place), 2)}
    if task == "rate":
        return {(axis,): score for axis, score in answer["scores"].items()}
    if task == "chat":
        return {}
    return {("changed",): answer["changed"]}
