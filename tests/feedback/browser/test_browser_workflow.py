"""The whole pairwise workflow in a real browser, as people do it.

An admin logs in, creates a project, adds two annotators and uploads items on the project page; each
annotator labels ten pairs with the keyboard alone (one of them after an undo) and skips one item with
a reason; the admin downloads the export, which `load_records(path, "pair")` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from browser_helpers import (
    LABELS_EACH,
    MARGINS,
    N_ITEMS,
    Shots,
    Visitor,
    assert_strict_csp,
    download,
    label_by_keyboard,
    write_items,
)

from alignloop.data import load_records

pytestmark = pytest.mark.browser

def test_admin_and_two_annotators_label_by_keyboard_and_export(live_server: Any, browser: Any, artifacts: Path,
                                                               tmp_path: Path) -> None:
    live_server.add_user("ada", admin=True)
    live_server.add_user("ann1")
    live_server.add_user("ann2")
    shots = Shots(artifacts)

    admin = Visitor(browser, live_server.url, shots, "ada")
    response = admin.login("ada")
    assert admin.path() == "/admin" and response.status == 200
    assert_strict_csp(response.headers["content-security-policy"])
    admin.page.fill("input[name=name]", "Boiled eggs")
    admin.page.fill("input[name=overlap_k]", "2")
    admin.page.fill("textarea[name=guidelines]", "Prefer the answer that is correct and useful.")
    admin.navigate(lambda: admin.page.click("button:text-is('Create')"))
    project_id = int(admin.path().rsplit("/", 1)[1])
    assert admin.page.inner_text("h1") == "Boiled eggs"
    for name in ("ann1", "ann2"):
        admin.page.fill("input[name=username]", name)
        admin.navigate(lambda: admin.page.click("form[action$='/members'] button"))
    admin.page.set_input_files("input[type=file]", str(write_items(tmp_path / "eggs.jsonl")))
    admin.navigate(lambda: admin.page.click("form[enctype='multipart/form-data'] button"))
    assert f"{N_ITEMS} items, overlap k = 2" in admin.page.inner_text("body")

    votes = {}
    for name, undo_at, skip_at in (("ann1", 2, 4), ("ann2", 5, 0)):
        annotator = Visitor(browser, live_server.url, shots, name)
        annotator.login(name)
        assert annotator.path() == "/annotate"
        assert "Boiled eggs" in annotator.page.inner_text("body")
        votes[name] = label_by_keyboard(annotator, project_id, undo_at, skip_at)
        annotator.close()

    admin.goto(f"/admin/projects/{project_id}")
    summary = admin.page.inner_text("body")
    assert f"{2 * LABELS_EACH} votes, 2 skips" in summary, summary
    both = set(votes["ann1"]) & set(votes["ann2"])
    assert f"{len(both)} items have k votes" in summary

    pairs = load_records(download(admin, "pairs", tmp_path / "pairs.jsonl"), "pair")
    assert {p.id for p in pairs} == set(votes["ann1"]) | set(votes["ann2"]), "one consensus pair per voted item"
    for p in pairs:
        voters = [a for a in votes if p.id in votes[a]]
        assert p.chosen.startswith("good answer") and p.rejected.startswith("poor answer")
        assert p.margin == min(MARGINS[votes[a][p.id]] for a in voters), "the lower median of the stated strengths"
        assert p.meta["n_annotators"] == len(voters) == (2 if p.id in both else 1)
    own = load_records(download(admin, "annotator-pairs", tmp_path / "annotator-pairs.jsonl"), "pair")
    assert len(own) == 2 * LABELS_EACH, "the undone vote is not exported"
    assert all(p.chosen.startswith("good answer") for p in own)
    assert {p.id for p in own} == {f"{item}:{a}" for a in votes for item in votes[a]}
    admin.close()
    assert len(shots.taken) >= 2 * (LABELS_EACH + 4) and all(p.stat().st_size > 1000 for p in shots.taken)
