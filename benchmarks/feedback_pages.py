"""Server-side render time of the feedback app's busiest pages on a big project.

Builds one project (pairwise by default; `--task rank` or `rate`) with N items (imported through `services.import_items`) and M labels
(bulk-inserted assignments and labels spread over annotators, a few of them skips), then requests each
page R times in-process (FastAPI's TestClient, after warm-up) as a logged-in user and reports the
server-side time the app's access log measured (median and p95) and the client-side time. Target: the
annotator's task page, the admin's project page, the quality dashboard and its JSON twin under 100 ms
(median) at 10,000 items and 50,000 labels. The load average is printed with the figures: timings from a
busy machine are not comparable with a quiet one's. On PostgreSQL the tables are vacuumed and analysed
after the bulk load, as autovacuum does within a minute of one: without statistics the planner takes the
freshly loaded tables for empty, and without a visibility map index-only scans still visit the table
(`--no-analyse` measures that state, which a server with autovacuum off stays in).

    python benchmarks/feedback_pages.py                                  # SQLite in a temporary folder
    python benchmarks/feedback_pages.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench
    python benchmarks/feedback_pages.py --database-url ... --no-analyse  # PostgreSQL without statistics
    python benchmarks/feedback_pages.py --items 50 --labels 100 --requests 5   # seconds, for a smoke test
    python benchmarks/feedback_pages.py --task rank                      # 4-way rankings (rate: 1-5 ratings)

A PostgreSQL database should be empty or hold only earlier benchmark runs (names are made unique).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from alignloop.feedback import auth, migrations, quality, records, security, services
from alignloop.feedback.app import create_app
from alignloop.feedback.db import Assignment, Database, Item, Label, utcnow
from alignloop.feedback.settings import Settings

TARGET_MS = 100.0
PASSWORD = "benchmark-password-1"
STRENGTHS = ("much better", "better", "slightly better")
RANKED = 4  # responses per item of a rank project


def settings_for(url: str) -> Settings:
    # OWASP-minimum Argon2 costs: logins are not what is measured.
    return Settings(database_url=url, secret_key=secrets.token_urlsafe(36), cookie_secure=False, log_json=False,
                    argon2_memory_kib=19456, argon2_time_cost=2, argon2_parallelism=1)


def _item_rows(n: int, task: str) -> Iterator[tuple[int, dict[str, Any]]]:
    n_responses = {"pairwise": 2, "rank": RANKED, "rate": 1}[task]
    for i in range(n):
        yield i + 1, {"id": f"b{i:06d}", "prompt": f"Benchmark question {i}: explain item {i} in two sentences.",
                      "responses": [{"text": f"Answer {r + 1} to {i}. " * 8, "model": "policy", "version": f"step-{r}"}
                                    for r in range(n_responses)]}


def _answer(task: str, rng: random.Random) -> tuple[list[int], dict[str, Any]]:
    """(presented order, label columns) of one non-skipped rank or rate answer."""
    if task == "rank":
        order = rng.sample(range(RANKED), RANKED)
        return order, {"answer": {"ranking": rng.sample(range(RANKED), RANKED)}}
    scores = {axis: rng.randint(1, 5) for axis in ("helpful", "honest", "harmless")}
    return [0], {"answer": {"scores": scores, "flags": ["unsafe"] if rng.random() < 0.05 else []}}


def build(database: Database, settings: Settings, n_items: int, n_labels: int, n_annotators: int,
          seed: int = 0, task: str = "pairwise") -> dict[str, Any]:
    """The project, its users and labels; returns ids and names for the requests, and build times."""
    rng = random.Random(seed)
    tag = secrets.token_hex(3)
    per_item = max(1, math.ceil(n_labels / n_items))
    if per_item > n_annotators:
        raise SystemExit(f"--labels {n_labels} needs at least {per_item} annotators for {n_items} items")
    hasher = security.password_hasher(settings)
    t0 = time.perf_counter()
    with database.write() as db:
        admin = auth.create_user(db, hasher, f"bench-admin-{tag}", PASSWORD, "admin")
        annotators = [auth.create_user(db, hasher, f"bench-a{k}-{tag}", PASSWORD, "annotator") for k in range(n_annotators)]
        # k is one more than the votes an item gets, so every annotator still has items to label.
        project = services.create_project(db, f"bench-{tag}", "Pick the more helpful answer.", per_item + 1, task)
        for user in annotators:
            services.add_member(db, project, user.username)
        services.import_items(db, project, records.parse_items(_item_rows(n_items, task), "benchmark", task), "benchmark")
        item_ids = list(db.execute(sa.select(Item.id).where(Item.project_id == project.id).order_by(Item.id)).scalars())
    t_items = time.perf_counter() - t0

    t0 = time.perf_counter()
    now = utcnow()
    assignments, labels = [], []
    for j in range(n_labels):  # label j: item j mod N, by annotator (item + round) mod A, distinct per item
        i, r = j % n_items, j // n_items
        when = now - dt.timedelta(seconds=n_labels - j)
        assignment, label = _label_rows(project.id, item_ids[i], annotators[(i + r) % n_annotators].id, j, when, task, rng)
        assignments.append(assignment)
        labels.append(label)
    with database.write() as db:
        for start in range(0, n_labels, 5000):
            chunk = assignments[start:start + 5000]
            ids = db.execute(sa.insert(Assignment).returning(Assignment.id, sort_by_parameter_order=True), chunk).scalars().all()
            for label, assignment_id in zip(labels[start:start + 5000], ids, strict=True):
                label["assignment_id"] = assignment_id
            db.execute(sa.insert(Label), labels[start:start + 5000])
    t_labels = time.perf_counter() - t0
    return {"project_id": project.id, "admin": admin.username, "annotator": annotators[0].username,
            "build_items_s": t_items, "build_labels_s": t_labels, "task": task, "item_ids": item_ids,
            "annotator_ids": [a.id for a in annotators], "per_item": per_item, "added": 0, "rng": rng}


def _label_rows(project_id: int, item_id: int, user_id: int, j: int, when: dt.datetime, task: str,
                rng: random.Random) -> tuple[dict[str, Any], dict[str, Any]]:
    """The assignment and label rows of benchmark label j (2% skips)."""
    order = rng.sample([0, 1], 2)
    skipped = rng.random() < 0.02
    if task != "pairwise":
        order, answer = _answer(task, rng)
    assignment = {"project_id": project_id, "item_id": item_id, "user_id": user_id, "presented_order": order,
                  "status": "skipped" if skipped else "done", "created_at": when, "updated_at": when}
    displayed = rng.choice(("left", "left", "right", "right", "tie"))
    if task != "pairwise":
        vote = {"choice": None, "strength": None, "displayed_choice": None,
                "skip_reason": "not sure" if skipped else None, "answer": None if skipped else answer["answer"]}
    elif skipped:
        vote = {"choice": None, "strength": None, "displayed_choice": None, "skip_reason": "not sure"}
    else:
        vote = {"choice": "tie" if displayed == "tie" else ("a", "b")[order[0] if displayed == "left" else order[1]],
                "strength": None if displayed == "tie" else rng.choice(STRENGTHS), "displayed_choice": displayed,
                "skip_reason": None}
    label = {"project_id": project_id, "item_id": item_id, "user_id": user_id, "presented_order": order,
             "idempotency_key": f"bench-{j}", "time_spent_ms": rng.randint(2_000, 60_000), "created_at": when, **vote}
    return assignment, label


def add_label(database: Database, info: dict[str, Any]) -> None:
    """One more label, as an annotator's submit adds it: item k by an annotator who has not labelled it yet."""
    k = info["added"]
    info["added"] += 1
    item_id = info["item_ids"][k % len(info["item_ids"])]
    user_id = info["annotator_ids"][(k + info["per_item"]) % len(info["annotator_ids"])]
    assignment, label = _label_rows(info["project_id"], item_id, user_id, 10**9 + k, utcnow(), info["task"], info["rng"])
    with database.write() as db:
        label["assignment_id"] = db.execute(sa.insert(Assignment).returning(Assignment.id), assignment).scalar_one()
        db.execute(sa.insert(Label), label)


class AccessTimes(logging.Handler):
    """Collects the `ms` the app's access log measures for each request (server-side time)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ms: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        ms = getattr(record, "ms", None)
        if ms is not None:
            self.ms.append(float(ms))


@contextmanager
def access_times() -> Iterator[AccessTimes]:
    logger = logging.getLogger("alignloop.feedback.access")
    handler, level = AccessTimes(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def measure(app: Any, username: str, path: str, n: int, warmup: int = 3,
            before: Callable[[], None] | None = None) -> dict[str, float]:
    """Median and p95 of server-side (access log) and client-side milliseconds over `n` GETs of `path`;
    `before()` runs before each timed request (empty the quality cache, add a label)."""
    from fastapi.testclient import TestClient

    ctx = app.state.ctx
    token = auth.login(ctx, username, PASSWORD)
    assert token is not None
    with TestClient(app, follow_redirects=False) as client:
        client.cookies.set(ctx.session_cookie, token)
        for _ in range(warmup):
            assert client.get(path).status_code == 200, path
        client_ms = []
        with access_times() as times:
            for _ in range(n):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                response = client.get(path)
                client_ms.append(1000 * (time.perf_counter() - t0))
                assert response.status_code == 200, (path, response.status_code)
    server_ms = times.ms[-n:]
    return {"requests": n, "server_median_ms": statistics.median(server_ms), "server_p95_ms": p95(server_ms),
            "client_median_ms": statistics.median(client_ms)}


def pages(app: Any, info: dict[str, Any]) -> list[tuple[str, str, str, bool, Callable[[], None] | None]]:
    """(name, user, path, has the 100 ms target, what runs before each request) of each page measured; the
    dashboard if the app has one. "Cold" rows empty the quality cache first (a page after an undo, or a
    process's first view); "new label" rows add one label first (a page on a project being labelled)."""
    pid, database = info["project_id"], app.state.ctx.database

    def new_label() -> None:
        add_label(database, info)

    out: list[tuple[str, str, str, bool, Callable[[], None] | None]] = [
        ("annotator task page", info["annotator"], f"/annotate/{pid}", True, None),
        ("admin project page", info["admin"], f"/admin/projects/{pid}", True, None),
        ("admin project page, cold", info["admin"], f"/admin/projects/{pid}", False, quality.clear_label_cache),
        ("admin project page, new label", info["admin"], f"/admin/projects/{pid}", False, new_label),
        ("annotator home", info["annotator"], "/annotate", False, None),
        ("admin home", info["admin"], "/admin", False, None)]
    paths = {getattr(r, "path", "") for r in _all_routes(app)}
    if "/admin/projects/{project_id}/dashboard" in paths:
        dashboard = f"/admin/projects/{pid}/dashboard"
        out += [("admin quality dashboard", info["admin"], dashboard, True, None),
                ("admin quality dashboard, cold", info["admin"], dashboard, False, quality.clear_label_cache),
                ("admin quality dashboard, new label", info["admin"], dashboard, False, new_label)]
    if "/api/v1/projects/{project_id}/quality" in paths:
        out.append(("quality API (JSON)", info["admin"], f"/api/v1/projects/{pid}/quality", True, None))
    return out


def _all_routes(app: Any) -> list[Any]:
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        return list(app.routes)
    return list(iter_route_contexts(app.routes))


def table(results: list[dict[str, Any]]) -> str:
    head = f"{'page':<36}{'requests':>9}{'server median ms':>18}{'server p95 ms':>15}{'client median ms':>18}  target"
    lines = [head, "-" * len(head)]
    for r in results:
        verdict = ("ok" if r["server_median_ms"] < TARGET_MS else "OVER") if r["target"] else "-"
        lines.append(f"{r['page']:<36}{r['requests']:>9}{r['server_median_ms']:>18.1f}{r['server_p95_ms']:>15.1f}"
                     f"{r['client_median_ms']:>18.1f}  {f'< {TARGET_MS:.0f} ms: {verdict}' if r['target'] else verdict}")
    return "\n".join(lines)


def _loads(values: tuple[float, ...]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def run(url: str, n_items: int, n_labels: int, n_requests: int, n_annotators: int,
        analyse: bool = True, task: str = "pairwise") -> dict[str, Any]:
    settings = settings_for(url)
    database = Database(url)
    try:
        migrations.upgrade(database.engine)
        info = build(database, settings, n_items, n_labels, n_annotators, task=task)
        if analyse and database.dialect == "postgresql":
            with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM ANALYZE")
        load_before = os.getloadavg()
        app = create_app(settings, database=database)
        results = [{"page": name, "path": path, "target": target, **measure(app, user, path, n_requests, before=before)}
                   for name, user, path, target, before in pages(app, info)]
    finally:
        database.dispose()
    return {"database": database.dialect, "task": task, "items": n_items, "labels": n_labels, "annotators": n_annotators,
            "analysed": analyse and database.dialect == "postgresql",
            "build_items_s": info["build_items_s"], "build_labels_s": info["build_labels_s"], "results": results,
            "load_average": {"before": load_before, "after": os.getloadavg()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--labels", type=int, default=50_000)
    parser.add_argument("--annotators", type=int, default=10)
    parser.add_argument("--task", choices=("pairwise", "rank", "rate"), default="pairwise", help="the project's task")
    parser.add_argument("--requests", type=int, default=50, help="timed requests per page (after 3 warm-up ones)")
    parser.add_argument("--database-url", default="", help="default: SQLite in a temporary folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-analyse", dest="analyse", action="store_false",
                        help="PostgreSQL: measure straight after the bulk load, without VACUUM ANALYZE (as on a "
                             "server whose autovacuum is off)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alignloop-bench-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        out = run(url, args.items, args.labels, args.requests, args.annotators, args.analyse, args.task)
    print(f"feedback pages on {out['database']}: {out['task']} project, {out['items']} items, {out['labels']} labels, "
          f"{out['annotators']} annotators (built in {out['build_items_s']:.1f} s + {out['build_labels_s']:.1f} s"
          f"{', then VACUUM ANALYZE' if out['analysed'] else ''})")
    load = out["load_average"]
    print(f"load average (1, 5, 15 min) before the requests {_loads(load['before'])}, after {_loads(load['after'])}, "
          f"on {os.cpu_count()} CPUs")
    print(table(out["results"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
