"""The sandbox world: determinism, sizes, held-out split, fact coverage, options and files."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

import pytest
from sandbox_worlds import CONFIGS, SMALL, world_for

from alignloop.data import Prompt, SFTExample
from alignloop.sandbox import GoldJudge, SandboxConfig, World, build_world, load_world, write_world
from alignloop.sandbox.world import ATTRS, BAD_KINDS, FACT_ANSWERS, KINDS, MISSING_ATTR, NOUNS


def _join(*splits: list[SFTExample] | list[Prompt]) -> list[SFTExample | Prompt]:
    return [r for split in splits for r in split]


def _records(w: World) -> list[tuple]:
    recs = _join(w.sft_train, w.sft_eval, w.prompts_train, w.prompts_eval)
    return [(r.id, json.dumps(r.messages), json.dumps(r.meta, sort_keys=True)) for r in recs]


def _prefixes(messages: list[dict]) -> set[str]:
    """Every conversation prefix that ends with a user turn: what a model sees as a prompt."""
    return {json.dumps(messages[: i + 1]) for i, m in enumerate(messages) if m["role"] == "user"}


def test_same_config_same_world() -> None:
    a, b = build_world(SMALL), build_world(SMALL)
    assert a.entities == b.entities and a.templates == b.templates and a.values == b.values
    assert _records(a) == _records(b)
    assert a.tokenizer_corpus() == b.tokenizer_corpus()


def test_different_seed_different_facts_and_names() -> None:
    a, b = build_world(SMALL), build_world(dataclasses.replace(SMALL, seed=1))
    assert set(a.entities) != set(b.entities)
    assert list(a.entities.values()) != list(b.entities.values())
    assert a.values["city"] != b.values["city"]
    assert _records(a) != _records(b)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sizes_kinds_and_bad_share(name: str) -> None:
    w, cfg = world_for(name), CONFIGS[name]
    assert len(w.sft_train) == cfg.n_sft_train and len(w.prompts_train) == cfg.n_train_prompts
    assert len(w.prompts_eval) == cfg.n_eval_prompts == len(w.sft_eval)
    for demos in (w.sft_train, w.sft_eval):
        n_bad = sum(not d.meta["good"] for d in demos)
        assert n_bad == round(cfg.bad_demo_share * len(demos))
        assert all((d.meta["bad_kind"] is None) == d.meta["good"] for d in demos)
    for split in (w.sft_train, w.sft_eval, w.prompts_train, w.prompts_eval):
        assert {r.meta["kind"] for r in split} == set(KINDS)
        multi = [r for r in split if r.meta["turns"] == 2]
        assert multi and {r.meta["kind"] for r in multi} == set(KINDS)  # follow-ups everywhere
        assert len({r.id for r in split}) == len(split)


def test_kind_shares_follow_config(world: World) -> None:
    counts = Counter(p.meta["kind"] for p in world.prompts_train)
    assert 0.44 < counts["helpful"] / len(world.prompts_train) < 0.56
    assert 0.2 < counts["honest"] / len(world.prompts_train) < 0.3
    w = build_world(dataclasses.replace(SMALL, helpful_share=0.0, honest_share=1.0, harmless_share=0.0))
    assert {p.meta["kind"] for p in w.prompts_train} == {"honest"}


def test_every_bad_kind_occurs_and_fits_its_prompt_kind(world: World) -> None:
    kinds = Counter((d.meta["kind"], d.meta["bad_kind"]) for d in world.sft_train if not d.meta["good"])
    assert {b for _, b in kinds} == set(BAD_KINDS)
    assert all(b not in ("comply",) for k, b in kinds if k != "harmless")
    assert all(b not in ("wrong", "false_admission") for k, b in kinds if k != "helpful")
    assert all(b != "hallucination" for k, b in kinds if k != "honest")


def test_zero_weight_removes_a_bad_kind() -> None:
    w = build_world(dataclasses.replace(SMALL, bad_weight_rude=0.0, bad_weight_ramble=0.0, bad_demo_share=0.5))
    kinds = {d.meta["bad_kind"] for d in w.sft_train}
    assert "rude" not in kinds and "ramble" not in kinds and "comply" in kinds


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_prompts_are_held_out(name: str) -> None:
    w = world_for(name)
    seen = set().union(*(_prefixes(r.messages) for r in _join(w.sft_train, w.prompts_train)))
    for r in _join(w.prompts_eval, w.sft_eval):
        assert _prefixes(r.messages).isdisjoint(seen), r.messages
    assert len({json.dumps(p.messages) for p in w.prompts_eval}) == len(w.prompts_eval)
    train_words = {t for r in _join(w.sft_train, w.prompts_train) for m in r.messages
                   for t in re.findall(r"[A-Za-z]+", m["content"])}
    assert train_words.isdisjoint(w.unknown_eval)  # honesty is tested on names never seen in training
    assert any(n in train_words for n in w.unknown_train)
    assert set(w.unknown_eval).isdisjoint(w.entities)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_fact_is_taught_in_several_phrasings(name: str) -> None:
    w, cfg = world_for(name), CONFIGS[name]
    phrasings: dict[str, set[str]] = {}
    for d in w.sft_train:
        if d.meta["good"]:
            phrasings.setdefault(d.messages[-1]["content"], set()).add(d.messages[-2]["content"])
    for e, facts in w.entities.items():
        for attr in ATTRS:
            v = facts[attr]
            answer = FACT_ANSWERS[attr].format(e=e, v=v) if v else MISSING_ATTR.format(e=e, noun=NOUNS[attr])
            assert len(phrasings.get(answer, ())) >= cfg.n_templates - 1, answer


def test_missing_facts_exist_and_can_be_switched_off() -> None:
    w = world_for("seed0")
    assert any(v is None for f in w.entities.values() for v in f.values())
    w0 = build_world(dataclasses.replace(SMALL, missing_share=0.0))
    assert all(v is not None for f in w0.entities.values() for v in f.values())


def test_multi_turn_share() -> None:
    w = build_world(dataclasses.replace(SMALL, multi_turn_share=0.0))
    assert all(p.meta["turns"] == 1 for p in [*w.prompts_train, *w.prompts_eval])
    w = build_world(dataclasses.replace(SMALL, multi_turn_share=1.0))
    assert all(p.meta["turns"] == 2 for p in [*w.prompts_train, *w.prompts_eval])


def test_texts_are_short(world: World) -> None:
    longest = max(sum(len(m["content"].split()) for m in d.messages) for d in world.sft_train)
    assert longest <= 75


OPTION_CHANGES = {
    "seed": 5, "n_known": 14, "n_unknown": 14, "n_cities": 3, "n_colours": 3, "n_jobs": 3, "n_pets": 3,
    "min_age": 30, "max_age": 40, "missing_share": 0.4, "max_operand": 3, "n_templates": 3,
    "n_sft_train": 900, "n_train_prompts": 90, "n_eval_prompts": 50, "helpful_share": 0.1,
    "honest_share": 0.6, "harmless_share": 0.9, "sum_share": 0.5, "compare_share": 0.5,
    "unknown_entity_share": 1.0, "multi_turn_share": 0.6, "bad_demo_share": 0.1,
    **{f"bad_weight_{k}": 5.0 for k in BAD_KINDS},
}


def test_every_option_is_listed_here() -> None:
    # `panel` changes the labels, not the world: tests/sandbox/test_annotators.py covers its options.
    assert set(OPTION_CHANGES) | {"panel"} == {f.name for f in dataclasses.fields(SandboxConfig)}


@pytest.mark.parametrize("option", list(OPTION_CHANGES))
def test_every_option_changes_the_world(option: str) -> None:
    base = build_world(SMALL)
    changed = build_world(SandboxConfig(**{**dataclasses.asdict(SMALL), option: OPTION_CHANGES[option]}))
    assert (base.entities, _records(base)) != (changed.entities, _records(changed))


@pytest.mark.parametrize("bad", [{"bad_demo_share": 1.5}, {"n_templates": 2}, {"helpful_share": -1.0},
                                 {"n_colours": 50}, {"min_age": 50, "max_age": 40}, {"n_sft_train": 0}])
def test_bad_config_is_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        SandboxConfig(**bad)


def test_too_few_demonstrations_to_cover_the_facts() -> None:
    with pytest.raises(ValueError, match="cover every fact"):
        build_world(dataclasses.replace(SMALL, n_sft_train=50))


def test_tokenizer_corpus_has_every_name_and_text(world: World) -> None:
    corpus = world.tokenizer_corpus()
    assert len(corpus) == len(set(corpus))
    text = "\n".join(corpus)
    for name in [*world.entities, *world.unknown_train, *world.unknown_eval, *world.values["city"]]:
        assert name in text
    assert world.sft_train[0].messages[-1]["content"] in corpus


def test_write_and_load_round_trip(tmp_path) -> None:
    w = build_world(SMALL)
    paths = write_world(w, tmp_path / "world")
    assert set(paths) == {"sft_train", "sft_eval", "prompts_train", "prompts_eval", "world"}
    assert sorted(p.name for p in (tmp_path / "world").iterdir()) == sorted(p.name for p in paths.values())
    first = json.loads(paths["sft_train"].read_text().splitlines()[0])
    assert set(first) == {"id", "messages", "meta"}
    loaded = load_world(tmp_path / "world")
    assert loaded.config == w.config and loaded.entities == w.entities and loaded.templates == w.templates
    assert _records(loaded) == _records(w)
    j1, j2 = GoldJudge(w), GoldJudge(loaded)
    for d in [*w.sft_eval, *w.sft_train[:200]]:
        for response in (d.messages[-1]["content"], "Sorry, I can't help with that.", "Baram."):
            assert j1.score(d.messages[:-1], response) == j2.score(d.messages[:-1], response)
    write_world(w, tmp_path / "world")  # overwriting in place works and leaves no temporary files
    assert len(list((tmp_path / "world").iterdir())) == 5
