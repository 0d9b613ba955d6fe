"""The app's only link to training: items it imports and the training records it exports.

Import row (JSON Lines, one item per line; or a list in the JSON API):
`{"id": "q1", "prompt": "text" | [messages], "responses": [{"text", "model", "version"?, "author"?}, ...],
"author"?: "user name", "gold"?: {...}, "meta"?: {...}}` -- as many responses as the project's task takes
(`tasks.RESPONSES`; chat items hold a prompt only, `responses` may be left out), a gold answer in the task's shape (`tasks.parse_gold`), other keys go to meta, as in
`alignloop.data`. Validation uses the loaders' rules and error codes; the first bad row raises
`DataError` naming the line and field, and nothing is written.

Export (pairwise; the other tasks' exports are in `exports.py`): raw per-annotator votes (`preferences.Vote` rows, ties and both-bad included), pairs per
annotator or one consensus pair per item (`PreferencePair` rows with the margin of the stated strength,
ties and both-bad dropped and counted), and thumbs (`votes_to_thumbs`). Pair files load with
`alignloop.data.load_records(path, "pair")`, the reward trainer's loader.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from alignloop.agreement import krippendorff_alpha, percent_agreement
from alignloop.data import DataError, Message, _Bad, _fail, _msgs, _Row, _text, _tname, _turns
from alignloop.feedback import tasks
from alignloop.preferences import (
    STRENGTH_MARGINS,
    ConversionReport,
    Vote,
    majority_vote,
    pairs_from_votes,
    votes_to_thumbs,
)

STRENGTHS = ("much better", "better", "slightly better")
EXPORT_KINDS = ("pairs", "annotator-pairs", "votes", "thumbs")


@dataclass(frozen=True)
class ResponseIn:
    text: str
    model: str
    version: str = ""
    author: str | None = None


@dataclass(frozen=True)
class ItemIn:
    """A validated import row."""

    id: str
    prompt: list[Message]
    responses: list[ResponseIn]
    author: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    gold: dict[str, Any] | None = None
    """The known answer (`tasks.parse_gold`), or None."""
    task: str = "pairwise"
    """The task the row was validated for; importing it into a project of another task is refused."""
    line: int = 0
    """Where the row came from (for errors found later, such as an id already in the project)."""

    @property
    def authors(self) -> set[str]:
        """Everyone who wrote part of the item: they are never assigned it."""
        return {a for a in (self.author, *(r.author for r in self.responses)) if a}


def _optional_text(r: _Row, key: str, fld: str) -> str | None:
    value = r.get(key)
    return None if value is None else _text(value, fld)


def _response_in(raw: Any, fld: str) -> ResponseIn:
    if not isinstance(raw, dict):
        _fail("D103", fld, f"expected an object with 'text' and 'model', got {_tname(raw)}")
    r = _Row(raw)
    for key in ("text", "model"):
        if not r.has(key):
            _fail("D102", f"{fld}.{key}", "required field is missing or null" + (" (name the model that wrote it)"
                                                                                   if key == "model" else ""))
    text, model = _text(r.get("text"), f"{fld}.text"), _text(r.get("model"), f"{fld}.model")
    version = _optional_text(r, "version", f"{fld}.version") or ""
    author = _optional_text(r, "author", f"{fld}.author")
    extra = sorted(set(r.data) - r.used)
    if extra:
        _fail("D103", fld, f"unexpected keys {extra}")
    return ResponseIn(text, model, version, author)


def _responses(raw: Any, task: str) -> list[ResponseIn]:
    """The item's responses: as many as the task takes, texts all different."""
    if not isinstance(raw, list):
        _fail("D103", "responses", f"expected a list of responses, got {_tname(raw)}")
    lo, hi = tasks.RESPONSES[task]
    if not lo <= len(raw) <= hi:
        _fail("D109", "responses", f"a {task} item needs {tasks.responses_rule(task)} responses, got {len(raw)}")
    responses = [_response_in(v, f"responses[{i}]") for i, v in enumerate(raw)]
    texts = [r.text for r in responses]
    for i, text in enumerate(texts):
        if text in texts[:i]:
            _fail("D109", f"responses[{i}].text", f"identical to responses[{texts.index(text)}]")
    return responses


def parse_item(raw: Any, task: str = "pairwise") -> ItemIn:
    """One import row for a project of `task`; raises `_Bad` naming the field (the caller adds the line)."""
    if not isinstance(raw, dict):
        _fail("D103", "<row>", f"expected an object, got {_tname(raw)}")
    r = _Row(raw)
    item_id = _text(r.data["id"], "id") if r.has("id") else _fail("D102", "id", "required field is missing or null")
    if len(item_id) > 200:
        _fail("D109", "id", "ids are at most 200 characters")
    prompt = _turns(_msgs(r.req("prompt"), "prompt", "user"), "user")
    responses = _responses(r.get("responses") or [] if task == "chat" else r.req("responses"), task)
    gold = tasks.parse_gold(task, r.get("gold"), len(responses)) if r.has("gold") else None
    author = _optional_text(r, "author", "author")
    meta = r.data.get("meta", {})
    if not isinstance(meta, dict):
        _fail("D103", "meta", f"expected an object, got {_tname(meta)}")
    extra = {k: v for k, v in r.data.items() if k not in r.used}
    return ItemIn(item_id, prompt, responses, author, {**meta, **extra}, gold, task)


def parse_items(rows: Iterable[tuple[int, Any]], source: str, task: str = "pairwise") -> list[ItemIn]:
    """Validated items from (line, row) pairs; the first bad row or repeated id raises DataError."""
    tasks.check_task(task)
    items, seen = [], dict[str, int]()
    for line, raw in rows:
        try:
            item = parse_item(raw, task)
        except _Bad as bad:
            raise DataError(bad.code, bad.detail, path=source, line=line, field=bad.field) from None
        if item.id in seen:
            raise DataError("D107", f"id already used on line {seen[item.id]}", path=source, line=line, field="id",
                            record_id=item.id)
        seen[item.id] = line
        items.append(dataclasses.replace(item, line=line))
    return items


def parse_jsonl(data: bytes, source: str, task: str = "pairwise") -> list[ItemIn]:
    """Items from a JSON Lines upload (UTF-8); DataError with `source:line` for the first problem."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError("D108", f"invalid UTF-8 byte {data[err.start]:#04x}", path=source,
                        line=data.count(b"\n", 0, err.start) + 1) from None
    rows = []
    for line, chunk in enumerate(text.split("\n"), 1):
        if chunk.strip():
            try:
                rows.append((line, json.loads(chunk)))
            except (ValueError, RecursionError) as err:
                raise DataError("D101", str(err), path=source, line=line) from None
    if not rows:
        raise DataError("D104", "no items in the upload", path=source)
    return parse_items(rows, source, task)


# ---------------------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class VoteRow:
    """One active label with what the export needs from its item (read by services.vote_rows)."""

    item_id: str
    prompt: list[Message]
    texts: tuple[str, str]
    models: tuple[dict[str, Any], dict[str, Any]]
    annotator: str
    choice: str
    strength: str | None
    meta: dict[str, Any]


def to_votes(rows: Iterable[VoteRow]) -> list[Vote]:
    """Raw per-annotator votes, id `"<item id>:<annotator>"`."""
    return [Vote(f"{r.item_id}:{r.annotator}", r.prompt, r.texts[0], r.texts[1], r.choice, r.strength,
                 {**r.meta, "item_id": r.item_id, "prompt_id": r.item_id, "annotator_id": r.annotator,
                  "model_a": r.models[0], "model_b": r.models[1]})
            for r in rows]


def _consensus_strength(votes: list[Vote]) -> str | None:
    """The lower median of the winners' stated margins, as its strength name (None if none stated)."""
    margins = sorted(STRENGTH_MARGINS[v.strength] for v in votes if v.strength)
    if not margins:
        return None
    median = statistics.median_low(margins)
    return next(s for s in STRENGTHS if STRENGTH_MARGINS[s] == median)


def consensus_votes(votes: list[Vote]) -> tuple[list[Vote], int]:
    """One vote per item: the majority choice (a shared top count gives none, counted), the winners'
    median strength, meta `votes` (count per choice), `n_annotators`, `agreement` (winners' share)."""
    by_item: dict[str, list[Vote]] = defaultdict(list)
    for v in votes:
        by_item[v.meta["item_id"]].append(v)
    out, no_majority = [], 0
    for item_id, group in by_item.items():
        choice = majority_vote(v.choice for v in group)
        if choice is None:
            no_majority += 1
            continue
        winners = [v for v in group if v.choice == choice]
        counts = {c: sum(v.choice == c for v in group) for c in ("a", "b", "tie", "both_bad")}
        meta = {"item_id": item_id, "prompt_id": item_id, "model_a": group[0].meta["model_a"],
                "model_b": group[0].meta["model_b"], "votes": counts, "n_annotators": len(group),
                "agreement": len(winners) / len(group), "annotators": sorted(v.meta["annotator_id"] for v in group)}
        strength = _consensus_strength(winners) if choice in ("a", "b") else None
        first = group[0]
        out.append(Vote(item_id, first.prompt, first.response_a, first.response_b, choice, strength, meta))
    return out, no_majority


def export_records(kind: str, rows: list[VoteRow]) -> tuple[list[dict[str, Any]], ConversionReport]:
    """Rows of the `kind` export file (one of EXPORT_KINDS) and what was left out."""
    votes = to_votes(rows)
    if kind == "votes":
        return [dataclasses.asdict(v) for v in votes], ConversionReport(kept=len(votes))
    if kind == "thumbs":
        thumbs = votes_to_thumbs(votes)
        return [dataclasses.asdict(t) for t in thumbs], ConversionReport(kept=len(thumbs))
    if kind == "annotator-pairs":
        pairs, report = pairs_from_votes(_with_models(v) for v in votes)
    elif kind == "pairs":
        consensus, no_majority = consensus_votes(votes)
        pairs, report = pairs_from_votes(_with_models(v) for v in consensus)
        report = dataclasses.replace(report, dropped_no_majority=no_majority)
    else:
        raise ValueError(f"export kind must be one of {EXPORT_KINDS}, got {kind!r}")
    return [dataclasses.asdict(p) for p in pairs], report


def _with_models(v: Vote) -> Vote:
    """Name the chosen and rejected responses' models in meta (a decisive vote becomes a pair)."""
    if v.choice not in ("a", "b"):
        return v
    a, b = v.meta["model_a"], v.meta["model_b"]
    chosen, rejected = (a, b) if v.choice == "a" else (b, a)
    return dataclasses.replace(v, meta={**v.meta, "chosen_model": chosen, "rejected_model": rejected})


def agreement(choices_by_item: Iterable[list[Any]], level: str = "nominal") -> dict[str, float | None]:
    """Krippendorff's alpha (at `level`: nominal, or ordinal for rating scores) and percent agreement of
    the labels on units with >= 2 of them; None where undefined (JSON has no NaN)."""
    data = [list(c) for c in choices_by_item]
    values = {"krippendorff_alpha": krippendorff_alpha(data, level),  # type: ignore[arg-type]
              "percent_agreement": percent_agreement(data)}
    return {k: None if math.isnan(v) else v for k, v in values.items()}


def jsonl(records: Iterable[dict[str, Any]]) -> str:
    """JSON Lines text (UTF-8 kept readable)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
