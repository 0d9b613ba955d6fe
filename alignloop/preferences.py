"""Conversions between feedback kinds, and readers for public preference sets.

Conversions (`ranking_to_pairs`, `ratings_to_pairs`, `edit_to_pair`, `pairs_from_votes`, `votes_to_thumbs`)
validate their input with the same rules, derive ids from the source ids, and return a `ConversionReport`
counting every record they leave out (ties, both-bad votes, small gaps, identical texts). A `Vote` is a
side-by-side judgement (a, b, tie or both bad, with an optional Likert strength): the feedback app's raw
form, not a loadable kind. Public evaluation sets have their own readers with the same error locations:
`load_pandalm` (three annotators per item; `pandalm_annotator_pairs`, `pandalm_majority_pairs`) and
`load_llmbar`; hh-rlhf pairs load with `load_records(path, "pair")`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignloop.data import (
    RECORD_TYPES,
    DataError,
    Edit,
    Message,
    PreferencePair,
    Ranking,
    Rating,
    Thumb,
    _Bad,
    _fail,
    _json_rows,
    _msgs,
    _parse,
    _Row,
    _text,
    _tname,
    _turns,
)

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Conversions between feedback kinds. Each validates its input records with the loader's rules (DataError
# naming the record id), derives ids from the source ids, and counts every record it leaves out.

STRENGTH_MARGINS: dict[str, float] = {
    "much better": 3.0, "significantly better": 3.0, "better": 2.0, "slightly better": 1.0,
    "negligibly better": 0.0, "tie": 0.0,
}
VOTE_CHOICES = ("a", "b", "tie", "both_bad")


@dataclass(frozen=True)
class Vote:
    """One side-by-side judgement of `response_a` and `response_b`: `choice` "a" or "b" (that one is better),
    "tie" (equally good) or "both_bad"; `strength` optional (a key of STRENGTH_MARGINS)."""

    id: str
    prompt: list[Message]
    response_a: str
    response_b: str
    choice: str
    strength: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion kept and what it dropped, by reason; nothing is left out without a count."""

    kept: int
    dropped_ties: int = 0
    dropped_both_bad: int = 0
    dropped_small_gap: int = 0
    dropped_no_majority: int = 0
    dropped_unusable: int = 0
    dropped_identical: int = 0

    @property
    def dropped(self) -> int:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("dropped_"))


def _checked(kind: str, rec: Any) -> None:
    """Apply the loader's rules to one in-memory record; DataError names its id."""
    expected = isinstance(rec, RECORD_TYPES[kind])  # (not narrowed: mypy would make rec an object)
    if not expected:
        raise TypeError(f"expected a {RECORD_TYPES[kind].__name__}, got {type(rec).__name__}")
    try:
        _parse(kind, dataclasses.asdict(rec), None)
    except _Bad as bad:
        raise DataError(bad.code, bad.detail, field=bad.field, record_id=str(rec.id)) from None


def _unique_ids(records: list[Any]) -> None:
    """Derived ids are unique unless source ids contain our separators; refuse such a collision (D107)."""
    seen: set[str] = set()
    for rec in records:
        if rec.id in seen:
            raise DataError("D107", "two derived records share this id", field="id", record_id=rec.id)
        seen.add(rec.id)


def _copy(messages: list[Message]) -> list[Message]:
    return [dict(m) for m in messages]


def ranking_to_pairs(r: Ranking) -> list[PreferencePair]:
    """All K(K-1)/2 pairs of a ranking (best first), better response chosen. Pair id `"<ranking id>:<i>><j>"`
    with ranks i < j; meta is the ranking's plus `group` = ranking id (keep a prompt's pairs in one batch,
    InstructGPT) and `ranks` = [i, j]; no margin."""
    _checked("ranking", r)
    pairs = [
        PreferencePair(f"{r.id}:{i}>{j}", _copy(r.prompt), r.responses[i], r.responses[j],
                       meta={**r.meta, "group": r.id, "ranks": [i, j]})
        for i, j in itertools.combinations(range(len(r.responses)), 2)
    ]
    _unique_ids(pairs)
    return pairs


def _rating_score(r: Rating, axis: str) -> float:
    if axis != "mean":
        if axis not in r.scores:
            raise DataError("D102", "the rating has no score on this axis", field=f"scores.{axis}", record_id=r.id)
        return r.scores[axis]
    if "mean" in r.scores:
        raise DataError("D109", "axis='mean' is ambiguous: the rating has an axis named 'mean'",
                        field="scores.mean", record_id=r.id)
    return math.fsum(r.scores.values()) / len(r.scores)  # fsum: the same mean in any axis order


def _rating_groups(ratings: Iterable[Rating]) -> list[list[Rating]]:
    groups: dict[tuple[Any, ...], list[Rating]] = {}
    for r in ratings:
        _checked("rating", r)
        annotator = r.meta.get("annotator_id")
        if annotator is not None and (isinstance(annotator, bool) or not isinstance(annotator, (str, int))):
            raise DataError("D103", f"expected a string or integer, got {_tname(annotator)}",
                            field="meta.annotator_id", record_id=r.id)
        key = (tuple((m["role"], m["content"]) for m in r.prompt), type(annotator).__name__, annotator)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def ratings_to_pairs(
    ratings: Iterable[Rating], axis: str = "overall", min_gap: float = 0.0
) -> tuple[list[PreferencePair], ConversionReport]:
    """Pairs from per-response ratings of the same prompt, scored on `axis` (a named axis, or "mean" for
    the mean of every axis; ratings in one group must then share their axes).

    Groups: ratings with equal prompt messages and equal `meta["annotator_id"]` (ratings without one form
    their own group per prompt), so different annotators' scales are never compared. Within a group every
    two ratings (input order) give one pair: higher score chosen, margin = score difference. Equal scores
    (dropped_ties), differences below `min_gap` (dropped_small_gap) and the same response text rated twice
    (dropped_identical) give no pair. Pair id `"<chosen id>><rejected id>"`; meta `group` (first rating id
    of the group), `axis`, `chosen_id`, `rejected_id` and `annotator_id` when set.
    """
    if not (isinstance(min_gap, (int, float)) and math.isfinite(min_gap) and min_gap >= 0):
        raise ValueError(f"min_gap must be a finite number >= 0, got {min_gap!r}")
    pairs, counts = [], Counter[str]()
    for group in _rating_groups(ratings):
        if axis == "mean" and len({frozenset(r.scores) for r in group}) > 1:
            raise DataError("D109", "axis='mean' needs the same axes on every rating of a prompt",
                            field="scores", record_id=group[-1].id)
        scores = [_rating_score(r, axis) for r in group]
        for (a, sa), (b, sb) in itertools.combinations(zip(group, scores, strict=True), 2):
            (hi, s_hi), (lo, s_lo) = ((a, sa), (b, sb)) if sa >= sb else ((b, sb), (a, sa))
            gap = s_hi - s_lo
            if a.response == b.response:
                counts["dropped_identical"] += 1
            elif gap == 0:
                counts["dropped_ties"] += 1
            elif gap < min_gap:
                counts["dropped_small_gap"] += 1
            elif not math.isfinite(gap):
                raise DataError("D109", f"score difference overflows ({s_hi} - {s_lo})", field=f"scores.{axis}",
                                record_id=lo.id)
            else:
                meta = {"group": group[0].id, "axis": axis, "chosen_id": hi.id, "rejected_id": lo.id}
                if "annotator_id" in hi.meta:
                    meta["annotator_id"] = hi.meta["annotator_id"]
                pairs.append(PreferencePair(f"{hi.id}>{lo.id}", _copy(hi.prompt), hi.response, lo.response,
                                            margin=gap, meta=meta))
    _unique_ids(pairs)
    return pairs, ConversionReport(kept=len(pairs), **counts)


def edit_to_pair(e: Edit) -> PreferencePair:
    """The edited text chosen over the original (same id, the edit's meta); identical texts raise D109."""
    _checked("edit", e)
    return PreferencePair(e.id, _copy(e.prompt), e.edited, e.original, meta=dict(e.meta))


def strength_to_margin(strength: str) -> float:
    """Margin of a stated preference strength on a 4-step Likert scale: "much better" 3, "better" 2,
    "slightly better" 1, "tie" 0 (Llama 2's "significantly better" = 3 and "negligibly better" = 0 are
    accepted too). Case and surrounding or repeated spaces are ignored; anything else raises D109."""
    key = " ".join(strength.split()).lower() if isinstance(strength, str) else None
    if key not in STRENGTH_MARGINS:
        raise DataError("D109", f"unknown strength {strength!r}; expected one of {sorted(STRENGTH_MARGINS)}",
                        field="strength")
    return STRENGTH_MARGINS[key]


def _check_vote(v: Vote) -> None:
    if not isinstance(v, Vote):
        raise TypeError(f"expected a Vote, got {type(v).__name__}")
    try:
        _text(v.id, "id")
        _turns(_msgs(v.prompt, "prompt", None), "user")
        if _text(v.response_a, "response_a") == _text(v.response_b, "response_b"):
            _fail("D109", "response_b", "response_a and response_b are identical")
        if v.choice not in VOTE_CHOICES:
            _fail("D109", "choice", f"expected one of {VOTE_CHOICES}, got {v.choice!r}")
        if v.strength is not None:
            is_tie = " ".join(_text(v.strength, "strength").split()).lower() == "tie"
            strength_to_margin(v.strength)
            if is_tie != (v.choice in ("tie", "both_bad")):
                _fail("D109", "strength", f"strength {v.strength!r} contradicts choice {v.choice!r}")
    except _Bad as bad:
        raise DataError(bad.code, bad.detail, field=bad.field, record_id=v.id if isinstance(v.id, str) else None) from None
    except DataError as err:
        raise DataError(err.code, err.detail, field=err.field, record_id=v.id) from None


def pairs_from_votes(votes: Iterable[Vote]) -> tuple[list[PreferencePair], ConversionReport]:
    """One pair per decisive vote (the chosen side first; same id and meta; margin from `strength` when
    given). Ties (dropped_ties) and both-bad votes (dropped_both_bad) give no pair: see votes_to_thumbs."""
    pairs, counts = [], Counter[str]()
    for v in votes:
        _check_vote(v)
        if v.choice in ("tie", "both_bad"):
            counts["dropped_ties" if v.choice == "tie" else "dropped_both_bad"] += 1
            continue
        chosen, rejected = (v.response_a, v.response_b) if v.choice == "a" else (v.response_b, v.response_a)
        margin = None if v.strength is None else strength_to_margin(v.strength)
        pairs.append(PreferencePair(v.id, _copy(v.prompt), chosen, rejected, margin, v.strength, dict(v.meta)))
    _unique_ids(pairs)
    return pairs, ConversionReport(kept=len(pairs), **counts)


def votes_to_thumbs(votes: Iterable[Vote]) -> list[Thumb]:
    """Two unpaired KTO-style judgements per vote, ids `"<vote id>:a"` and `":b"`: the chosen side up and the
    other down; a tie (equally good) gives two ups and both-bad two downs, so nothing is thrown away.
    Strength is not used; meta is the vote's plus `vote_id` and `choice`."""
    up_a_b = {"a": (True, False), "b": (False, True), "tie": (True, True), "both_bad": (False, False)}
    thumbs = []
    for v in votes:
        _check_vote(v)
        meta = {**v.meta, "vote_id": v.id, "choice": v.choice}
        for side, response, up in zip("ab", (v.response_a, v.response_b), up_a_b[v.choice], strict=True):
            thumbs.append(Thumb(f"{v.id}:{side}", _copy(v.prompt), response, up, dict(meta)))
    _unique_ids(thumbs)
    return thumbs


def majority_vote(labels: Iterable[Any], *, strict: bool = False) -> Any:
    """The most frequent label among those given (None entries are missing), or None when there is none or
    the top count is shared. strict=True also needs more than half of the given labels."""
    counts = Counter(x for x in labels if x is not None).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    if strict and 2 * counts[0][1] <= sum(c for _, c in counts):
        return None
    return counts[0][0]


# ---------------------------------------------------------------------------------------------------------
# Public evaluation sets, read through the same checks (DataError with file:line and field).

PANDALM_ANNOTATORS = ("annotator1", "annotator2", "annotator3")
_PANDALM_CHOICE = {0: "tie", 1: "a", 2: "b"}


@dataclass(frozen=True)
class PandaLMItem:
    """A PandaLM test item: `labels` maps annotator1..3 to 0 (tie), 1 (response1 better) or 2 (response2
    better). A response is None where the file holds a JSON boolean instead of text (6 items upstream);
    responses and `input` may be empty. `meta`: idx, motivation_app, cmp_key and any other columns."""

    id: str
    instruction: str
    input: str
    response1: str | None
    response2: str | None
    labels: dict[str, int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> list[Message] | None:
        """One user turn: instruction and input joined by a blank line ("\\n\\n"), each as written, a blank
        part (empty or whitespace) left out; None when both are blank."""
        parts = [p for p in (self.instruction, self.input) if p.strip()]
        return [{"role": "user", "content": "\n\n".join(parts)}] if parts else None


def _raw_text(value: Any, fld: str) -> str:
    """A string that may be empty (but has no NUL or lone surrogate)."""
    if not isinstance(value, str):
        _fail("D103", fld, f"expected a string, got {_tname(value)}")
    return _text(value, fld) if value.strip() else value


def _pandalm_item(raw: Any) -> PandaLMItem:
    if not isinstance(raw, dict):
        _fail("D103", "<row>", f"expected an object, got {_tname(raw)}")
    r = _Row(raw)
    idx = r.req("idx")
    if isinstance(idx, bool) or not isinstance(idx, int):
        _fail("D103", "idx", f"expected an integer, got {_tname(idx)}")
    responses = []
    for fld in ("response1", "response2"):
        value = r.req(fld)  # upstream quirk: a bare `true` where the model answered "True"; kept as unusable
        responses.append(None if isinstance(value, bool) else _raw_text(value, fld))
    labels = {}
    for name in PANDALM_ANNOTATORS:
        label = r.req(name)
        if isinstance(label, bool) or not isinstance(label, int):
            _fail("D103", name, f"expected 0, 1 or 2, got {_tname(label)}")
        if label not in _PANDALM_CHOICE:
            _fail("D109", name, f"expected 0 (tie), 1 or 2, got {label}")
        labels[name] = label
    instruction, text_input = _raw_text(r.req("instruction"), "instruction"), _raw_text(r.get("input") or "", "input")
    meta = {"idx": idx, **{k: v for k, v in r.data.items() if k not in r.used}}
    return PandaLMItem(f"pandalm-{idx}", instruction, text_input, responses[0], responses[1], labels, meta)


def load_pandalm(path: str | Path) -> list[PandaLMItem]:
    """Every item of PandaLM's `testset-v1.json` (a JSON list; 999 items), checked: `idx` an integer and
    unique (id `"pandalm-<idx>"`), texts strings, labels 0/1/2; the first bad row raises DataError.
    Items with unusable text are kept here (their labels count for agreement) and dropped, counted, by
    pandalm_votes / pandalm_majority_pairs."""
    source, items, seen = str(path), [], dict[str, int]()
    for line, raw in _json_rows(source):
        try:
            item = _pandalm_item(raw)
        except _Bad as bad:
            raise DataError(bad.code, bad.detail, path=source, line=line, field=bad.field) from None
        if item.id in seen:
            raise DataError("D107", f"idx already used on line {seen[item.id]}", path=source, line=line,
                            field="idx", record_id=item.id)
        seen[item.id] = line
        items.append(item)
    logger.info("loaded %d PandaLM items from %s", len(items), source)
    return items


def _pandalm_texts(item: PandaLMItem) -> tuple[list[Message], str, str] | str:
    """(prompt, response1, response2), or why the item gives no vote: "unusable" (no prompt, a non-text
    or blank response) or "identical"."""
    prompt, a, b = item.prompt, item.response1, item.response2
    if prompt is None or a is None or b is None or not a.strip() or not b.strip():
        return "unusable"
    return "identical" if a == b else (prompt, a, b)


def pandalm_votes(items: Iterable[PandaLMItem]) -> tuple[list[Vote], ConversionReport]:
    """One Vote per annotator label (id `"<item id>:<annotator>"`, meta `annotator_id`, `item_id`, item
    meta); an item with unusable or identical texts gives none (3 votes counted as dropped)."""
    votes, counts = [], Counter[str]()
    for item in items:
        texts = _pandalm_texts(item)
        if isinstance(texts, str):
            counts[f"dropped_{texts}"] += len(item.labels)
            continue
        for name, label in item.labels.items():
            meta = {**item.meta, "annotator_id": name, "item_id": item.id}
            votes.append(Vote(f"{item.id}:{name}", *texts, _PANDALM_CHOICE[label], meta=meta))
    return votes, ConversionReport(kept=len(votes), **counts)


def pandalm_annotator_pairs(items: Iterable[PandaLMItem]) -> tuple[list[PreferencePair], ConversionReport]:
    """Each annotator's decisive label as a pair (meta `annotator_id`); ties and unusable items counted."""
    votes, vote_report = pandalm_votes(items)
    pairs, report = pairs_from_votes(votes)
    return pairs, dataclasses.replace(report, dropped_unusable=vote_report.dropped_unusable,
                                      dropped_identical=vote_report.dropped_identical)


def pandalm_majority_pairs(items: Iterable[PandaLMItem]) -> tuple[list[PreferencePair], ConversionReport]:
    """One pair per item from the majority label (id = item id, meta `labels`): each item is counted once,
    as unusable or identical text, no majority (three different labels), a majority tie, or kept."""
    votes, counts = [], Counter[str]()
    for item in items:
        texts, label = _pandalm_texts(item), majority_vote(item.labels.values())
        if isinstance(texts, str):
            counts[f"dropped_{texts}"] += 1
        elif label is None:
            counts["dropped_no_majority"] += 1
        else:
            meta = {**item.meta, "labels": dict(item.labels)}
            votes.append(Vote(item.id, *texts, _PANDALM_CHOICE[label], meta=meta))
    pairs, report = pairs_from_votes(votes)
    return pairs, dataclasses.replace(report, **counts)


def _llmbar_pair(raw: Any, rid: str, subset: str) -> PreferencePair:
    if not isinstance(raw, dict):
        _fail("D103", "<row>", f"expected an object, got {_tname(raw)}")
    r = _Row(raw)
    prompt = _text(r.req("input"), "input")
    outputs = (_text(r.req("output_1"), "output_1"), _text(r.req("output_2"), "output_2"))
    label = r.req("label")
    if isinstance(label, bool) or not isinstance(label, int):
        _fail("D103", "label", f"expected 1 or 2, got {_tname(label)}")
    if label not in (1, 2):
        _fail("D109", "label", f"expected 1 or 2, got {label}")
    if outputs[0] == outputs[1]:
        _fail("D109", "output_2", "output_1 and output_2 are identical")
    meta = {**{k: v for k, v in r.data.items() if k not in r.used}, "subset": subset, "label": label}
    return PreferencePair(rid, [{"role": "user", "content": prompt}], outputs[label - 1], outputs[2 - label], meta=meta)


def load_llmbar(path_or_dir: str | Path) -> list[PreferencePair]:
    """LLMBar pairs from one `raw-<subset>.json` file or every such file of a folder (sorted by name): the
    output named by `label` is chosen. Id `"llmbar-<subset>-<index>"` (0-based position in the file), meta
    `subset` (e.g. "natural", "adversarial-neighbor") and `label`. Strict: an empty or identical output, or
    a label other than 1 or 2, raises DataError (the published files have none)."""
    path = Path(path_or_dir).expanduser()
    files = sorted(path.glob("raw-*.json")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"{path_or_dir}: no LLMBar raw-*.json file")
    pairs = []
    for file in files:
        subset = file.stem.removeprefix("raw-")
        for index, (line, raw) in enumerate(_json_rows(str(file))):
            try:
                pairs.append(_llmbar_pair(raw, f"llmbar-{subset}-{index}", subset))
            except _Bad as bad:
                raise DataError(bad.code, bad.detail, path=str(file), line=line, field=bad.field) from None
    logger.info("loaded %d LLMBar pairs from %d files", len(pairs), len(files))
    return pairs

