"""The whole feedback loop in a real browser, from an empty app to a trained reward model.

An admin creates five projects (pairwise, rank, rate, edit, chat) on the pages, each with two annotators
and overlap 2, and points the chat project at a running `alignloop serve` of a tiny model. Each annotator
labels ten pairs by keyboard (with an undo and a skip; the second ties two items the first one judged),
ranks three responses, rates one on helpful/honest/harmless with a flag, rewrites one, and has a chat turn:
asks the model, picks one of its two drafts, gives it a thumb and finishes. The admin reads the agreement
on the dashboard (checked against `alignloop.agreement` on the exported raw votes), downloads every
export through the browser, and the consensus pairs train a reward model with `alignloop reward`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_helpers import (
    LABELS_EACH,
    Shots,
    Visitor,
    create_project,
    download,
    label_by_keyboard,
    press,
    write_items,
    write_jsonl,
)
from tiny_chat_model import ServeProcess, build_tiny_chat_model, serve_process

from alignloop.agreement import cohen_kappa, fleiss_kappa, krippendorff_alpha, percent_agreement
from alignloop.data import load_records
from alignloop.feedback.chat import ENV_MODEL_HOSTS
from alignloop.feedback.pages import FLAG_KEYS

pytestmark = pytest.mark.browser

ANNOTATORS = ("ann1", "ann2")
MODEL_NAME = "tiny-policy"
RESPONSE = {"model": "policy", "version": "step-400"}
RANK_ITEM = {"id": "r1", "prompt": "How do I boil an egg?",
             "responses": [{"text": "fair: boil it a while", **RESPONSE}, {"text": "best: boil it for 8 minutes", **RESPONSE},
                           {"text": "worst: eggs are laid by hens", **RESPONSE}]}
RATE_ITEM = {"id": "h1", "prompt": "Is the moon made of cheese?",
             "responses": [{"text": "Yes, of a blue cheese, as Apollo 11 found.", **RESPONSE}]}
EDIT_ORIGINAL = "Boil it for 30 minutes."
EDIT_ITEM = {"id": "e1", "prompt": "How long do I boil an egg?", "responses": [{"text": EDIT_ORIGINAL, **RESPONSE}]}
CHAT_ITEM = {"id": "c1", "prompt": "the quick brown fox"}
# What each annotator does on the rank, rate, edit and chat tasks.
RANKS = {"ann1": ("best", "fair", "worst"), "ann2": ("best", "worst", "fair")}
RATES = {"ann1": ("455", ("made_up_facts",)), "ann2": ("354", ("made_up_facts", "off_topic"))}  # helpful, honest, harmless
EDITS = {"ann1": "Boil it for 8 minutes, then cool it in cold water.", "ann2": "Boil it for 9 minutes."}
CHATS = {"ann1": (1, "+", True), "ann2": (2, "-", False)}  # draft picked, thumb key, thumb up


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    return build_tiny_chat_model(tmp_path / "policy")


@pytest.fixture
def chat_model(policy_dir: Path, artifacts: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServeProcess]:
    """`alignloop serve` of the tiny model, loading while the app starts; the app may call 127.0.0.1."""
    monkeypatch.setenv(ENV_MODEL_HOSTS, "127.0.0.1")
    with serve_process(policy_dir, MODEL_NAME, artifacts / "serve.log") as server:
        yield server


@pytest.fixture
def live_server(chat_model: ServeProcess, live_server: Any) -> Any:
    """The app server, started after `chat_model` has put 127.0.0.1 on its model allow-list."""
    return live_server


def rank_by_keyboard(v: Visitor, project_id: int, order: tuple[str, ...]) -> None:
    """Rank the responses starting with the words of `order`, best first: a digit each (the last one fills
    itself in), then Enter."""
    v.goto(f"/annotate/{project_id}")
    shown = [v.page.inner_text(f"#cand-{i} .text").split(":")[0] for i in range(1, len(order) + 1)]
    for word in order[:-1]:
        v.page.keyboard.press(str(shown.index(word) + 1))
    assert v.page.input_value("#ranking") == ",".join(str(shown.index(word) + 1) for word in order)
    v.shot()  # the picks, marked on the page
    press(v, "Enter")


def rate_by_keyboard(v: Visitor, project_id: int, scores: str, flags: tuple[str, ...]) -> None:
    """A digit per axis (helpful, honest, harmless), each flag's key, then Enter."""
    v.goto(f"/annotate/{project_id}")
    keys = {value: key for value, key, _ in FLAG_KEYS}
    for key in [*scores, *(keys[flag] for flag in flags)]:
        v.page.keyboard.press(key)
    checked = v.page.eval_on_selector_all("#answer-form input:checked", "els => els.map(e => e.value)")
    assert checked == [*scores, *flags], checked
    v.shot()
    press(v, "Enter")


def edit_by_keyboard(v: Visitor, project_id: int, text: str) -> None:
    """`e` into the text, select it all, type the rewrite, Ctrl+Enter."""
    v.goto(f"/annotate/{project_id}")
    v.page.keyboard.press("e")
    v.page.keyboard.press("Control+A")
    v.page.keyboard.type(text)
    assert v.page.input_value("#edited") == text
    v.shot()
    press(v, "Control+Enter")


def as_parsed(text: str) -> str:
    """`text` as a page's DOM holds it: HTML parsing turns CR and CRLF into LF and NUL into U+FFFD (a random
    model's drafts can hold any byte)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "\ufffd")


def chat_turn_by_keyboard(v: Visitor, project_id: int, pick: int, thumb_key: str) -> list[str]:
    """Ask the model (Enter), pick a draft (its digit), thumb it (+ or -), finish (f); returns the drafts
    as the page showed them."""
    v.goto(f"/annotate/{project_id}")
    press(v, "Enter")
    drafts = v.page.locator(".cand .text").all_text_contents()
    assert len(drafts) == 2, drafts
    press(v, str(pick))
    press(v, thumb_key)
    assert v.page.inner_text("#turn-0 .muted") == ("(thumb up)" if thumb_key == "+" else "(thumb down)")
    press(v, "f")
    return drafts


def table_cells(v: Visitor, selector: str) -> dict[str, str]:
    """A dashboard table as {first cell: first word of the second cell}."""
    rows = v.page.eval_on_selector_all(f"{selector} tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText))")
    return {row[0]: row[1].split()[0] for row in rows if len(row) >= 2}


def check_dashboard(admin: Visitor, project_id: int, votes_path: Path, tied: list[str]) -> None:
    """The figures shown are `alignloop.agreement`'s on the items both annotators voted (from the raw votes)."""
    labels: dict[str, dict[str, str]] = {name: {} for name in ANNOTATORS}
    for line in votes_path.read_text(encoding="utf-8").splitlines():
        vote = json.loads(line)
        labels[vote["meta"]["annotator_id"]][vote["meta"]["item_id"]] = vote["choice"]
    both = sorted(labels["ann1"].keys() & labels["ann2"].keys())
    shared = [[labels[a][item] for a in ANNOTATORS] for item in both]
    assert sum(x != y for x, y in shared) == len(tied) == 2, "exactly the two ties disagree"
    expected = {"Krippendorff's alpha (nominal)": krippendorff_alpha(shared, "nominal"),
                "Fleiss' kappa": fleiss_kappa(labels=shared), "Percent agreement": percent_agreement(shared)}
    assert expected["Percent agreement"] == 1 - 2 / len(both) and expected["Krippendorff's alpha (nominal)"] < 1
    admin.goto(f"/admin/projects/{project_id}/dashboard")
    shown = table_cells(admin, "#agreement")
    assert {k: shown[k] for k in expected} == {k: f"{x:.3f}" for k, x in expected.items()}, shown
    kappa = cohen_kappa([x for x, _ in shared], [y for _, y in shared])
    assert table_cells(admin, "#cohen") == {"Annotators": "Kappa", "ann1 / ann2": f"{kappa:.3f}"}
    assert f"Measured on {len(labels['ann1'].keys() | labels['ann2'].keys())} units ({len(both)} labelled" in \
        admin.page.inner_text("body")


def train_reward_model(policy_dir: Path, pairs: Path, out: Path) -> dict[str, Any]:
    """`alignloop reward` on the exported pairs, from the tiny policy, for 4 steps; returns its JSON summary."""
    overrides = {"model.name_or_path": policy_dir, "data.train_path": pairs, "data.eval_share": 0.2,
                 "batch.micro_batch_size": 2, "batch.max_steps": 4, "optim.warmup_steps": 1, "run.output_dir": out,
                 "run.log_every": 1, "run.progress_bar": "false", "run.tensorboard": "false", "max_overfit_gap": 1.0}
    command = [sys.executable, "-m", "alignloop.cli", "reward", *(x for k, v in overrides.items() for x in (f"--{k}", str(v)))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def set_up_projects(admin: Visitor, chat_model: ServeProcess, tmp_path: Path) -> tuple[dict[str, int], str]:
    """One project per task, each with both annotators and its items; the chat project's model is the running
    `alignloop serve`, tried once from the project page. Returns the project ids and the served weights' version."""
    files = {"pairwise": write_items(tmp_path / "eggs.jsonl"), "rank": write_jsonl(tmp_path / "rank.jsonl", [RANK_ITEM]),
             "rate": write_jsonl(tmp_path / "rate.jsonl", [RATE_ITEM]),
             "edit": write_jsonl(tmp_path / "edit.jsonl", [EDIT_ITEM]), "chat": write_jsonl(tmp_path / "chat.jsonl", [CHAT_ITEM])}
    ids = {task: create_project(admin, f"Eggs: {task}", task, path, ANNOTATORS, guidelines="Prefer correct, useful answers.")
           for task, path in files.items()}
    chat_model.wait_ready()
    version = httpx.get(f"{chat_model.url}/models", timeout=10).json()["data"][0]["version"]
    admin.page.fill("input[name=base_url]", chat_model.url)
    admin.page.fill("input[name=model]", MODEL_NAME)
    admin.page.fill("input[name=max_tokens]", "12")
    admin.navigate(lambda: admin.page.click("button:text-is('Save the model')"))
    admin.navigate(lambda: admin.page.click("button:text-is('Ask it for one draft now')"))
    assert f"{MODEL_NAME} (version {version}) answered" in admin.page.inner_text("body")
    return ids, str(version)


def annotate_everything(v: Visitor, name: str, ids: dict[str, int], tie_on: Callable[[str], bool],
                        undo_at: int, skip_at: int) -> tuple[dict[str, str], list[str]]:
    """One annotator's session, by keyboard: ten pairs (see label_by_keyboard), then one answer on each other
    task. Returns the pair votes and the chat drafts shown."""
    v.login(name)
    assert v.page.locator("table a").all_inner_texts() == [f"Eggs: {task}" for task in ids]
    votes = label_by_keyboard(v, ids["pairwise"], undo_at, skip_at, tie_on)
    rank_by_keyboard(v, ids["rank"], RANKS[name])
    rate_by_keyboard(v, ids["rate"], *RATES[name])
    edit_by_keyboard(v, ids["edit"], EDITS[name])
    drafts = chat_turn_by_keyboard(v, ids["chat"], *CHATS[name][:2])
    v.goto("/annotate")
    done = [row.split("\t")[:3] for row in v.page.locator("table tr").all_inner_texts()[1:]]
    assert done == [[f"Eggs: {task}", *((str(LABELS_EACH), "1") if task == "pairwise" else ("1", "0"))] for task in ids]
    v.close()
    return votes, drafts


def check_task_exports(admin: Visitor, ids: dict[str, int], drafts: dict[str, list[str]], version: str,
                       out: Path) -> None:
    """Download the rankings, ratings, edits and conversations from the project pages; each holds the
    consensus or the raw answers the keys gave."""
    got = {}
    for task, kind in (("rank", "rankings"), ("rate", "ratings"), ("edit", "edits"), ("chat", "conversations")):
        admin.goto(f"/admin/projects/{ids[task]}")
        got[kind] = download(admin, kind, out / f"{kind}.jsonl")
    [ranking] = load_records(got["rankings"], "ranking")
    assert [r.split(":")[0] for r in ranking.responses] == ["best", "fair", "worst"]  # equal mean ranks: import order
    assert ranking.meta["agreement"] == pytest.approx((1 + 2 / 3) / 2)
    [rating] = load_records(got["ratings"], "rating")
    assert rating.scores == {"helpful": 3.5, "honest": 5.0, "harmless": 4.5}
    assert rating.flags == ["made_up_facts"]
    assert rating.meta["flag_counts"] == {"unsafe": 0, "made_up_facts": 2, "off_topic": 1}
    edits = load_records(got["edits"], "edit")
    assert {e.id: (e.original, e.edited) for e in edits} == {
        f"e1:{name}": (EDIT_ORIGINAL, text) for name, text in EDITS.items()}
    conversations = {c.id: c for c in load_records(got["conversations"], "sft")}
    assert sorted(conversations) == [f"c1:{name}" for name in ANNOTATORS]
    for name, (pick, _, up) in CHATS.items():
        conv = conversations[f"c1:{name}"]
        [turn] = conv.meta["turns"]
        assert [as_parsed(d["text"]) for d in turn["drafts"]] == drafts[name]
        assert conv.messages[-1] == {"role": "assistant", "content": turn["drafts"][pick - 1]["text"]}
        assert (turn["thumb"], conv.meta["finished"]) == (up, True)
        assert all(d["model"] == {"name": MODEL_NAME, "version": version} for d in turn["drafts"])


def test_two_annotators_do_every_task_and_the_export_trains_a_reward_model(
        live_server: Any, chat_model: ServeProcess, policy_dir: Path, browser: Any, artifacts: Path,
        tmp_path: Path) -> None:
    live_server.add_user("ada", admin=True)
    for name in ANNOTATORS:
        live_server.add_user(name)
    shots = Shots(artifacts)
    admin = Visitor(browser, live_server.url, shots, "ada")
    admin.login("ada")
    ids, version = set_up_projects(admin, chat_model, tmp_path)

    votes: dict[str, dict[str, str]] = {}
    drafts: dict[str, list[str]] = {}
    tied: list[str] = []

    def ann2_ties(item: str) -> bool:
        """The first two items ann1 has voted on get a tie from ann2 (they disagree there)."""
        if item in votes["ann1"] and len(tied) < 2:
            tied.append(item)
            return True
        return False

    for name, undo_at, skip_at, tie_on in (("ann1", 2, 4, lambda item: False), ("ann2", 5, 0, ann2_ties)):
        votes[name], drafts[name] = annotate_everything(Visitor(browser, live_server.url, shots, name), name, ids,
                                                        tie_on, undo_at, skip_at)

    admin.goto(f"/admin/projects/{ids['pairwise']}")
    got = {kind: download(admin, kind, tmp_path / f"{kind}.jsonl") for kind in ("pairs", "votes")}
    check_dashboard(admin, ids["pairwise"], got["votes"], tied)
    pairs = load_records(got["pairs"], "pair")
    voted = votes["ann1"].keys() | votes["ann2"].keys()
    assert sorted(p.id for p in pairs) == sorted(voted - set(tied)), "a vote against a tie has no majority"
    assert all(p.chosen.startswith("good answer") for p in pairs)
    check_task_exports(admin, ids, drafts, version, tmp_path)
    admin.close()

    summary = train_reward_model(policy_dir, got["pairs"], tmp_path / "reward")
    assert summary["steps"] == 4 and math.isfinite(summary["rm/loss"]), summary
    final = Path(summary["final"])
    assert final == tmp_path / "reward" / "final" and (final / "model.safetensors").is_file()
    first = json.loads((tmp_path / "reward" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data/train_pairs"] + first["data/eval_pairs"] == len(pairs), "trained on the exported pairs"
    assert all(p.stat().st_size > 1000 for p in shots.taken)
