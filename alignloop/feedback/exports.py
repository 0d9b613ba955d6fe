"""Labels as training records, for every task: which kinds each task exports, and the rank, rate and
edit conversions (pairwise ones are in records.py, chat ones in conversations.py). Each kind loads with `alignloop.data.load_records`.

| task | consensus (one row per item) | raw (one row per annotator answer) | derived |
|---|---|---|---|
| pairwise | `pairs` | `votes`, `annotator-pairs` | `thumbs` |
| rank | `rankings` (mean rank, Borda) | `annotator-rankings` | `pairs`, `annotator-pairs` (all K(K-1)/2) |
| rate | `ratings` (median per axis, flags raised by a majority) | `annotator-ratings` | |
| edit | (free text has none) | `edits` (unchanged texts dropped, counted) | `pairs` (edit over original), `thumbs` |
| chat | (each conversation is its own) | `conversations` (SFTExample, drafts in meta) | `pairs` (pick over each other draft), `thumbs` |

Raw rows have id `"<item id>:<annotator>"` and meta `annotator_id`, `item_id`, `prompt_id` (so trainers
split by item), `presented_order`, `time_spent_ms`, `labelled_at` and the model tags; consensus rows have
the item id and meta `n_annotators`, `annotators` and the per-item figures named below.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from alignloop.data import Edit, Message, PreferencePair, Ranking, Rating, SFTExample, Thumb
from alignloop.feedback import conversations, records, services, tasks
from alignloop.feedback.db import Assignment, ChatDraft, ChatPick, ChatTurn, Item, Project, User
from alignloop.preferences import ConversionReport, edit_to_pair, ranking_to_pairs

EXPORT_KINDS: dict[str, tuple[str, ...]] = {
    "pairwise": records.EXPORT_KINDS,
    "rank": ("rankings", "annotator-rankings", "pairs", "annotator-pairs"),
    "rate": ("ratings", "annotator-ratings"),
    "edit": ("edits", "pairs", "thumbs"),
    "chat": conversations.EXPORT_KINDS,
}
"""Per task; the first is what a download gives by default."""
RAW_KIND = {"pairwise": "votes", "rank": "annotator-rankings", "rate": "annotator-ratings", "edit": "edits",
            "chat": "conversations"}
"""What the labels API gives by default: every annotator's answer as it was given."""
ALL_KINDS = tuple(dict.fromkeys(k for kinds in EXPORT_KINDS.values() for k in kinds))
LOADS_AS = {"pairs": "pair", "annotator-pairs": "pair", "votes": None, "thumbs": "thumb", "rankings": "ranking",
            "annotator-rankings": "ranking", "ratings": "rating", "annotator-ratings": "rating", "edits": "edit",
            "conversations": "sft"}
"""The `load_records` kind of each export (votes are `preferences.Vote` rows, read as plain JSON Lines;
conversations are `SFTExample` rows, the whole conversation as picked, with every draft in meta)."""

Records = tuple[list[dict[str, Any]], ConversionReport]


@dataclass(frozen=True)
class AnswerRow:
    """One active rank, rate or edit answer with what the export needs from its item."""

    item_id: str
    prompt: list[Message]
    texts: tuple[str, ...]
    models: tuple[dict[str, Any], ...]
    annotator: str
    answer: dict[str, Any]
    meta: dict[str, Any]


def resolve_kind(task: str, kind: str | None, *, raw: bool = False) -> str:
    """`kind`, or the task's default (raw or consensus); Invalid if the task does not export it."""
    kinds = EXPORT_KINDS[task]
    kind = kind or (RAW_KIND[task] if raw else kinds[0])
    if kind not in kinds:
        raise services.Invalid(f"a {task} project exports {', '.join(kinds)}; not {kind!r}")
    return kind


def answer_rows(db: Session, project: Project) -> list[AnswerRow]:
    """Every active rank, rate or edit answer of the project, oldest first."""
    return [AnswerRow(item.external_id, item.prompt, tuple(r.text for r in item.responses),
                      tuple(services.response_models(item)), username, dict(label.answer),
                      services.label_meta(project, label, item))
            for label, item, username in services.active_labels(db, project) if label.answer is not None]


def export(db: Session, project: Project, kind: str) -> Records:
    """The `kind` records of a project (a kind its task exports: see resolve_kind) and the report."""
    if project.task == "pairwise":
        return records.export_records(kind, services.vote_rows(db, project))
    if project.task == "chat":
        return chat_records(db, project, kind)
    return export_records(project.task, kind, answer_rows(db, project))


def export_records(task: str, kind: str, rows: list[AnswerRow]) -> Records:
    """Rows of a rank, rate or edit export file and what was left out."""
    if task == "rank":
        rankings = consensus_rankings(rows) if kind in ("rankings", "pairs") else [_ranking(r) for r in rows]
        if kind in ("pairs", "annotator-pairs"):
            return _asdicts([p for r in rankings for p in ranking_to_pairs(r)])
        return _asdicts(rankings)
    if task == "rate":
        return _asdicts(consensus_ratings(rows) if kind == "ratings" else [_rating(r) for r in rows])
    if kind == "thumbs":
        return _asdicts([_thumb(r) for r in rows])
    edits = [_edit(r) for r in rows if r.answer["changed"]]
    out = [edit_to_pair(e) for e in edits] if kind == "pairs" else edits
    records_, _ = _asdicts(out)
    return records_, ConversionReport(kept=len(out), dropped_identical=len(rows) - len(edits))


def _asdicts(items: Iterable[Any]) -> Records:
    out = [dataclasses.asdict(x) for x in items]
    return out, ConversionReport(kept=len(out))


def _raw_meta(row: AnswerRow) -> dict[str, Any]:
    return {**row.meta, "item_id": row.item_id, "prompt_id": row.item_id, "annotator_id": row.annotator}


def _by_item(rows: Iterable[AnswerRow]) -> dict[str, list[AnswerRow]]:
    groups: dict[str, list[AnswerRow]] = defaultdict(list)
    for row in rows:
        groups[row.item_id].append(row)
    return groups


def _consensus_meta(item_id: str, group: list[AnswerRow]) -> dict[str, Any]:
    return {"item_id": item_id, "prompt_id": item_id, "n_annotators": len(group),
            "annotators": sorted(r.annotator for r in group)}


# ---------------------------------------------------------------------------------------------------------
# Rank


def _ranking(row: AnswerRow) -> Ranking:
    order = row.answer["ranking"]
    return Ranking(f"{row.item_id}:{row.annotator}", row.prompt, [row.texts[p] for p in order],
                   {**_raw_meta(row), "ranking": order, "models": [row.models[p] for p in order]})


def consensus_rankings(rows: Iterable[AnswerRow]) -> list[Ranking]:
    """One ranking per item: responses by mean rank over its annotators (1 = best; Borda count), equal
    means in import order. Meta `mean_ranks` (by import position), `ranking` (positions, best first) and
    `agreement`: the annotators' mean share of response pairs ordered as in the consensus."""
    out = []
    for item_id, group in _by_item(rows).items():
        k = len(group[0].texts)
        places = [{p: i + 1 for i, p in enumerate(r.answer["ranking"])} for r in group]
        mean_ranks = [statistics.fmean(place[p] for place in places) for p in range(k)]
        order = sorted(range(k), key=lambda p: (mean_ranks[p], p))
        consensus = tasks.units("rank", {"ranking": order})
        shares = [statistics.fmean(v == consensus[u] for u, v in tasks.units("rank", r.answer).items()) for r in group]
        meta = {**_consensus_meta(item_id, group), "mean_ranks": mean_ranks, "ranking": order,
                "models": [group[0].models[p] for p in order], "agreement": statistics.fmean(shares)}
        out.append(Ranking(item_id, group[0].prompt, [group[0].texts[p] for p in order], meta))
    return out


# ---------------------------------------------------------------------------------------------------------
# Rate


def _rating(row: AnswerRow) -> Rating:
    scores = {axis: float(v) for axis, v in row.answer["scores"].items()}
    return Rating(f"{row.item_id}:{row.annotator}", row.prompt, row.texts[0], scores, list(row.answer["flags"]),
                  {**_raw_meta(row), "model": row.models[0]})


def consensus_ratings(rows: Iterable[AnswerRow]) -> list[Rating]:
    """One rating per item: the median score of each axis over its annotators, and the flags raised by
    more than half of them. Meta `flag_counts` (annotators raising each flag) and the model tag."""
    out = []
    for item_id, group in _by_item(rows).items():
        scores = {axis: float(statistics.median(r.answer["scores"][axis] for r in group)) for axis in tasks.RATE_AXES}
        counts = {f: sum(f in r.answer["flags"] for r in group) for f in tasks.RATE_FLAGS}
        flags = [f for f, n in counts.items() if 2 * n > len(group)]
        meta = {**_consensus_meta(item_id, group), "flag_counts": counts, "model": group[0].models[0]}
        out.append(Rating(item_id, group[0].prompt, group[0].texts[0], scores, flags, meta))
    return out


# ---------------------------------------------------------------------------------------------------------
# Edit


def _edit(row: AnswerRow) -> Edit:
    return Edit(f"{row.item_id}:{row.annotator}", row.prompt, row.texts[0], row.answer["edited"],
                {**_raw_meta(row), "model": row.models[0]})


def _thumb(row: AnswerRow) -> Thumb:
    """An annotator who left the response as it was endorsed it (up); one who edited it did not (down)."""
    return Thumb(f"{row.item_id}:{row.annotator}", row.prompt, row.texts[0], not row.answer["changed"],
                 {**_raw_meta(row), "model": row.models[0], "edited": row.answer["changed"]})


# ---------------------------------------------------------------------------------------------------------
# Chat (the conversations themselves are stored by conversations.py)


@dataclass(frozen=True)
class Conversation:
    """One annotator's conversation as far as it is picked, with what the export needs."""

    id: str
    item: Item
    annotator: str
    status: str
    turns: list[tuple[ChatTurn, ChatPick]]


def chat_conversations(db: Session, project: Project) -> list[Conversation]:
    """Every conversation of the project with at least one picked turn, oldest first; an open last turn
    (drafts not yet picked) holds no judgement and is left out."""
    rows = db.execute(sa.select(ChatTurn, Assignment, Item, User.username)
                      .join(Assignment, Assignment.id == ChatTurn.assignment_id).join(Item, Item.id == Assignment.item_id)
                      .join(User, User.id == Assignment.user_id)
                      .where(Assignment.project_id == project.id, ChatTurn.undone_at.is_(None))
                      .order_by(Assignment.id, ChatTurn.position)).all()
    picks = conversations.active_picks(db, [turn for turn, *_ in rows])
    out: dict[int, Conversation] = {}
    for turn, assignment, item, username in rows:
        if turn.id not in picks:
            continue
        conv = out.setdefault(assignment.id, Conversation(f"{item.external_id}:{username}", item, username,
                                                          assignment.status, []))
        conv.turns.append((turn, picks[turn.id]))
    return list(out.values())


def _draft_model(draft: ChatDraft) -> dict[str, Any]:
    return {"name": draft.model_name, "version": draft.model_version}


def _chat_meta(project: Project, conv: Conversation) -> dict[str, Any]:
    return {"project": project.name, "item_id": conv.item.external_id, "prompt_id": conv.item.external_id,
            "annotator_id": conv.annotator, "conversation_id": conv.id,
            **({"item_meta": conv.item.meta} if conv.item.meta else {})}


def _turn_meta(turn: ChatTurn, chosen: ChatPick, draft: ChatDraft) -> dict[str, Any]:
    return {"turn": turn.position, "labelled_at": chosen.created_at.isoformat() + "Z",
            "time_spent_ms": chosen.time_spent_ms, "rounds": conversations.latest_round(turn) + 1,
            "chosen_model": _draft_model(draft), "chosen_draft": [draft.round, draft.position]}


def _pick_pairs(conv_id: str, turn: ChatTurn, draft: ChatDraft, prompt: list[Message],
                meta: dict[str, Any]) -> tuple[list[PreferencePair], int]:
    """The picked draft over every other draft of its turn (all rounds), and how many had the same text."""
    others = [d for d in turn.drafts if d.id != draft.id]
    pairs = [PreferencePair(f"{conv_id}:{turn.position}:{d.round}.{d.position}", [dict(m) for m in prompt], draft.text,
                            d.text, meta={**meta, "rejected_model": _draft_model(d), "rejected_draft": [d.round, d.position]})
             for d in others if d.text != draft.text]
    return pairs, len(others) - len(pairs)


def chat_records(db: Session, project: Project, kind: str) -> Records:
    """`pairs` (the pick over each other draft of its turn, prompt = the conversation so far; identical
    texts dropped and counted), `thumbs` (each picked answer with a thumb) or `conversations` (the raw
    record: each conversation as picked, with every draft, pick and thumb in meta)."""
    out: list[Any] = []
    identical = 0
    for conv in chat_conversations(db, project):
        meta = _chat_meta(project, conv)
        history = [dict(m) for m in conv.item.prompt]
        turns_meta = []
        for turn, chosen in conv.turns:
            if turn.user_message is not None:
                history.append({"role": "user", "content": turn.user_message})
            draft = conversations.picked_draft(turn, chosen)
            tmeta = {**meta, **_turn_meta(turn, chosen, draft)}
            if kind == "pairs":
                pairs, same = _pick_pairs(conv.id, turn, draft, history, tmeta)
                out, identical = out + pairs, identical + same
            elif kind == "thumbs" and chosen.thumb is not None:
                out.append(Thumb(f"{conv.id}:{turn.position}", [dict(m) for m in history], draft.text, chosen.thumb, tmeta))
            turns_meta.append({**_turn_meta(turn, chosen, draft), "user": turn.user_message, "thumb": chosen.thumb,
                               "drafts": [{"text": d.text, "round": d.round, "position": d.position,
                                           "model": _draft_model(d), "finish_reason": d.finish_reason} for d in turn.drafts]})
            history.append({"role": "assistant", "content": draft.text})
        if kind == "conversations":
            out.append(SFTExample(conv.id, history, {**meta, "finished": conv.status == "done", "turns": turns_meta}))
    return [dataclasses.asdict(x) for x in out], ConversionReport(kept=len(out), dropped_identical=identical)
