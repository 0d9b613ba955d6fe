"""The whole pairwise workflow in a real browser, as people do it.

An admin logs in, creates a project, adds two annotators and uploads items on the project page; each
annotator labels ten pairs with the keyboard alone (one of them after an undo) and skips one item with
a reason; the admin downloads the export, which `load_records(path, "pair")` reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import Shots, Visitor, assert_strict_csp

from alignloop.data import load_records

pytestmark = pytest.mark.browser

N_ITEMS = 14
LABELS_EACH = 10
# Keys by strength (docs/feedback.md): the good answer on the left is 1-3, on the right 7-5.
LEFT_KEYS = {"much better": "1", "better": "2", "slightly better": "3"}
RIGHT_KEYS = {"much better": "7", "better": "6", "slightly better": "5"}
MARGINS = {"much better": 3, "better": 2, "slightly better": 1}


def write_items(path: Path) -> Path:
    """Items whose good answer says so, at position a or b by turns (the page shuffles them anyway)."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(N_ITEMS):
            good = {"text": f"good answer to q{i:02d}: boil it for 8 minutes", "model": "policy", "version": "step-400"}
            poor = {"text": f"poor answer to q{i:02d}: eggs are laid by hens", "model": "sft", "version": "v1"}
            row = {"id": f"q{i:02d}", "prompt": f"Question q{i:02d}: how long do I boil an egg?",
                   "responses": [good, poor] if i % 2 else [poor, good], "meta": {"source": "browser test"}}
            f.write(json.dumps(row) + "\n")
    return path


def shown_item(v: Visitor) -> tuple[str, str]:
    """(item id, side of the good answer) of the pair on the page."""
    prompt = v.page.inner_text("h2:has-text('Prompt') + .text")
    item = re.search(r"q\d\d", prompt)
    assert item, prompt
    left = v.page.inner_text("#left")
    right = v.page.inner_text("#right")
    assert ("good answer" in left) != ("good answer" in right), (left, right)
    return item.group(0), "left" if "good answer" in left else "right"


def press(v: Visitor, key: str) -> Any:
    response = v.navigate(lambda: v.page.keyboard.press(key))
    assert response.status == 200, (key, response.status, v.page.url)
    return response


def label_by_keyboard(v: Visitor, project_id: int, undo_at: int, skip_at: int) -> dict[str, str]:
    """Label LABELS_EACH pairs with keys only: at step `undo_at` first answer wrongly, undo with `u`
    (the same item must come back) and answer again; at step `skip_at` skip with `s` and a reason.
    Returns {item id: strength of the vote that stands}."""
    v.goto(f"/annotate/{project_id}")
    votes: dict[str, str] = {}
    strengths = list(MARGINS)
    step = 0
    while len(votes) < LABELS_EACH:
        item, good = shown_item(v)
        assert item not in votes, f"{item} was given twice"
        if step == skip_at:
            v.page.keyboard.press("s")
            assert v.page.evaluate("document.activeElement.id") == "skip-reason"
            v.page.keyboard.type("I do not know how eggs are cooked.")
            press(v, "Enter")
            assert shown_item(v)[0] != item
            step += 1
            continue
        if step == undo_at:
            wrong = (RIGHT_KEYS if good == "left" else LEFT_KEYS)["much better"]
            press(v, wrong)
            assert shown_item(v)[0] != item
            press(v, "u")
            assert shown_item(v)[0] == item, "undo did not bring the item back"
        strength = strengths[step % 3]
        press(v, (LEFT_KEYS if good == "left" else RIGHT_KEYS)[strength])
        votes[item] = strength
        step += 1
    text = v.page.inner_text("body")
    assert f"You have labelled {LABELS_EACH} and skipped 1" in text, text
    return votes


def download(v: Visitor, link_text: str, out: Path) -> Any:
    with v.page.expect_download() as info:
        v.page.click(f"a:text-is('{link_text}')")
    info.value.save_as(str(out))
    return out


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
