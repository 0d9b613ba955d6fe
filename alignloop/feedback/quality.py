"""The admin dashboard's figures: agreement between annotators and each annotator's quality.

Every answer is split into nominal units (`tasks.units`: the pairwise choice, each pair of ranked
responses, each rating axis, edited or not). On those units, with the functions of `alignloop.agreement`
(never a copy): Cohen's kappa for every pair of annotators (on the units both labelled), Fleiss' kappa
(it needs the same number of labels per unit: the units with the most common count n >= 2, reported as
`fleiss_units` and `fleiss_n`), Krippendorff's alpha (every unit with >= 2 labels; ordinal for rating
scores, nominal otherwise) and percent agreement.

Per annotator: agreement with the consensus (share of their units, among units with >= 2 labels and a
majority value, `preferences.majority_vote`, where they gave that value; their own label counts, as
in the exported consensus), agreement with gold (share of their units on gold items equal to the gold
answer's), the median time per answer, and the position-bias rate: pairwise, the share of decisive
votes (not tie or both bad) for the answer shown on the left (chance 0.5); rank, the share of rankings
that put first the response shown first (chance 1/K). Undefined figures are None (JSON has no NaN).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from alignloop.agreement import fleiss_kappa, krippendorff_alpha, pairwise_cohen, percent_agreement
from alignloop.feedback import services, tasks
from alignloop.feedback.db import Item, Project
from alignloop.preferences import majority_vote

UnitKey = tuple[str, tuple[Any, ...]]
"""(item id, unit within the item)."""


@dataclass(frozen=True)
class Answer:
    """One active answer as the quality figures need it."""

    item: str
    annotator: str
    answer: dict[str, Any]
    time_spent_ms: int | None = None
    displayed_choice: str | None = None
    presented_order: tuple[int, ...] = ()


def _num(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def project_quality(db: Session, project: Project) -> dict[str, Any]:
    """The dashboard's figures for a project, from its active answers and its gold items."""
    answers = [Answer(item.external_id, username, services.answer_of(label), label.time_spent_ms,
                      label.displayed_choice, tuple(label.presented_order))
               for label, item, username in services.active_labels(db, project)]
    gold: dict[str, dict[str, Any]] = {
        item_id: answer for item_id, answer in db.execute(sa.select(Item.external_id, Item.gold).where(
            Item.project_id == project.id, Item.gold.is_not(None))) if answer is not None}
    return {"project": project.name, **compute(project.task, answers, gold)}


def compute(task: str, answers: list[Answer], gold: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Agreement and per-annotator quality of `answers` (see the module docstring)."""
    labels: dict[str, dict[UnitKey, Hashable]] = defaultdict(dict)
    for a in answers:
        labels[a.annotator].update(((a.item, u), v) for u, v in tasks.units(task, a.answer).items())
    labels = dict(sorted(labels.items()))
    by_unit: dict[UnitKey, list[Hashable]] = defaultdict(list)
    for per_unit in labels.values():
        for unit, value in per_unit.items():
            by_unit[unit].append(value)
    consensus = {u: c for u, v in by_unit.items() if len(v) >= 2 and (c := majority_vote(v)) is not None}
    gold_units = {(item, u): v for item, g in gold.items() for u, v in tasks.units(task, g).items()}
    mine = defaultdict(list)
    for a in answers:
        mine[a.annotator].append(a)
    people = [_annotator(name, labels[name], mine[name], consensus, gold_units, task) for name in labels]
    return {"task": task, "answers": len(answers), "gold_items": len(gold),
            "agreement": agreement(labels, tasks.ALPHA_LEVEL[task]), "annotators": people,
            "position_bias": _position_bias(task, answers), "position_chance": _position_chance(task, answers)}


def agreement(labels: dict[str, dict[UnitKey, Hashable]], level: str = "nominal") -> dict[str, Any]:
    """Krippendorff's alpha, Fleiss' kappa, percent agreement and Cohen's kappa per annotator pair."""
    by_unit: dict[UnitKey, list[Hashable]] = defaultdict(list)
    for per_unit in labels.values():
        for unit, value in per_unit.items():
            by_unit[unit].append(value)
    shared = [v for v in by_unit.values() if len(v) >= 2]
    counts = Counter(len(v) for v in shared)
    n = max(counts, key=lambda c: (counts[c], c)) if counts else 0
    fleiss_rows = [v for v in shared if len(v) == n]
    pairs = [{"a": a, "b": b, "kappa": _num(kappa), "shared_units": len(labels[a].keys() & labels[b].keys())}
             for (a, b), kappa in pairwise_cohen(labels).items()]
    return {"units": len(by_unit), "units_shared": len(shared), "level": level,
            "krippendorff_alpha": _num(krippendorff_alpha(list(by_unit.values()), level)),  # type: ignore[arg-type]
            "percent_agreement": _num(percent_agreement(shared)),
            "fleiss_kappa": _num(fleiss_kappa(labels=fleiss_rows)) if fleiss_rows else None,
            "fleiss_units": len(fleiss_rows), "fleiss_n": n, "cohen": pairs}


def _share(hits: Iterable[bool]) -> tuple[float | None, int]:
    values = list(hits)
    return (statistics.fmean(values) if values else None), len(values)


def _annotator(name: str, labels: dict[UnitKey, Hashable], answers: list[Answer], consensus: dict[UnitKey, Hashable],
               gold: dict[UnitKey, Hashable], task: str) -> dict[str, Any]:
    with_consensus, n_consensus = _share(v == consensus[u] for u, v in labels.items() if u in consensus)
    with_gold, n_gold = _share(v == gold[u] for u, v in labels.items() if u in gold)
    times = [a.time_spent_ms for a in answers if a.time_spent_ms is not None]
    bias, n_bias = _share(x for a in answers if (x := _first_shown_chosen(task, a)) is not None)
    return {"annotator": name, "answers": len(answers), "consensus_agreement": with_consensus,
            "consensus_units": n_consensus, "gold_agreement": with_gold, "gold_units": n_gold,
            "median_ms": statistics.median(times) if times else None, "position_bias": bias, "position_votes": n_bias}


def _first_shown_chosen(task: str, a: Answer) -> bool | None:
    """Did the annotator prefer what was shown first (pairwise: left; rank: first of the list)? None when
    the answer states no preference between positions (tie, both bad, or another task)."""
    if task == "pairwise":
        return {"left": True, "right": False}.get(a.displayed_choice or "")
    if task == "rank" and a.presented_order:
        return bool(a.answer["ranking"][0] == a.presented_order[0])
    return None


def _position_bias(task: str, answers: list[Answer]) -> float | None:
    return _share(x for a in answers if (x := _first_shown_chosen(task, a)) is not None)[0]


def _position_chance(task: str, answers: list[Answer]) -> float | None:
    """The position-bias rate of an annotator who ignores position: 1/2, or the mean 1/K for rankings."""
    if task == "pairwise":
        return 0.5
    if task == "rank" and answers:
        return statistics.fmean(1 / len(a.presented_order) for a in answers if a.presented_order)
    return None


# ---------------------------------------------------------------------------------------------------------
# Charts: horizontal bars as inline SVG (no script, no front-end build; the template draws these)


@dataclass(frozen=True)
class Bar:
    label: str
    value: float | None
    x: float
    width: float
    text: str


def bars(rows: Iterable[tuple[str, float | None]], lo: float, hi: float, width: float = 320.0,
         fmt: str = "{:.2f}") -> list[Bar]:
    """Bar geometry for values on [lo, hi], drawn from 0 (or lo when 0 is outside): x and width in pixels
    from the plot's left edge. None draws no bar and reads "n/a"."""
    span = (hi - lo) or 1.0

    def scale(v: float) -> float:
        return (min(max(v, lo), hi) - lo) / span * width

    base = scale(min(max(0.0, lo), hi))
    out = []
    for label, value in rows:
        if value is None:
            out.append(Bar(label, None, base, 0.0, "n/a"))
            continue
        end = scale(value)
        out.append(Bar(label, value, min(base, end), abs(end - base), fmt.format(value)))
    return out


def chart_x(value: float, lo: float, hi: float, width: float = 320.0) -> float:
    """Where a reference line for `value` goes (chance level, zero)."""
    return (min(max(value, lo), hi) - lo) / ((hi - lo) or 1.0) * width


def dashboard_charts(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The dashboard's bar charts: (title, bars, reference line) from project_quality's figures."""
    people = figures["annotators"]

    def chart(title: str, key: str, lo: float, hi: float, ref: float | None = None, fmt: str = "{:.2f}",
              scale: float = 1.0) -> dict[str, Any]:
        rows = [(p["annotator"], None if p[key] is None else p[key] * scale) for p in people]
        return {"title": title, "bars": bars(rows, lo, hi, fmt=fmt),
                "ref_x": None if ref is None else chart_x(ref, lo, hi)}

    seconds = [p["median_ms"] / 1000 for p in people if p["median_ms"] is not None]
    out = [chart("Answers", "answers", 0, max([p["answers"] for p in people], default=1) or 1, fmt="{:.0f}"),
           chart("Agreement with the consensus", "consensus_agreement", 0, 1),
           chart("Agreement with gold", "gold_agreement", 0, 1),
           chart("Median seconds per answer", "median_ms", 0, max(seconds, default=1) or 1, fmt="{:.1f}", scale=1e-3)]
    if figures["position_chance"] is not None:
        out.append(chart("Position bias (share preferring the first shown; line: chance)", "position_bias", 0, 1,
                         figures["position_chance"]))
    pairs = [(f'{c["a"]} / {c["b"]}', c["kappa"]) for c in figures["agreement"]["cohen"]]
    out.append({"title": "Cohen's kappa per annotator pair (line: 0)", "bars": bars(pairs, -1, 1),
                "ref_x": chart_x(0, -1, 1)})
    return out
