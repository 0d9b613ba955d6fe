"""The admin quality dashboard and its API: agreement equals `alignloop.agreement` on hand-made label sets
(pairwise, rank, rate), per-annotator quality is the hand-computed value, the page is admin-only and
draws its charts as inline SVG under the strict CSP; the figures counted by the database equal the
Python definition (`quality.compute`) on random projects of every task, and follow each new label.
Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from feedback_helpers import (
    add_task_project,
    add_user,
    anonymous_client,
    answer_all,
    ctx,
    item_row,
    session_client,
    shown_numbers,
    task_row,
    token_client,
)
from sqlalchemy.orm import Session

from alignloop.agreement import cohen_kappa, fleiss_kappa, krippendorff_alpha, percent_agreement
from alignloop.feedback import quality, services, tasks
from alignloop.feedback.db import Assignment, Item, Label, Project, User
from alignloop.feedback.records import agreement
from alignloop.feedback.tasks import RATE_AXES

# Canonical choices (import positions) per item and annotator; a3 skips p5; p4 is gold ("a").
PAIRWISE = {
    "p0": {"a1": "a", "a2": "a", "a3": "b"},
    "p1": {"a1": "a", "a2": "a", "a3": "a"},
    "p2": {"a1": "b", "a2": "tie", "a3": "b"},
    "p3": {"a1": "both_bad", "a2": "b", "a3": "b"},
    "p4": {"a1": "a", "a2": "b", "a3": "a"},
    "p5": {"a1": "a", "a2": "b"},
}
ORDERS = {"a1": [0, 1], "a2": [1, 0], "a3": [0, 1]}  # a1 and a3 see "a" on the left, a2 on the right
TIMES = {"a1": [1000, 2000, 3000, 4000, 5000, 6000], "a2": [700] * 6, "a3": [100, 300, 200, 500, 400]}


def _pairwise_project(app: FastAPI) -> int:
    for name in ORDERS:
        add_user(app, name)
    rows = [item_row(i, gold={"choice": "a"}) if i == "p4" else item_row(i) for i in PAIRWISE]
    pid = add_task_project(app, "pw", "pairwise", list(ORDERS), rows, k=3)
    for name, order in ORDERS.items():
        times = dict(zip(PAIRWISE, TIMES[name], strict=False))
        answer_all(app, pid, name, lambda item, _o, n=name: (
            None if n not in PAIRWISE[item] else (PAIRWISE[item][n], None if PAIRWISE[item][n] in ("tie", "both_bad")
                                                   else "better")),
                   order=lambda k, o=order: list(o), ms=lambda item, t=times: t.get(item))
    return pid


def test_pairwise_quality_matches_agreement_module(app: FastAPI) -> None:
    pid = _pairwise_project(app)
    add_user(app, "boss", "admin")
    q = token_client(app, "boss").get(f"/api/v1/projects/{pid}/quality").json()
    items = list(PAIRWISE)

    def column(name: str, among: list[str]) -> list[str | None]:
        return [PAIRWISE[i].get(name) for i in among]

    a = q["agreement"]
    assert a["units"] == 6 and a["units_shared"] == 6 and a["level"] == "nominal"
    assert a["krippendorff_alpha"] == pytest.approx(krippendorff_alpha([list(PAIRWISE[i].values()) for i in items]))
    assert a["percent_agreement"] == pytest.approx(percent_agreement([list(PAIRWISE[i].values()) for i in items]))
    full = items[:5]  # Fleiss' kappa: the five items with three labels (p5 has two)
    assert (a["fleiss_units"], a["fleiss_n"]) == (5, 3)
    assert a["fleiss_kappa"] == pytest.approx(fleiss_kappa(labels=[list(PAIRWISE[i].values()) for i in full]))
    cohen = {(c["a"], c["b"]): (c["kappa"], c["shared_units"]) for c in a["cohen"]}
    assert cohen == {
        ("a1", "a2"): (pytest.approx(cohen_kappa(column("a1", items), column("a2", items))), 6),
        ("a1", "a3"): (pytest.approx(cohen_kappa(column("a1", full), column("a3", full))), 5),
        ("a2", "a3"): (pytest.approx(cohen_kappa(column("a2", full), column("a3", full))), 5),
    }
    # Consensus: p0 a, p1 a, p2 b, p3 b, p4 a; p5 (a vs b) has none. Gold: p4 = a.
    # Left choices: a1 4 of 5 decisive (both-bad left out), a2 3 of 5 (tie left out), a3 2 of 5.
    people = {p["annotator"]: p for p in q["annotators"]}
    assert {n: (p["answers"], p["consensus_agreement"], p["consensus_units"]) for n, p in people.items()} == {
        "a1": (6, 0.8, 5), "a2": (6, 0.6, 5), "a3": (5, 0.8, 5)}
    assert {n: (p["gold_agreement"], p["gold_units"]) for n, p in people.items()} == {
        "a1": (1.0, 1), "a2": (0.0, 1), "a3": (1.0, 1)}
    assert {n: p["median_ms"] for n, p in people.items()} == {"a1": 3500, "a2": 700, "a3": 300}
    assert {n: (p["position_bias"], p["position_votes"]) for n, p in people.items()} == {
        "a1": (0.8, 5), "a2": (0.6, 5), "a3": (0.4, 5)}
    assert q["position_bias"] == pytest.approx(9 / 15) and q["position_chance"] == 0.5
    assert q["answers"] == 17 and q["gold_items"] == 1 and q["task"] == "pairwise"


def test_rank_and_rate_units(app: FastAPI) -> None:
    for name in ("r1", "r2", "boss"):
        add_user(app, name, "admin" if name == "boss" else "annotator")
    api = token_client(app, "boss")
    rows = [task_row("k0", 3, gold={"ranking": [0, 1, 2]}), task_row("k1", 3)]
    rank = add_task_project(app, "rank", "rank", ["r1", "r2"], rows, k=2)
    wanted = {"r1": {"k0": [0, 1, 2], "k1": [2, 1, 0]}, "r2": {"k0": [1, 0, 2], "k1": [2, 0, 1]}}
    orders = {"r1": [0, 1, 2], "r2": [2, 1, 0]}
    for name, by_item in wanted.items():
        answer_all(app, rank, name, lambda item, order, w=by_item: {"ranking": shown_numbers(w[item], order)},
                   order=lambda k, o=orders[name]: list(o))
    q = api.get(f"/api/v1/projects/{rank}/quality").json()
    # Units per item: (0,1), (0,2), (1,2): is the first ranked above the second?
    r1, r2 = [True, True, True, False, False, False], [False, True, True, True, False, False]
    assert q["agreement"]["cohen"] == [{"a": "r1", "b": "r2", "kappa": pytest.approx(cohen_kappa(r1, r2)),
                                        "shared_units": 6}]
    assert q["agreement"]["krippendorff_alpha"] == pytest.approx(krippendorff_alpha(list(zip(r1, r2, strict=True))))
    people = {p["annotator"]: p for p in q["annotators"]}
    assert people["r1"]["consensus_agreement"] == 1.0 and people["r1"]["consensus_units"] == 4  # (0,1) is split 1-1 on both items
    assert people["r1"]["gold_agreement"] == 1.0 and people["r2"]["gold_agreement"] == pytest.approx(2 / 3)
    assert people["r1"]["position_bias"] == 0.5 and people["r2"]["position_bias"] == 0.5  # best shown first: 1 of 2
    assert q["position_chance"] == pytest.approx(1 / 3)

    rate = add_task_project(app, "rate", "rate", ["r1", "r2"], [task_row("t0", 1), task_row("t1", 1)], k=2)
    scores: dict[str, dict[str, tuple[int, ...]]] = {"r1": {"t0": (5, 4, 3), "t1": (2, 2, 5)},
                                                     "r2": {"t0": (4, 4, 3), "t1": (1, 3, 5)}}
    for name, by_item in scores.items():
        answer_all(app, rate, name, lambda item, order, s=by_item: dict(zip(("helpful", "honest", "harmless"), s[item],
                                                                          strict=True)))
    q = api.get(f"/api/v1/projects/{rate}/quality").json()
    units = [[scores["r1"][i][axis], scores["r2"][i][axis]] for i in ("t0", "t1") for axis in range(3)]
    assert q["agreement"]["level"] == "ordinal" and q["agreement"]["units"] == 6
    assert q["agreement"]["krippendorff_alpha"] == pytest.approx(krippendorff_alpha(units, "ordinal"))
    assert q["agreement"]["fleiss_kappa"] == pytest.approx(fleiss_kappa(labels=units))
    assert q["position_chance"] is None and all(p["position_bias"] is None for p in q["annotators"])


def test_dashboard_page_is_admin_only_with_svg_charts(app: FastAPI) -> None:
    pid = _pairwise_project(app)
    add_user(app, "boss", "admin")
    url = f"/admin/projects/{pid}/dashboard"
    assert session_client(app, "a1").get(url).status_code == 403
    assert anonymous_client(app).get(url).status_code == 303
    assert session_client(app, "a1").get(f"/api/v1/projects/{pid}/quality").status_code == 403
    admin = session_client(app, "boss")
    page = admin.get(url)
    assert page.status_code == 200
    html = page.text
    for text in ("Krippendorff", "Fleiss", "Cohen", "a1 / a2", "Position bias", "Agreement with gold", "3.5"):
        assert text in html, text
    assert html.count("<svg") == 6 and "<rect" in html and 'stroke-dasharray' in html
    nonce = re.search(r"'nonce-([^']+)'", page.headers["content-security-policy"]).group(1)
    assert all(f'nonce="{nonce}"' in tag for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"\son[a-z]+\s*=", html, re.I) and " style=" not in html
    assert f'href="{url}"' in admin.get(f"/admin/projects/{pid}").text
    assert admin.get("/admin/projects/999999/dashboard").status_code == 404


def test_empty_project_dashboard(app: FastAPI) -> None:
    add_user(app, "boss", "admin")
    pid = add_task_project(app, "empty", "edit", [], [task_row("e0", 1)])
    admin = session_client(app, "boss")
    assert "No answers yet" in admin.get(f"/admin/projects/{pid}/dashboard").text
    q = admin.get(f"/api/v1/projects/{pid}/quality").json()
    assert q["answers"] == 0 and q["agreement"]["krippendorff_alpha"] is None and q["agreement"]["fleiss_kappa"] is None


def test_bar_geometry() -> None:
    bars = quality.bars([("x", 0.5), ("y", None), ("z", 2.0)], 0, 1, width=200)
    assert [(b.x, b.width, b.text) for b in bars] == [(0, 100, "0.50"), (0, 0, "n/a"), (0, 200, "2.00")]
    kappas = quality.bars([("p", -0.5), ("q", 0.25)], -1, 1, width=200)
    assert [(b.x, b.width) for b in kappas] == [(50, 50), (100, 25)]
    assert quality.chart_x(0.5, 0, 1, width=200) == 100


# ---------------------------------------------------------------------------------------------------------
# The figures counted by the database equal `quality.compute` on every active label (the dashboard's
# definition, which loaded them all), on random projects of each task, with skips, undos, gold items,
# missing times and user names that sort differently from user ids.


def _random_form(task: str, rng: random.Random, order: list[int], original: str) -> Any:
    """A random answer as `answer_all`'s `decide` gives it (None: skip)."""
    if rng.random() < 0.1:
        return None
    if task == "pairwise":
        choice = rng.choices(("a", "b", "tie", "both_bad"), (4, 3, 2, 1))[0]
        return choice, None if choice in ("tie", "both_bad") else "better"
    if task == "rank":
        return {"ranking": ",".join(str(d + 1) for d in rng.sample(range(len(order)), len(order)))}
    if task == "rate":
        return {axis: rng.choice((3, 4, 4, 5)) if axis != "harmless" else rng.randint(1, 5) for axis in RATE_AXES}
    return {"edited": original if rng.random() < 0.6 else original + " (fixed)"}


def _random_project(app: FastAPI, task: str, seed: int) -> int:
    rng = random.Random(seed)
    names = ["zoe", "Yan", "xia", "Wes", "vic", "ulf"]  # ids rise as names fall (and case sorts first)
    for name in names:
        add_user(app, name)
    rows = []
    for i in range(18):
        n = {"pairwise": 2, "rank": rng.randint(2, 4)}.get(task, 1)
        gold = None if i % 6 or task == "edit" else {"pairwise": {"choice": "a"}, "rank": {"ranking": list(range(n))},
                                                     "rate": {"scores": {"helpful": 4, "honest": 5}}}[task]
        rows.append(task_row(f"i{i:02d}", n, gold=gold))
    pid = add_task_project(app, f"random-{task}", task, names, rows, k=3)
    for name in rng.sample(names, len(names)):
        with ctx(app).database.write() as db:
            uid = db.execute(sa.select(User.id).where(User.username == name)).scalar_one()
            project = services.member_project(db, uid, pid, lock=True)
            for turn in itertools.count():
                assignment = services.next_assignment(db, project, uid, 60)
                if assignment is None:
                    break
                item = db.get(Item, assignment.item_id)
                assert item is not None
                assignment.presented_order = rng.sample(range(len(item.responses)), len(item.responses))
                form = _random_form(task, rng, assignment.presented_order, item.responses[0].text)
                key, ms = f"{name}-{turn}", None if rng.random() < 0.15 else rng.randint(500, 9000)
                if form is None:
                    services.skip(db, project, uid, assignment.id, "unsure", ms, key)
                elif task == "pairwise":
                    choice, strength = form
                    position = "ab".index(choice) if strength else -1
                    shown = ("left", "right")[assignment.presented_order.index(position)] if strength else choice
                    services.submit_label(db, project, uid, assignment.id, shown, strength, ms, key)
                else:
                    services.submit_answer(db, project, uid, assignment.id, task, form, ms, key)
                if rng.random() < 0.1:
                    services.undo_last(db, project, uid)  # the item comes back and is answered again
    return pid


def _reference_quality(db: Session, project: Project) -> dict[str, Any]:
    """The figures as the dashboard computed them before counting in the database."""
    answers = [quality.Answer(item.external_id, name, services.answer_of(label), label.time_spent_ms,
                              label.displayed_choice, tuple(label.presented_order))
               for label, item, name in services.active_labels(db, project)]
    gold = dict(db.execute(sa.select(Item.external_id, Item.gold).where(Item.project_id == project.id,
                                                                        Item.gold.is_not(None))).all())
    return {"project": project.name, **quality.compute(project.task, answers, gold)}


def _reference_progress(db: Session, project: Project) -> dict[str, Any]:
    labels = services.active_labels(db, project)
    by_unit: dict[Any, list[Any]] = defaultdict(list)
    for label, item, _ in labels:
        for unit, value in tasks.units(project.task, services.answer_of(label)).items():
            by_unit[(item.id, unit)].append(value)
    per_item = Counter(item.id for _, item, _ in labels)
    skips = db.execute(sa.select(sa.func.count()).select_from(Label).where(
        Label.project_id == project.id, Label.undone_at.is_(None), Label.skip_reason.is_not(None))).scalar_one()
    items = db.execute(sa.select(sa.func.count()).select_from(Item).where(Item.project_id == project.id)).scalar_one()
    return {"project": project.name, "task": project.task, "items": items, "overlap_k": project.overlap_k,
            "votes": len(labels), "items_complete": sum(n >= project.overlap_k for n in per_item.values()), "skips": skips,
            "votes_per_annotator": dict(Counter(name for _, _, name in labels)),
            "agreement": agreement(by_unit.values(), tasks.ALPHA_LEVEL[project.task])}


def assert_same_figures(got: Any, want: Any, where: str = "") -> None:
    """Equal structure, types and values; floats to 1e-12 (the counts are summed in another order)."""
    assert type(got) is type(want), (where, got, want)
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            assert_same_figures(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_figures(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), where
    else:
        assert got == want, where


@pytest.mark.parametrize("task", ["pairwise", "rank", "rate", "edit"])
def test_counted_figures_equal_the_definition(app: FastAPI, task: str) -> None:
    pid = _random_project(app, task, seed=len(task))
    with ctx(app).database.read() as db:
        project = services.admin_project(db, pid)
        got, want = quality.project_quality(db, project), _reference_quality(db, project)
        progress, want_progress = quality.project_progress(db, project), _reference_progress(db, project)
    assert want["answers"] > 40 and want["gold_items"] == (0 if task == "edit" else 3)
    assert sum(p["gold_units"] for p in want["annotators"]) > 0 or task == "edit"
    assert len(want["agreement"]["cohen"]) >= 10 and want["agreement"]["fleiss_units"] > 0
    assert_same_figures(got, want)
    assert_same_figures(progress, want_progress)


def test_chat_figures_equal_the_definition(app: FastAPI) -> None:
    """Chat answers have no units (each annotator judges their own drafts): answers and times only."""
    rng = random.Random(5)
    for name in ("cy", "Bo", "al"):
        add_user(app, name)
    pid = add_task_project(app, "chats", "chat", ["cy", "Bo", "al"], [task_row(f"c{i}", 0) for i in range(6)], k=2)
    with ctx(app).database.write() as db:  # finished conversations, as conversations.finish stores them
        items = db.execute(sa.select(Item).where(Item.project_id == pid)).scalars().all()
        for user in db.execute(sa.select(User).where(User.username.in_(["cy", "Bo"]))).scalars():
            for item in items[:4]:
                skipped = rng.random() < 0.25
                assignment = Assignment(project_id=pid, item_id=item.id, user_id=user.id, presented_order=[],
                                        status="skipped" if skipped else "done")
                db.add(assignment)
                db.flush()
                outcome = {"skip_reason": "off topic"} if skipped else {"answer": {"turns": rng.randint(1, 3)}}
                db.add(Label(assignment_id=assignment.id, project_id=pid, item_id=item.id, user_id=user.id,
                             presented_order=[], idempotency_key=f"{user.id}-{item.id}",
                             time_spent_ms=rng.choice((None, rng.randint(1000, 5000))), **outcome))
    with ctx(app).database.read() as db:
        project = services.admin_project(db, pid)
        want = _reference_quality(db, project)
        assert_same_figures(quality.project_quality(db, project), want)
        progress = quality.project_progress(db, project)
        assert_same_figures(progress, _reference_progress(db, project))
    assert want["answers"] > 4 and want["agreement"]["units"] == 0 and want["agreement"]["cohen"][0]["kappa"] is None
    assert (progress["items"], progress["items_complete"]) == (6, 2) and progress["skips"] > 0


def test_dashboard_is_live(app: FastAPI) -> None:
    """A new label shows at once (the cached figures are keyed on the labels' version)."""
    pid = _pairwise_project(app)
    add_user(app, "boss", "admin")
    add_user(app, "a4")
    admin = session_client(app, "boss")
    before = admin.get(f"/api/v1/projects/{pid}/quality").json()
    with ctx(app).database.write() as db:
        services.add_member(db, services.admin_project(db, pid), "a4")
    answer_all(app, pid, "a4", lambda item, _o: ("b", "better") if item == "p5" else None, ms=lambda item: 50)
    after = admin.get(f"/api/v1/projects/{pid}/quality").json()
    assert (before["answers"], after["answers"]) == (17, 18)
    assert {p["annotator"]: p["median_ms"] for p in after["annotators"]}["a4"] == 50
    assert before["agreement"]["krippendorff_alpha"] != after["agreement"]["krippendorff_alpha"]
    assert "18 answers" in admin.get(f"/admin/projects/{pid}/dashboard").text


def test_cached_figures_follow_every_change(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    """Label-derived figures are read once per labels_version: unchanged labels reuse them (the JSON of rank
    answers is not unnested again), new labels alone are read and merged, and an undo makes a full read;
    after each change the figures equal a from-scratch count of the database."""
    pid = _random_project(app, "rank", seed=11)
    reads: list[Any] = []  # `after` of each units read: None for a full read, a label id for new labels only
    read_flat = quality._read_flat_units
    monkeypatch.setattr(quality, "_read_flat_units",
                        lambda db, project, after, upto: reads.append(after) or read_flat(db, project, after, upto))
    quality.clear_label_cache()

    def check(expected_reads: list[str]) -> dict[str, Any]:
        with ctx(app).database.read() as db:
            project = services.admin_project(db, pid)
            got, progress = quality.project_quality(db, project), quality.project_progress(db, project)
            assert_same_figures(got, _reference_quality(db, project))
            assert_same_figures(progress, _reference_progress(db, project))
        assert ["full" if r is None else "new" for r in reads] == expected_reads
        return got

    first = check(["full"])
    check(["full"])  # nothing changed: no second read
    with ctx(app).database.write() as db:  # an answer undone: full read
        project = db.get(Project, pid)
        assert project is not None
        label = db.execute(sa.select(Label).where(Label.project_id == pid, services.active_answers())
                           .order_by(Label.id.desc()).limit(1)).scalar_one()
        user_id = label.user_id
        services.undo_last(db, project, user_id)
    assert check(["full", "full"])["answers"] == first["answers"] - 1
    with ctx(app).database.write() as db:  # the item it freed, skipped: a new label without units
        project = db.get(Project, pid)
        assert project is not None
        assignment = services.next_assignment(db, project, user_id, 60)
        assert assignment is not None
        services.skip(db, project, user_id, assignment.id, "unsure", None, "cache-skip")
    check(["full", "full", "new"])
    add_user(app, "newcomer")
    for turn in range(2):  # a new annotator's answers: new labels alone are read
        with ctx(app).database.write() as db:
            project = db.get(Project, pid)
            assert project is not None
            if turn == 0:
                services.add_member(db, project, "newcomer")
            uid = db.execute(sa.select(User.id).where(User.username == "newcomer")).scalar_one()
            assignment = services.next_assignment(db, project, uid, 60)
            assert assignment is not None
            n = len(db.get(Item, assignment.item_id).responses)  # type: ignore[union-attr]
            services.submit_answer(db, project, uid, assignment.id, "rank",
                                   {"ranking": ",".join(str(d) for d in range(n, 0, -1))}, 1000 + turn, f"new-{turn}")
        got = check(["full", "full", "new", "new"] + ["new"] * turn)
    assert got["answers"] == first["answers"] + 1
    assert {p["annotator"]: p["answers"] for p in got["annotators"]}["newcomer"] == 2
    with ctx(app).database.write() as db:  # the skip undone and the item answered: full read
        project = db.get(Project, pid)
        assert project is not None
        services.undo_last(db, project, user_id)
        assignment = services.next_assignment(db, project, user_id, 60)
        assert assignment is not None
        n = len(db.get(Item, assignment.item_id).responses)  # type: ignore[union-attr]
        services.submit_answer(db, project, user_id, assignment.id, "rank",
                               {"ranking": ",".join(str(d) for d in range(n, 0, -1))}, 1234, "cache-answer")
    assert check(["full", "full", "new", "new", "new", "full"])["answers"] == first["answers"] + 2


@pytest.mark.parametrize("scale", [1, 10**6])
def test_distinct_rows_is_unique_by_row(scale: int) -> None:
    """Rows read as numbers while they fit in 62 bits, else numpy's row-wise unique: the same answer."""
    table = np.random.default_rng(0).integers(0, 4, size=(500, 5)) * scale
    rows, inverse = quality._distinct_rows(table)
    want_rows, want_inverse = np.unique(table, axis=0, return_inverse=True)
    assert sorted(map(tuple, rows.tolist())) == list(map(tuple, want_rows.tolist()))
    assert (rows[inverse] == table).all() and len(rows) == len(want_rows) == len(set(want_inverse.tolist()))
