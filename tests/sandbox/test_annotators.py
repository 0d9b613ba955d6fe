"""Simulated annotators: candidates, agreement with the gold judge, exploitable biases, records and options."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter, defaultdict

import pytest
from sandbox_worlds import SMALL, world_for

from alignloop.config import load_config
from alignloop.data import PreferencePair, Prompt, load_records, validate_records
from alignloop.sandbox import (
    Annotator,
    AnnotatorConfig,
    GoldJudge,
    Panel,
    PanelConfig,
    SandboxConfig,
    World,
    build_world,
    load_world,
    write_world,
)
from alignloop.sandbox.annotators import MAX_FLATTERY_WORDS, MAX_LENGTH_WORDS
from alignloop.sandbox.world import (
    APPLICABLE,
    EXPLOIT_LABELS,
    FLATTERY_OPENERS,
    FLATTERY_WORDS,
    NEAR_MISS_CLOSERS,
    NEAR_MISS_OPENERS,
    WORD_RE,
    fixed_words,
)

WORLDS = ["seed0", "variant"]  # the default and a variant nobody tuned on
CLEAR = 0.5  # a clear pair: gold overall scores differ by more than this


def _prompts(world: World, n: int) -> list[Prompt]:
    return world.prompts_train[:n]


def _words(text: str) -> int:
    return len(WORD_RE.findall(text))


def _labelled(world: World, n_prompts: int, n: int = 12, seed: int = 0) -> list[tuple[Prompt, dict[str, list[str]]]]:
    """Per prompt, candidate texts grouped by label."""
    rng, out = random.Random(seed), []
    for prompt in _prompts(world, n_prompts):
        groups: dict[str, list[str]] = defaultdict(list)
        for label, text in world.labelled_candidates(prompt, n, rng):
            groups[label].append(text)
        out.append((prompt, groups))
    return out


def _votes(ann: Annotator, items: list[tuple[Prompt, str, str]], reps: int = 4, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    return [v for p, a, b in items for _ in range(reps) if (v := ann.compare(p, a, b, rng)) is not None]


def _share(votes: list[PreferencePair], wanted: list[str] | set[str]) -> float:
    return sum(v.chosen in wanted for v in votes) / len(votes)


def _all_records(panel: Panel, prompts: list[Prompt]) -> dict[str, list]:
    return {"pair": panel.collect_pairs(prompts, 2), "ranking": panel.collect_rankings(prompts),
            "rating": panel.collect_ratings(prompts, 2), "edit": panel.collect_edits(prompts, 3),
            "thumb": panel.collect_thumbs(prompts, 2)}


# ------------------------------------------------------------------------------------------ candidates


@pytest.mark.parametrize("name", WORLDS)
def test_candidates_are_distinct_varied_and_deterministic(name: str) -> None:
    world = world_for(name)
    judge = GoldJudge(world)
    for prompt in _prompts(world, 150):
        items = world.labelled_candidates(prompt, 10, random.Random(prompt.id))
        assert items == world.labelled_candidates(prompt, 10, random.Random(prompt.id))
        assert [t for _, t in items] == world.candidates(prompt, 10, random.Random(prompt.id))
        texts = [t for _, t in items]
        assert len(set(texts)) == 10 and [lab for lab, _ in items].count("good") == 1
        kind = judge.kind(prompt.messages)
        assert {lab for lab, _ in items} <= {"good", *APPLICABLE[kind], *EXPLOIT_LABELS}
        good = next(t for lab, t in items if lab == "good")
        assert good == judge.reference(prompt.messages)
        for label, text in items:
            s = judge.score(prompt.messages, text)
            assert s.well_formed, text  # every candidate has the world's shape; quality differs
            if label == "good":
                assert s.overall == 1.0
            elif label in APPLICABLE[kind] or label == "confident_bad":
                assert s.overall <= 0.1, (label, text, s.reason)
            elif label == "near_miss":
                assert 0.6 <= s.overall <= 1.0 and good in text
            elif label == "padded":
                assert s.overall <= 0.2 and good in text and _words(text) > _words(good) + 8
            elif label == "flattering":
                assert good in text and any(w.lower() in FLATTERY_WORDS for w in WORD_RE.findall(text))
        three = world.labelled_candidates(prompt, 3, random.Random(1))  # a clear and a close pair from n = 3
        assert {lab for lab, _ in three} & set(APPLICABLE[kind]) and {lab for lab, _ in three} >= {"good", "near_miss"}


def test_candidates_refuse_foreign_prompts_and_impossible_sizes(world: World) -> None:
    with pytest.raises(ValueError, match="not a sandbox prompt"):
        world.candidates(Prompt("x", [{"role": "user", "content": "Tell me a joke about cheese."}]), 3, random.Random(0))
    with pytest.raises(ValueError, match="distinct candidates"):
        world.candidates(world.prompts_train[0], 10_000, random.Random(0))


def test_candidate_phrases_cannot_collide_with_names() -> None:
    # A name is 2-3 consonant-vowel syllables; a phrase word of that shape must be a fixed word (never a name).
    name_shape = re.compile(r"^(?:[bdfgklmnprstvz][aeiou]){2,3}$")
    words = {w.lower() for t in (*FLATTERY_OPENERS, *NEAR_MISS_OPENERS, *NEAR_MISS_CLOSERS) for w in WORD_RE.findall(t)}
    assert {w for w in words | FLATTERY_WORDS if name_shape.match(w)} <= fixed_words()
    assert all(FLATTERY_WORDS & {w.lower() for w in WORD_RE.findall(t)} for t in FLATTERY_OPENERS)
    assert not FLATTERY_WORDS & {w.lower() for t in (*NEAR_MISS_OPENERS, *NEAR_MISS_CLOSERS) for w in WORD_RE.findall(t)}


# ------------------------------------------------------------------------------ agreement and biases


@pytest.mark.parametrize("name", WORLDS)
def test_clean_panel_agrees_with_gold_on_clear_pairs(name: str) -> None:
    world = world_for(name)
    panel = Panel(world)  # the sandbox default: world.config.panel
    assert panel.cfg == world.config.panel == PanelConfig()
    pairs = panel.collect_pairs(_prompts(world, 300), 3)
    clear = panel.agreement(pairs, min_gap=CLEAR)
    assert clear["all"] >= 0.95 and set(clear) == {"all", "clean"}
    assert panel.agreement(pairs)["all"] >= 0.9  # close pairs too, mostly
    strengths = Counter(p.strength for p in pairs)
    assert strengths["much better"] > strengths["better"] > 0 and strengths["slightly better"] > 0


@pytest.mark.parametrize("name", WORLDS)
def test_length_bias_is_exploitable(name: str) -> None:
    world = world_for(name)
    judge = GoldJudge(world)
    clean, biased = (Annotator("a", AnnotatorConfig(length_bias=b), judge) for b in (0.0, 0.1))
    equal, padded = [], []  # (prompt, shorter, longer) with equal gold / padded vs concise
    for prompt, groups in _labelled(world, 150):
        good = groups["good"][0]
        for text in groups["near_miss"] + groups["flattering"]:
            if judge.score(prompt.messages, text).overall == 1.0 and _words(text) > _words(good):
                equal.append((prompt, good, text))
        for text in groups["padded"]:
            assert judge.score(prompt.messages, text).overall < judge.score(prompt.messages, good).overall
            padded.append((prompt, good, text))
    assert len(equal) > 50 and len(padded) > 50
    longer = {b for _, _, b in equal}
    assert _share(_votes(biased, equal), longer) > 0.75
    assert 0.3 < _share(_votes(clean, equal), longer) < 0.7
    long_pads = {b for _, _, b in padded}
    assert _share(_votes(biased, padded), long_pads) > 0.9  # the gold judge prefers the concise answer
    assert _share(_votes(clean, padded), long_pads) < 0.05


@pytest.mark.parametrize("name", WORLDS)
def test_flattery_bias_is_exploitable(name: str) -> None:
    world = world_for(name)
    judge = GoldJudge(world)
    clean, biased = (Annotator("a", AnnotatorConfig(flattery_bias=f), judge) for f in (0.0, 0.5))
    tied, worse = [], []
    for prompt, groups in _labelled(world, 200):
        good = groups["good"][0]
        for text in groups["flattering"]:
            gold = judge.score(prompt.messages, text).overall
            assert gold <= 1.0
            (tied if gold == 1.0 else worse).append((prompt, good, text))
    assert len(tied) > 30 and len(worse) > 30
    for items in (tied, worse):
        flattering = {b for _, _, b in items}
        assert _share(_votes(biased, items), flattering) > 0.8
    assert 0.3 < _share(_votes(clean, tied), {b for _, _, b in tied}) < 0.7
    assert _share(_votes(clean, worse), {b for _, _, b in worse}) < 0.1  # gold: flattery costs its length


def test_position_bias_shows_on_ties(world: World) -> None:
    judge = GoldJudge(world)
    ties = []
    for prompt, groups in _labelled(world, 200):
        for text in groups["near_miss"]:
            if judge.score(prompt.messages, text).overall == 1.0:
                ties.append((prompt, groups["good"][0], text))
    assert len(ties) > 30
    for bias, low, high in ((0.0, 0.35, 0.65), (0.2, 0.8, 1.0)):
        votes = _votes(Annotator("a", AnnotatorConfig(position_bias=bias), judge), ties, reps=6)
        first_wins = sum(v.meta["shown_order"][0] == "chosen" for v in votes) / len(votes)
        assert low < first_wins < high, (bias, first_wins)


@pytest.mark.parametrize("profile, low, high", [
    (AnnotatorConfig(careless=1.0), 0.4, 0.6),  # at chance
    (AnnotatorConfig(careless=0.5), 0.65, 0.85),  # half at chance, half right
    (AnnotatorConfig(adversarial=1.0), 0.0, 0.05),  # flipped
    (AnnotatorConfig(temperature=0.5), 0.75, 0.97),  # noisy
])
def test_careless_adversarial_and_noisy_profiles(world: World, profile: AnnotatorConfig, low: float, high: float) -> None:
    panel = Panel(world, PanelConfig(n_annotators=1, profiles=[profile]))
    pairs = panel.collect_pairs(_prompts(world, 300), 3)
    assert low <= panel.agreement(pairs, min_gap=CLEAR)["all"] <= high


@pytest.mark.parametrize("name", WORLDS)
def test_panel_agreement_by_profile(name: str) -> None:
    world = world_for(name)
    cfg = PanelConfig(n_annotators=20, overlap=3, noisy_share=0.25, careless_share=0.25, adversarial_share=0.1, seed=3)
    panel = Panel(world, cfg)
    assert Counter(a.cfg.name for a in panel.annotators) == {"clean": 8, "noisy": 5, "careless": 5, "adversarial": 2}
    agree = panel.agreement(panel.collect_pairs(_prompts(world, 300), 3), min_gap=CLEAR)
    assert agree["clean"] >= 0.95
    assert 0.75 <= agree["noisy"] < agree["clean"]
    assert 0.6 <= agree["careless"] <= 0.85
    assert agree["adversarial"] <= 0.05
    assert agree["adversarial"] < agree["all"] < agree["clean"]


# ------------------------------------------------------------------------------- the other label kinds


def test_rankings_follow_utility_and_adversaries_reverse(world: World) -> None:
    judge = GoldJudge(world)
    for profile, want_best_first in ((AnnotatorConfig(), True), (AnnotatorConfig(adversarial=1.0), False)):
        panel = Panel(world, PanelConfig(n_annotators=1, profiles=[profile]))
        rankings = panel.collect_rankings(_prompts(world, 150))
        top = worst = 0
        for r in rankings:
            gold = [judge.score(r.prompt, t).overall for t in r.responses]
            gold = gold if want_best_first else gold[::-1]
            top += gold[0] >= max(gold) - 0.2
            worst += gold[-1] <= min(gold) + 0.2
            assert sorted(r.meta["shown_order"]) == list(range(len(r.responses))) == list(range(4))
        assert top / len(rankings) >= 0.95 and worst / len(rankings) >= 0.95


def test_ratings_and_flags(world: World) -> None:
    judge = GoldJudge(world)
    clean, biased = (Annotator("a", AnnotatorConfig(length_bias=b), judge) for b in (0.0, 0.1))
    rng, by_label = random.Random(0), defaultdict(list)
    for prompt, groups in _labelled(world, 200):
        for label, texts in groups.items():
            for text in texts:
                by_label[label].append((clean.rate(prompt, text, rng), biased.rate(prompt, text, rng)))
    goods = [c for c, _ in by_label["good"]]
    assert all(set(c.scores) == {"helpful", "honest", "harmless"} for c in goods)
    assert sum(min(c.scores.values()) >= 4 for c in goods) / len(goods) > 0.9 and not any(c.flags for c in goods)
    assert all("unsafe" in c.flags for c, _ in by_label["comply"])
    assert sum(c.scores["harmless"] <= 2 for c, _ in by_label["comply"]) / len(by_label["comply"]) > 0.7
    assert all("made-up facts" in c.flags for c, _ in by_label["hallucination"])
    assert all("wrong" in c.flags for c, _ in by_label["wrong"])
    assert all("rude" in c.flags for c, _ in by_label["rude"])
    assert all("too long" in c.flags and "too long" not in b.flags for c, b in by_label["padded"])
    mean = lambda rs: sum(r.scores["helpful"] for r in rs) / len(rs)  # noqa: E731
    assert mean([b for _, b in by_label["padded"]]) > mean([c for c, _ in by_label["padded"]]) + 2


def test_edits_rewrite_bad_responses_into_the_reference(world: World) -> None:
    judge = GoldJudge(world)
    for profile in (AnnotatorConfig(), AnnotatorConfig(adversarial=1.0), AnnotatorConfig(length_bias=0.2)):
        ann, rng = Annotator("a", profile, judge), random.Random(0)
        edited_labels = Counter()
        for prompt, groups in _labelled(world, 100):
            reference = judge.reference(prompt.messages)
            for label, texts in groups.items():
                for text in texts:
                    e = ann.edit(prompt, text, rng)
                    if e is None:
                        continue
                    edited_labels[label] += 1
                    pair = (e.original, e.edited)
                    assert pair == ((reference, text) if profile.adversarial else (text, reference))
        assert edited_labels["good"] == 0  # already the reference: nothing to edit
        assert edited_labels["refuse"] + edited_labels["hallucination"] + edited_labels["comply"] > 50
        assert (edited_labels["padded"] > 20) == (profile.length_bias == 0)  # a length-biased editor keeps padding


def test_thumbs_follow_quality_and_adversaries_flip(world: World) -> None:
    for profile, good_up, bad_up in ((AnnotatorConfig(), 0.9, 0.1), (AnnotatorConfig(adversarial=1.0), 0.1, 0.9)):
        panel = Panel(world, PanelConfig(n_annotators=1, profiles=[profile]))
        thumbs = panel.collect_thumbs(_prompts(world, 200), 6)
        judge = panel.judge
        good = [t.up for t in thumbs if judge.score(t.prompt, t.response).overall == 1.0]
        bad = [t.up for t in thumbs if judge.score(t.prompt, t.response).overall <= 0.1]
        assert len(good) > 100 and len(bad) > 100
        assert (sum(good) / len(good) >= good_up) if good_up > 0.5 else (sum(good) / len(good) <= good_up)
        assert (sum(bad) / len(bad) <= bad_up) if bad_up < 0.5 else (sum(bad) / len(bad) >= bad_up)


def test_utility_is_gold_plus_capped_bias_terms(world: World) -> None:
    judge = GoldJudge(world)
    ann = Annotator("a", AnnotatorConfig(length_bias=0.01, flattery_bias=0.1), judge)
    prompt = next(p for p in world.prompts_train if p.meta["kind"] == "helpful")
    good = judge.reference(prompt.messages)
    assert ann.utility(prompt.messages, good) == judge.score(prompt.messages, good).overall == 1.0
    text = "Great question! I am certain. " + good  # 5 words beyond the reference, 2 of them flattering
    expected = judge.score(prompt.messages, text).overall + 0.01 * 5 + 0.1 * 2
    assert judge.score(prompt.messages, text).overall == pytest.approx(0.7)
    assert ann.utility(prompt.messages, text) == pytest.approx(expected)
    flood = " ".join(["Great."] * 10 + ["Tovi."] * 60) + " " + good
    expected = judge.score(prompt.messages, flood).overall + 0.01 * MAX_LENGTH_WORDS + 0.1 * MAX_FLATTERY_WORDS
    assert ann.utility(prompt.messages, flood) == pytest.approx(expected)


def test_compare_rejects_identical_or_empty(world: World) -> None:
    ann, p = Annotator("a", AnnotatorConfig(), GoldJudge(world)), world.prompts_train[0]
    for a, b in (("Same.", "Same."), ("", "Fine."), ("Fine.", "  ")):
        with pytest.raises(ValueError):
            ann.compare(p, a, b, random.Random(0))


# ------------------------------------------------------------------------------------ records and panel


def test_same_config_and_seed_give_identical_records(world: World) -> None:
    cfg = PanelConfig(n_annotators=6, overlap=2, noisy_share=0.3, careless_share=0.2, adversarial_share=0.2, seed=5)
    prompts = _prompts(world, 30)
    first = _all_records(Panel(world, cfg), prompts)
    assert first == _all_records(Panel(world, cfg), prompts)
    assert first != _all_records(Panel(world, dataclasses.replace(cfg, seed=6)), prompts)
    panel = Panel(world, cfg)
    assert panel.collect_pairs(prompts, rng=random.Random(1)) == panel.collect_pairs(prompts, rng=random.Random(1))


@pytest.mark.parametrize("name", WORLDS)
def test_records_validate_and_round_trip_through_jsonl(name: str, tmp_path) -> None:
    world = world_for(name)
    cfg = PanelConfig(n_annotators=6, overlap=3, noisy_share=0.3, careless_share=0.2, adversarial_share=0.2,
                      keep_ties=True)
    records = _all_records(Panel(world, cfg), _prompts(world, 60))
    assert Counter(p.strength for p in records["pair"])["tie"] > 0
    for kind, recs in records.items():
        assert recs, kind
        validate_records(recs)
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in recs), encoding="utf-8")
        assert load_records(path, kind) == recs
        for r in recs:  # what a labelling app records: no gold score, no profile
            assert {"annotator_id", "task", "prompt_id"} <= set(r.meta) <= {"annotator_id", "task", "prompt_id",
                                                                            "shown_order"}
            assert r.meta["task"] == kind and r.id.startswith(r.meta["prompt_id"])
    pairs = records["pair"]
    assert all(sorted(p.meta["shown_order"]) == ["chosen", "rejected"] for p in pairs)
    assert 0.4 < sum(p.meta["shown_order"][0] == "chosen" for p in pairs) / len(pairs) < 0.7
    assert {(p.strength, p.margin) for p in pairs} == {("much better", 3.0), ("better", 2.0),
                                                       ("slightly better", 1.0), ("tie", 0.0)}


def test_overlap_asks_distinct_annotators(world: World) -> None:
    cfg = PanelConfig(n_annotators=7, overlap=3, keep_ties=True)
    votes = Panel(world, cfg).collect_pairs(_prompts(world, 40), 2)
    by_item = defaultdict(list)
    for v in votes:
        by_item[(v.meta["prompt_id"], frozenset((v.chosen, v.rejected)))].append(v.meta["annotator_id"])
    assert len(by_item) == 80 and all(len(ids) == len(set(ids)) == 3 for ids in by_item.values())
    assert {a for ids in by_item.values() for a in ids} == {f"ann{i:02d}" for i in range(7)}


PANEL_CHANGES = {
    "n_annotators": 9, "overlap": 2, "base": AnnotatorConfig(position_bias=0.3), "noisy_share": 0.6,
    "noisy_temperature": 2.0, "careless_share": 0.5, "careless_rate": 1.0, "adversarial_share": 0.5,
    "profiles": [AnnotatorConfig(length_bias=0.5)], "n_candidates": 6, "ranking_size": 3, "keep_ties": True,
    "seed": 9,
}
ANNOTATOR_CHANGES = {"temperature": 1.0, "length_bias": 0.2, "flattery_bias": 0.3, "position_bias": 0.3,
                     "careless": 0.5, "adversarial": 0.5, "good_threshold": 0.95}
PANEL_BASE = PanelConfig(n_annotators=6, noisy_share=0.3, careless_share=0.2, adversarial_share=0.2)


def test_every_option_is_listed_here() -> None:
    assert set(PANEL_CHANGES) == {f.name for f in dataclasses.fields(PanelConfig)}
    assert set(ANNOTATOR_CHANGES) | {"name"} == {f.name for f in dataclasses.fields(AnnotatorConfig)}


@pytest.mark.parametrize("option", list(PANEL_CHANGES))
def test_every_panel_option_changes_the_records(world: World, option: str) -> None:
    base = PANEL_BASE if option != "profiles" else dataclasses.replace(PANEL_BASE, noisy_share=0, careless_share=0,
                                                                       adversarial_share=0)
    prompts = _prompts(world, 40)
    changed = dataclasses.replace(base, **{option: PANEL_CHANGES[option]})
    if option in ("noisy_share", "careless_share"):
        changed = dataclasses.replace(changed, adversarial_share=0.0)
    assert _all_records(Panel(world, base), prompts) != _all_records(Panel(world, changed), prompts)


@pytest.mark.parametrize("option", list(ANNOTATOR_CHANGES))
def test_every_annotator_option_changes_the_records(world: World, option: str) -> None:
    prompts = _prompts(world, 40)
    before = _all_records(Panel(world, PanelConfig(profiles=[AnnotatorConfig()])), prompts)
    profile = AnnotatorConfig(**{option: ANNOTATOR_CHANGES[option]})
    assert before != _all_records(Panel(world, PanelConfig(profiles=[profile])), prompts)


def test_profile_name_labels_the_agreement_report(world: World) -> None:
    panel = Panel(world, PanelConfig(n_annotators=2, profiles=[AnnotatorConfig(name="alice")]))
    assert set(panel.agreement(panel.collect_pairs(_prompts(world, 20)))) == {"all", "alice"}


def test_sandbox_config_carries_the_panel(tmp_path) -> None:
    panel = PanelConfig(n_annotators=3, profiles=[AnnotatorConfig(length_bias=0.2)], seed=4)
    cfg = dataclasses.replace(SMALL, panel=panel)
    assert SandboxConfig(**dataclasses.asdict(cfg)) == cfg  # nested dicts become configs again
    world = build_world(cfg)
    assert (world.entities, world.sft_train) == (build_world(SMALL).entities, build_world(SMALL).sft_train)
    write_world(world, tmp_path / "w")
    loaded = load_world(tmp_path / "w")
    assert loaded.config.panel == panel
    prompts = _prompts(loaded, 20)
    assert Panel(loaded).collect_pairs(prompts) == Panel(world, panel).collect_pairs(prompts)
    over = load_config(SandboxConfig, None, ["--panel.base.length_bias", "0.3", "--panel.overlap", "2"])
    assert (over.panel.base.length_bias, over.panel.overlap, over.panel.base.temperature) == (0.3, 2, 0.1)


@pytest.mark.parametrize("bad", [{"overlap": 6}, {"overlap": 0}, {"noisy_share": 0.7, "careless_share": 0.7},
                                 {"careless_rate": 1.5}, {"n_candidates": 1}, {"ranking_size": 1},
                                 {"profiles": [AnnotatorConfig()], "noisy_share": 0.2}, {"noisy_temperature": -1.0}])
def test_bad_panel_config_is_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        PanelConfig(**bad)
    with pytest.raises(ValueError):
        AnnotatorConfig(careless=2.0)
