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

`compute` is the definition, over a list of answers; `project_quality` (the dashboard) and
`project_progress` (the project page) get the same figures from counts the database and numpy make, without
loading the labels (tests hold the two equal on random projects of every task).
"""

from __future__ import annotations

import itertools
import math
import statistics
import threading
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

from alignloop.agreement import (
    cohen_kappa_table,
    fleiss_kappa,
    krippendorff_alpha,
    krippendorff_alpha_counts,
    pairwise_cohen,
    percent_agreement,
    percent_agreement_counts,
)
from alignloop.feedback import services, tasks
from alignloop.feedback.db import Item, Label, Project, User
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
# The same figures from the database, for pages that must answer in well under 100 ms at 50,000 labels
# (benchmarks/feedback_pages.py). Per annotator (answers, position votes, the middle of their times) the
# database counts with GROUP BY on the partial index of active answers (0005). The units, one entry per
# annotator and unit, come back as one string "unit,who,unit,who,..." rather than one row each: the driver
# and SQLAlchemy spend about 1 us a row. numpy then counts per unit (the count table of Fleiss' kappa,
# Krippendorff's alpha and the consensus) and per pair of annotators (confusion tables, pairing the
# entries of each unit); in SQL, the self-join that pairs them took 50-80 ms on SQLite and the consensus
# per annotator as much again. alignloop.agreement's count-table functions do the math.

CATEGORIES: dict[str, tuple[Hashable, ...]] = {"pairwise": ("a", "b", "both_bad", "tie"), "rank": (False, True),
                                               "rate": tasks.RATE_SCALE, "edit": (False, True), "chat": ()}
"""The values a unit of each task can take, sorted as `count_table` sorts them; the SQL gives their index."""
UNIT_BITS, VALUE_BITS = 8, 3
"""A unit travels as item id << 8 | unit (units are < 256), an annotator's value as user id << 3 | index."""


@dataclass(frozen=True)
class Units:
    """The units of a project's active answers: one entry per (unit, annotator), sorted by unit, then
    annotator (an annotator gives a unit one value at most: one active label per item and person)."""

    keys: np.ndarray  # (U,) item id << UNIT_BITS | unit, sorted
    unit: np.ndarray  # (N,) index into keys
    people: np.ndarray  # (A,) user ids, sorted
    who: np.ndarray  # (N,) index into people
    value: np.ndarray  # (N,) index into CATEGORIES[task]

    def table(self, n_cats: int) -> np.ndarray:
        """Units x categories: how many annotators gave each value to each unit (`count_table`'s layout)."""
        counts = np.bincount(self.unit * n_cats + self.value, minlength=len(self.keys) * n_cats)
        return counts.reshape(len(self.keys), n_cats)


def project_quality(db: Session, project: Project) -> dict[str, Any]:
    """The dashboard's figures for a project, counted from its active answers and gold items in the
    database; they equal `compute`'s on the same answers (a test compares them on random projects)."""
    task, n_cats = project.task, len(CATEGORIES[project.task])
    version = labels_version(db, project)
    per_person, lengths = _answer_counts(db, project, version)
    names = dict(sorted(db.execute(sa.select(User.id, User.username).where(User.id.in_(per_person))).all(),
                        key=lambda row: row[1]))
    units = _units(db, project, version)
    table = units.table(n_cats)
    consensus, gold = _consensus(task, units, table), _gold_hits(db, project, units)
    medians = _cached(db, project, version, "median_ms", lambda _after, upto: _median_ms(
        db, project, {user_id: counts[3] for user_id, counts in per_person.items()}, upto))
    people = []
    for user_id, name in names.items():
        answers, chose_first, votes, _ = per_person[user_id]
        (agree, n_consensus), (right, n_gold) = consensus.get(user_id, (0, 0)), gold.get(user_id, (0, 0))
        people.append({"annotator": name, "answers": answers, "consensus_agreement": _ratio(agree, n_consensus),
                       "consensus_units": n_consensus, "gold_agreement": _ratio(right, n_gold), "gold_units": n_gold,
                       "median_ms": medians.get(user_id), "position_bias": _ratio(chose_first, votes),
                       "position_votes": votes})
    place = {user_id: i for i, user_id in enumerate(names)}
    pairs = {}
    for (a, b), confusion in _confusions(units, n_cats).items():  # oriented as `names` orders the annotators
        pairs[(names[a], names[b]) if place[a] < place[b] else (names[b], names[a])] = (
            confusion if place[a] < place[b] else confusion.T)
    answers, chose_first, votes, _ = (sum(c) for c in zip(*per_person.values(), strict=True)) if per_person else [0] * 4
    gold_items = db.execute(sa.select(sa.func.count()).select_from(Item).where(
        Item.project_id == project.id, Item.gold.is_not(None))).scalar_one()
    return {"project": project.name, "task": task, "answers": answers, "gold_items": gold_items,
            "agreement": agreement_from_counts(task, table, pairs, list(names.values())), "annotators": people,
            "position_bias": _ratio(chose_first, votes), "position_chance": _chance(task, lengths, answers)}


def project_progress(db: Session, project: Project) -> dict[str, Any]:
    """Items, answers ("votes"), items with k answers, answers per annotator, skips, and inter-annotator
    agreement (Krippendorff's alpha at the task's level and percent agreement, over tasks.units)."""
    def count(query: sa.Select[Any]) -> int:
        return int(db.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar_one())

    active = (Label.project_id == project.id) & services.active_answers()
    per_user = dict(db.execute(sa.select(Label.user_id, sa.func.count()).where(active).group_by(Label.user_id)).all())
    per_annotator = {name: per_user[user_id] for user_id, name in
                     db.execute(sa.select(User.id, User.username).where(User.id.in_(per_user))).all()}
    cats, level = CATEGORIES[project.task], tasks.ALPHA_LEVEL[project.task]
    table = _units(db, project, labels_version(db, project)).table(len(cats))
    values = {"krippendorff_alpha": krippendorff_alpha_counts(table, cats, level),  # type: ignore[arg-type]
              "percent_agreement": percent_agreement_counts(table)}
    return {"project": project.name, "task": project.task,
            "items": count(sa.select(Item.id).where(Item.project_id == project.id)), "overlap_k": project.overlap_k,
            "votes": sum(per_annotator.values()),
            "items_complete": count(sa.select(Label.item_id).where(active).group_by(Label.item_id)
                                    .having(sa.func.count() >= project.overlap_k)),
            "skips": count(sa.select(Label.id).where(Label.project_id == project.id, Label.undone_at.is_(None),
                                                     Label.skip_reason.is_not(None))),
            "votes_per_annotator": per_annotator, "agreement": {k: _num(v) for k, v in values.items()}}


def agreement_from_counts(task: str, table: np.ndarray, pairs: dict[tuple[str, str], np.ndarray],
                          annotators: list[str]) -> dict[str, Any]:
    """`agreement` from counts: `table`, units x CATEGORIES[task] (how many annotators gave each value to
    each unit); `pairs`, the confusion table of each annotator pair, named in `annotators`' order."""
    cats, level = CATEGORIES[task], tasks.ALPHA_LEVEL[task]
    per_unit = table.sum(1)
    shared = table[per_unit >= 2]
    sizes = Counter(per_unit[per_unit >= 2].tolist())
    n = max(sizes, key=lambda c: (sizes[c], c)) if sizes else 0
    fleiss_rows = table[per_unit == n] if n else shared
    cohen = []
    for a, b in itertools.combinations(annotators, 2):
        confusion = pairs.get((a, b), np.zeros((len(cats), len(cats))))
        cohen.append({"a": a, "b": b, "kappa": _num(cohen_kappa_table(confusion)),
                      "shared_units": int(confusion.sum())})
    return {"units": len(table), "units_shared": len(shared), "level": level,
            "krippendorff_alpha": _num(krippendorff_alpha_counts(table, cats, level)),  # type: ignore[arg-type]
            "percent_agreement": _num(percent_agreement_counts(shared)),
            "fleiss_kappa": _num(fleiss_kappa(fleiss_rows)) if len(fleiss_rows) else None,
            "fleiss_units": len(fleiss_rows), "fleiss_n": n, "cohen": cohen}


def _ratio(hits: int, n: int) -> float | None:
    return hits / n if n else None


def _chance(task: str, lengths: Counter[int], answers: int) -> float | None:
    """`_position_chance` from how many rank answers showed each number of responses."""
    if task == "pairwise":
        return 0.5
    if task == "rank" and answers:
        shown = sum(n for k, n in lengths.items() if k)  # statistics.fmean of the 1/k, without its per-item count
        values = itertools.chain.from_iterable(itertools.repeat(1 / k, n) for k, n in lengths.items() if k)
        return math.fsum(values) / shown if shown else None
    return None


def _consensus(task: str, units: Units, table: np.ndarray) -> dict[int, tuple[int, int]]:
    """Per annotator: (units where they gave the consensus, units with >= 2 labels and a majority value);
    `majority_vote` decides once per distinct row of the count table."""
    cats = CATEGORIES[task]
    if not len(table):
        return {}
    profiles, inverse = _distinct_rows(table)
    votes = [majority_vote(cats[i] for i, c in enumerate(p.tolist()) for _ in range(c)) if p.sum() >= 2 else None
             for p in profiles]
    majority = np.array([-1 if v is None else cats.index(v) for v in votes])[inverse][units.unit]  # (N,)
    counted = np.bincount(units.who, weights=majority >= 0, minlength=len(units.people))
    agreed = np.bincount(units.who, weights=(majority >= 0) & (units.value == majority), minlength=len(units.people))
    return {int(u): (int(agreed[i]), int(counted[i])) for i, u in enumerate(units.people.tolist()) if counted[i]}


def _distinct_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(table, axis=0, return_inverse=True), 20 times faster by reading each row as one number in
    base max + 1 while that fits in 62 bits (it does unless thousands label one unit)."""
    base = int(table.max(initial=0)) + 1
    if base ** table.shape[1] >= 2 ** 62:
        rows, inverse = np.unique(table, axis=0, return_inverse=True)
        return rows, inverse.reshape(-1)
    _, first, inverse = np.unique(table @ base ** np.arange(table.shape[1]), return_index=True, return_inverse=True)
    return table[first], inverse.reshape(-1)


def _confusions(units: Units, n_cats: int) -> dict[tuple[int, int], np.ndarray]:
    """Per pair of annotators (lower user id first): the values x values table of the units both labelled.
    Entries of one unit are adjacent and ordered by user, so entry i pairs with i + d while the unit holds."""
    people, who = units.people, units.who
    codes = []
    for d in range(1, int(np.bincount(units.unit).max(initial=0))):
        i = np.flatnonzero(units.unit[d:] == units.unit[:-d])
        codes.append(((who[i] * len(people) + who[i + d]) * n_cats + units.value[i]) * n_cats + units.value[i + d])
    out: dict[tuple[int, int], np.ndarray] = {}
    if codes:
        code, n = np.unique(np.concatenate(codes), return_counts=True)
        pair, va, vb = code // (n_cats * n_cats), code // n_cats % n_cats, code % n_cats
        for p, x, y, c in zip(pair.tolist(), va.tolist(), vb.tolist(), n.tolist(), strict=True):
            key = (int(people[p // len(people)]), int(people[p % len(people)]))
            out.setdefault(key, np.zeros((n_cats, n_cats)))[x, y] = c
    return out


def _gold_hits(db: Session, project: Project, units: Units) -> dict[int, tuple[int, int]]:
    """Per annotator: (units equal to the gold answer's, units on gold items)."""
    gold = _unit_rows(project.task, _dialect(db), Item.id, sa.null(), Item.gold, Item.gold["choice"].as_string(),
                      (Item.project_id == project.id) & Item.gold.is_not(None))
    rows = np.array(db.execute(sa.select(sa.cast(gold.c.item_id, sa.BigInteger) * (1 << UNIT_BITS) + gold.c.unit,
                                         gold.c.v)).all(), dtype=np.int64).reshape(-1, 2)
    at = np.searchsorted(units.keys, rows[:, 0])
    found = at < len(units.keys)
    found[found] &= units.keys[at[found]] == rows[found, 0]
    expected = np.full(len(units.keys), -1)
    expected[at[found]] = rows[found, 1]
    answer = expected[units.unit]  # (N,)
    on_gold = answer >= 0
    right = np.bincount(units.who, weights=on_gold & (units.value == answer), minlength=len(units.people))
    total = np.bincount(units.who, weights=on_gold, minlength=len(units.people))
    return {int(u): (int(right[i]), int(total[i])) for i, u in enumerate(units.people.tolist()) if total[i]}


# SQL: the units of every task, and the per-annotator counts.


# ---------------------------------------------------------------------------------------------------------
# Label-derived figures are kept per process until the project's labels change. Labels are append-only
# (undo sets undone_at), so any change raises the largest label id or moves a label out of the active
# answers or skips: (largest id, labels, active answers, active skips) is a version, read from three
# index-only counts. Rank and rate units are unnested from each answer's JSON, 0.3-0.7 s at 50,000
# answers on a 2-core VM; a page that finds the version unchanged skips that work, and one that finds only
# new labels (the same number undone) reads just those and adds them. Every read is bounded by the
# version's largest id, so a label committed between the version and the read (PostgreSQL's read committed
# sees it) is never counted twice: it is read with the next version.

LABEL_CACHE_SIZE = 32
"""How many (project, figure) entries a process keeps."""
_label_cache: OrderedDict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = OrderedDict()
_label_cache_lock = threading.Lock()


def clear_label_cache() -> None:
    """Forget every cached figure (benchmarks measure the uncached pages with it)."""
    with _label_cache_lock:
        _label_cache.clear()


def labels_version(db: Session, project: Project) -> tuple[Any, ...]:
    """What identifies the project's labels as they are now (see above); the project's creation time keeps
    a recreated database's project with the same id apart."""
    mine = Label.project_id == project.id
    newest, total = db.execute(sa.select(sa.func.max(Label.id), sa.func.count()).where(mine)).one()
    active = db.execute(sa.select(sa.func.count()).where(mine, services.active_answers())).scalar_one()
    skips = db.execute(sa.select(sa.func.count()).where(
        mine, Label.undone_at.is_(None), Label.skip_reason.is_not(None))).scalar_one()
    return (project.created_at, newest, total, active, skips)


def _undone(version: tuple[Any, ...]) -> int:
    _, _, total, active, skips = version
    return int(total) - int(active) - int(skips)


def _only_added(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    """Whether the labels at `new` are those at `old` plus labels with larger ids (nothing undone since)."""
    return (old[0] == new[0] and old[1] is not None and new[1] is not None and new[1] > old[1]
            and _undone(old) == _undone(new))


def _cached(db: Session, project: Project, version: tuple[Any, ...], figure: str,
            compute: Callable[[Any, Any], Any], extend: Callable[[Any, Any, Any], Any] | None = None) -> Any:
    """The figure at `labels_version` `version`: from the cache when it is unchanged, `extend(value, after,
    upto)` of the cached value when labels were only added (ids after..upto), else `compute(None, upto)`."""
    key = (str(db.get_bind().engine.url), project.id, figure)
    with _label_cache_lock:
        hit = _label_cache.get(key)
        if hit is not None and hit[0] == version:
            _label_cache.move_to_end(key)
            return hit[1]
    if hit is not None and extend is not None and _only_added(hit[0], version):
        value = extend(hit[1], hit[0][1], version[1])
    else:
        value = compute(None, version[1])
    with _label_cache_lock:
        _label_cache[key] = (version, value)
        _label_cache.move_to_end(key)
        while len(_label_cache) > LABEL_CACHE_SIZE:
            _label_cache.popitem(last=False)
    return value


def _dialect(db: Session) -> str:
    return db.get_bind().dialect.name


def _id_range(after: Any, upto: Any) -> sa.ColumnElement[bool]:
    """Labels with after < id <= upto (after None: from the first)."""
    upper = Label.id <= upto if upto is not None else sa.false()
    return upper if after is None else (Label.id > after) & upper


def _units(db: Session, project: Project, version: tuple[Any, ...]) -> Units:
    """The project's units (see Units), sent by the database as one string of numbers (cached per version;
    new labels are read alone and merged)."""
    def extend(cached: tuple[np.ndarray, Units], after: Any, upto: Any) -> tuple[np.ndarray, Units]:
        flat = np.concatenate([cached[0], _read_flat_units(db, project, after, upto)])
        return flat, _sorted_units(flat)

    def compute(after: Any, upto: Any) -> tuple[np.ndarray, Units]:
        flat = _read_flat_units(db, project, after, upto)
        return flat, _sorted_units(flat)

    return _cached(db, project, version, "units", compute, extend)[1]


def _read_flat_units(db: Session, project: Project, after: Any, upto: Any) -> np.ndarray:
    """(2N,) unit, who, unit, who, ... of the active answers with ids in (after, upto]."""
    rows = _unit_rows(project.task, _dialect(db), Label.item_id, Label.user_id, Label.answer, Label.choice,
                      (Label.project_id == project.id) & services.active_answers() & _id_range(after, upto))
    unit = sa.cast(rows.c.item_id, sa.BigInteger) * (1 << UNIT_BITS) + rows.c.unit
    who = sa.cast(rows.c.user_id, sa.BigInteger) * (1 << VALUE_BITS) + rows.c.v
    text = db.execute(sa.select(sa.func.aggregate_strings(sa.cast(unit, sa.String) + "," + sa.cast(who, sa.String),
                                                          ","))).scalar_one()
    return np.fromstring(text, dtype=np.int64, sep=",") if text else np.zeros(0, dtype=np.int64)


def _sorted_units(flat: np.ndarray) -> Units:
    """Units from `_read_flat_units`' numbers."""
    key, code = flat[0::2], flat[1::2]
    people, who = np.unique(code >> VALUE_BITS, return_inverse=True)
    order = np.lexsort((who, key))
    key, who, value = key[order], who.reshape(-1)[order], (code & ((1 << VALUE_BITS) - 1))[order]
    first = np.ones(len(key), dtype=bool)  # (N,) where a unit starts
    first[1:] = key[1:] != key[:-1]
    return Units(key[first], np.cumsum(first) - 1, people, who, value)


def _unit_rows(task: str, dialect: str, item_id: Any, user_id: Any, answer: Any, choice: Any,
               where: sa.ColumnElement[bool]) -> sa.Subquery:
    """(item_id, unit, user_id, v): a row per unit of each selected answer (tasks.units in SQL), `v` the
    index of its value in CATEGORIES[task]. `answer` is the JSON column (an answer or a gold answer),
    `choice` the pairwise choice. A unit is a small integer: 0, a rating's axis, or 16 a + b for ranked
    positions a < b. Values that are missing (the axes a gold rating leaves out) give no row."""
    cats = CATEGORIES[task]
    item_id, user_id, zero = item_id.label("item_id"), user_id.label("user_id"), sa.literal(0).label("unit")
    if task == "pairwise":
        rows = [sa.select(item_id, zero, user_id, _index(choice, cats).label("v")).where(where)]
    elif task == "edit":
        rows = [sa.select(item_id, zero, user_id, _index(answer["changed"].as_boolean(), cats).label("v")).where(where)]
    elif task == "rate":
        rows = [_rate_scores(dialect, item_id, user_id, answer, where)]
    elif task == "rank":
        rows = [_rank_pairs(dialect, item_id, user_id, answer, where)]
    else:  # chat: no units
        rows = [sa.select(item_id, zero, user_id, sa.literal(0).label("v")).where(sa.false())]
    union = (rows[0] if len(rows) == 1 else sa.union_all(*rows)).subquery()
    return sa.select(union).where(union.c.v.is_not(None)).subquery()


def _index(value: Any, cats: tuple[Hashable, ...]) -> sa.ColumnElement[Any]:
    return sa.case({c: i for i, c in enumerate(cats)}, value=value)


def _rate_scores(dialect: str, item_id: Any, user_id: Any, answer: Any, where: sa.ColumnElement[bool]) -> sa.Select[Any]:
    """One row per score of a rating: unit, the axis's place in RATE_AXES. The object is unnested (json_each,
    json_each_text) rather than read three times: each read parses the JSON again."""
    if dialect == "sqlite":
        score = sa.func.json_each(answer, "$.scores").table_valued("key", "value").alias("s")
        value: Any = score.c.value
    else:
        score = sa.func.json_each_text(answer["scores"]).table_valued("key", "value").render_derived(name="s")
        value = sa.cast(score.c.value, sa.Integer)
    axis = sa.case({a: i for i, a in enumerate(tasks.RATE_AXES)}, value=score.c.key)
    return (sa.select(item_id, axis.label("unit"), user_id, _index(value, CATEGORIES["rate"]).label("v"))
            .join(score, sa.true()).where(where, score.c.key.in_(tasks.RATE_AXES)))


def _rank_pairs(dialect: str, item_id: Any, user_id: Any, answer: Any, where: sa.ColumnElement[bool]) -> sa.Select[Any]:
    """Every pair of places i < j in a ranking: unit (lower, higher position), value 1 when the lower
    position is ranked first. SQLite unnests the array with json_each, PostgreSQL with
    json_array_elements_text (neither has the other's)."""
    a: Any
    b: Any
    if dialect == "sqlite":
        first, second = (sa.func.json_each(answer, "$.ranking").table_valued("key", "value").alias(n)
                         for n in ("r1", "r2"))
        a, b = first.c.value, second.c.value
    else:
        first, second = (sa.func.json_array_elements_text(answer["ranking"])
                         .table_valued("value", with_ordinality="key").render_derived(name=n) for n in ("r1", "r2"))
        a, b = sa.cast(first.c.value, sa.Integer), sa.cast(second.c.value, sa.Integer)
    unit = sa.case((a < b, a * 16 + b), else_=b * 16 + a)
    return (sa.select(item_id, unit.label("unit"), user_id, sa.case((a < b, 1), else_=0).label("v"))
            .join(first, sa.true()).join(second, sa.true()).where(where, first.c.key < second.c.key))


def _first_shown(task: str) -> sa.ColumnElement[Any] | None:
    """1 when an answer prefers what was shown first, 0 when it prefers another, NULL when it states no
    preference between positions (`_first_shown_chosen` in SQL); None for tasks without one."""
    if task == "pairwise":
        return sa.case((Label.displayed_choice == "left", 1), (Label.displayed_choice == "right", 0))
    if task == "rank":
        same = Label.answer[("ranking", 0)].as_integer() == Label.presented_order[0].as_integer()
        return sa.case((sa.func.json_array_length(Label.presented_order) == 0, None), (same, 1), else_=0)
    return None


def _answer_counts(db: Session, project: Project, version: tuple[Any, ...]
                   ) -> tuple[dict[int, tuple[int, int, int, int]], Counter[int]]:
    """Per annotator: (answers, answers preferring the first shown, answers preferring a position, answers
    with a time); for rank projects also how many answers showed each number of responses (cached per version)."""
    Counts = tuple[dict[int, tuple[int, int, int, int]], Counter[int]]

    def extend(cached: Counts, after: Any, upto: Any) -> Counts:
        more, more_lengths = _count_answers(db, project, after, upto)
        totals = dict(cached[0])
        for user_id, counts in more.items():
            old = totals.get(user_id, (0, 0, 0, 0))
            totals[user_id] = (old[0] + counts[0], old[1] + counts[1], old[2] + counts[2], old[3] + counts[3])
        return totals, cached[1] + more_lengths

    return _cached(db, project, version, "answer_counts", lambda after, upto: _count_answers(db, project, after, upto),
                   extend)


def _count_answers(db: Session, project: Project, after: Any, upto: Any
                   ) -> tuple[dict[int, tuple[int, int, int, int]], Counter[int]]:
    first = _first_shown(project.task)
    shown = [sa.func.coalesce(sa.func.sum(first), 0), sa.func.count(first)] if first is not None else [0, 0]
    keys = [Label.user_id, *([sa.func.json_array_length(Label.presented_order)] if project.task == "rank" else [])]
    query = (sa.select(*keys, sa.func.count(), *shown, sa.func.count(Label.time_spent_ms))
             .where(Label.project_id == project.id, services.active_answers(), _id_range(after, upto)).group_by(*keys))
    totals: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    lengths: Counter[int] = Counter()
    for row in db.execute(query).all():
        totals[row[0]] = [a + int(b) for a, b in zip(totals[row[0]], row[-4:], strict=True)]
        if project.task == "rank":
            lengths[row[1]] += row[-4]
    return {user_id: (a, b, c, d) for user_id, (a, b, c, d) in totals.items()}, lengths


def _median_ms(db: Session, project: Project, timed: dict[int, int], upto: Any) -> dict[int, float]:
    """Per annotator, the median time per answer from the middle one or two of their `timed[user]` times
    (of labels up to id `upto`), each found by walking the (project, user, time) index to its place."""
    parts = [sa.select(Label.user_id, Label.time_spent_ms).where(
        Label.project_id == project.id, services.active_answers(), _id_range(None, upto), Label.user_id == user_id,
        Label.time_spent_ms.is_not(None)).order_by(Label.time_spent_ms).limit(2 - n % 2).offset((n - 1) // 2).subquery()
        for user_id, n in timed.items() if n]
    middle: dict[int, list[int]] = defaultdict(list)
    if parts:
        for user_id, ms in db.execute(sa.union_all(*(sa.select(part) for part in parts))).all():
            middle[user_id].append(ms)
    return {user_id: statistics.median(values) for user_id, values in middle.items()}


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
