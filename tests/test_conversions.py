"""Conversions between feedback kinds: rankings, ratings, edits and votes to pairs and thumbs (D4 properties)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignloop.data import DataError, Edit, PreferencePair, Ranking, Rating, validate_records
from alignloop.preferences import (
    STRENGTH_MARGINS,
    ConversionReport,
    Vote,
    edit_to_pair,
    majority_vote,
    pairs_from_votes,
    ranking_to_pairs,
    ratings_to_pairs,
    strength_to_margin,
    votes_to_thumbs,
)

PROMPT = [{"role": "user", "content": "Name a colour."}]


def rating(rid: str, response: str, prompt: list[dict[str, str]] | None = None, **scores: float) -> Rating:
    return Rating(rid, prompt or PROMPT, response, dict(scores))


def vote(vid: str, choice: str, strength: str | None = None, **meta: Any) -> Vote:
    return Vote(vid, PROMPT, "red", "blue", choice, strength, meta)


# ---------------------------------------------------------------------------------------------------------
# Rankings.


def test_ranking_gives_every_ordered_pair_with_group_and_ranks() -> None:
    r = Ranking("r1", PROMPT, ["red", "blue", "green"], meta={"source": "x"})
    pairs = ranking_to_pairs(r)
    assert [(p.id, p.chosen, p.rejected) for p in pairs] == [
        ("r1:0>1", "red", "blue"), ("r1:0>2", "red", "green"), ("r1:1>2", "blue", "green")]
    assert all(p.meta == {"source": "x", "group": "r1", "ranks": list(k)} for p, k in
               zip(pairs, [(0, 1), (0, 2), (1, 2)], strict=True))
    assert all(p.margin is None and p.prompt == PROMPT and p.prompt is not r.prompt for p in pairs)


def test_bad_ranking_raises_with_its_id() -> None:
    with pytest.raises(DataError) as info:
        ranking_to_pairs(Ranking("r1", PROMPT, ["red", "red"]))
    assert (info.value.code, info.value.record_id, info.value.field) == ("D109", "r1", "responses[1]")
    with pytest.raises(TypeError):
        ranking_to_pairs(Rating("x", PROMPT, "red", {"overall": 1}))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Ratings.


def test_ratings_pair_by_score_difference_and_count_ties() -> None:
    ratings = [rating("a", "red", overall=5), rating("b", "blue", overall=3), rating("c", "green", overall=5)]
    pairs, report = ratings_to_pairs(ratings)
    assert [(p.id, p.chosen, p.rejected, p.margin) for p in pairs] == [("a>b", "red", "blue", 2.0),
                                                                       ("c>b", "green", "blue", 2.0)]
    assert report == ConversionReport(kept=2, dropped_ties=1) and report.dropped == 1
    assert pairs[0].meta == {"group": "a", "axis": "overall", "chosen_id": "a", "rejected_id": "b"}


def test_ratings_group_by_prompt_and_annotator() -> None:
    other = [{"role": "user", "content": "Name a fruit."}]
    ratings = [
        rating("a", "red", overall=5), rating("b", "apple", other, overall=1),  # different prompts: no pair
        Rating("c", PROMPT, "blue", {"overall": 1}, meta={"annotator_id": "ann1"}),  # not with a (no id)
        Rating("d", PROMPT, "green", {"overall": 4}, meta={"annotator_id": "ann1"}),
        Rating("e", PROMPT, "pink", {"overall": 2}, meta={"annotator_id": 1}),  # int 1 is not "ann1"
    ]
    pairs, report = ratings_to_pairs(ratings)
    assert [(p.id, p.meta["group"], p.meta["annotator_id"]) for p in pairs] == [("d>c", "c", "ann1")]
    assert report == ConversionReport(kept=1)
    with pytest.raises(DataError) as info:
        ratings_to_pairs([Rating("x", PROMPT, "red", {"overall": 1}, meta={"annotator_id": ["a"]})])
    assert (info.value.code, info.value.field) == ("D103", "meta.annotator_id")


def test_ratings_axis_mean_and_min_gap() -> None:
    ratings = [rating("a", "red", helpful=5, honest=3), rating("b", "blue", helpful=4, honest=3.5),
               rating("c", "green", helpful=1, honest=1)]
    pairs, report = ratings_to_pairs(ratings, axis="honest")
    assert [(p.id, p.margin) for p in pairs] == [("b>a", 0.5), ("a>c", 2.0), ("b>c", 2.5)]
    pairs, report = ratings_to_pairs(ratings, axis="mean", min_gap=1.0)
    assert [(p.id, p.margin) for p in pairs] == [("a>c", 3.0), ("b>c", 2.75)]
    assert report == ConversionReport(kept=2, dropped_small_gap=1)  # a: 4.0, b: 3.75


def test_ratings_errors_and_identical_responses() -> None:
    with pytest.raises(DataError) as info:
        ratings_to_pairs([rating("a", "red", helpful=1), rating("b", "blue", overall=2)])
    assert (info.value.code, info.value.field, info.value.record_id) == ("D102", "scores.overall", "a")
    with pytest.raises(DataError, match="same axes"):
        ratings_to_pairs([rating("a", "red", helpful=1), rating("b", "blue", honest=2)], axis="mean")
    with pytest.raises(DataError, match="ambiguous"):
        ratings_to_pairs([rating("a", "red", mean=1)], axis="mean")
    with pytest.raises(DataError) as info:
        ratings_to_pairs([rating("a", "red", overall=math.inf)])
    assert info.value.code == "D109"
    with pytest.raises(ValueError, match="min_gap"):
        ratings_to_pairs([], min_gap=-1)
    pairs, report = ratings_to_pairs([rating("a", "red", overall=1), rating("b", "red", overall=2)])
    assert pairs == [] and report == ConversionReport(kept=0, dropped_identical=1)


def test_derived_id_collision_is_refused() -> None:
    ratings = [rating("a>b", "red", overall=3), rating("c", "blue", overall=1),
               rating("a", "red", PROMPT + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
                      overall=3),
               rating("b>c", "blue", PROMPT + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
                      overall=1)]
    with pytest.raises(DataError) as info:
        ratings_to_pairs(ratings)
    assert (info.value.code, info.value.record_id) == ("D107", "a>b>c")


# ---------------------------------------------------------------------------------------------------------
# Edits, strengths, votes.


def test_edit_is_preferred_over_the_original() -> None:
    pair = edit_to_pair(Edit("e1", PROMPT, "Red!", "Red.", meta={"by": "ann"}))
    assert pair == PreferencePair("e1", PROMPT, "Red.", "Red!", meta={"by": "ann"})
    with pytest.raises(DataError) as info:
        edit_to_pair(Edit("e2", PROMPT, "Red.", "Red."))
    assert (info.value.code, info.value.field, info.value.record_id) == ("D109", "edited", "e2")


def test_strength_scale() -> None:
    assert [strength_to_margin(s) for s in ("much better", "better", "slightly better", "tie")] == [3, 2, 1, 0]
    assert strength_to_margin("  Much   BETTER ") == 3 and strength_to_margin("significantly better") == 3
    assert strength_to_margin("negligibly better") == 0 and set(STRENGTH_MARGINS.values()) == {0, 1, 2, 3}
    for bad in ("a lot better", "", 3):
        with pytest.raises(DataError) as info:
            strength_to_margin(bad)  # type: ignore[arg-type]
        assert (info.value.code, info.value.field) == ("D109", "strength")


def test_votes_to_pairs_drop_ties_and_both_bad_with_counts() -> None:
    votes = [vote("v1", "a", "much better", annotator_id="x"), vote("v2", "b"), vote("v3", "tie", "tie"),
             vote("v4", "both_bad"), vote("v5", "b", "slightly better")]
    pairs, report = pairs_from_votes(votes)
    assert [(p.id, p.chosen, p.rejected, p.margin, p.strength) for p in pairs] == [
        ("v1", "red", "blue", 3.0, "much better"), ("v2", "blue", "red", None, None),
        ("v5", "blue", "red", 1.0, "slightly better")]
    assert pairs[0].meta == {"annotator_id": "x"}
    assert report == ConversionReport(kept=3, dropped_ties=1, dropped_both_bad=1)


def test_votes_to_thumbs_keep_ties_and_both_bad() -> None:
    thumbs = votes_to_thumbs([vote("v1", "a"), vote("v2", "b"), vote("v3", "tie"), vote("v4", "both_bad")])
    assert [(t.id, t.response, t.up) for t in thumbs] == [
        ("v1:a", "red", True), ("v1:b", "blue", False), ("v2:a", "red", False), ("v2:b", "blue", True),
        ("v3:a", "red", True), ("v3:b", "blue", True), ("v4:a", "red", False), ("v4:b", "blue", False)]
    assert thumbs[5].meta == {"vote_id": "v3", "choice": "tie"}
    validate_records(thumbs)


@pytest.mark.parametrize(("bad", "field"), [
    (Vote("v", PROMPT, "red", "red", "a"), "response_b"),
    (Vote("v", PROMPT, "red", "blue", "A"), "choice"),
    (Vote("v", PROMPT, "red", "blue", "a", "tie"), "strength"),
    (Vote("v", PROMPT, "red", "blue", "tie", "better"), "strength"),
    (Vote("v", PROMPT, "red", "blue", "both_bad", "much better"), "strength"),
    (Vote("v", PROMPT, "red", "blue", "a", "hugely better"), "strength"),
    (Vote("v", PROMPT, "", "blue", "a"), "response_a"),
    (Vote("v", [{"role": "assistant", "content": "hi"}], "red", "blue", "a"), "prompt[0].role"),
])
def test_bad_votes_raise_with_field_and_id(bad: Vote, field: str) -> None:
    for convert in (pairs_from_votes, votes_to_thumbs):
        with pytest.raises(DataError) as info:
            convert([bad])
        assert (info.value.field, info.value.record_id) == (field, "v")


def test_majority_vote() -> None:
    assert majority_vote([1, 1, 2]) == 1 and majority_vote(["x"]) == "x"
    assert majority_vote([0, 1, 2]) is None and majority_vote([]) is None and majority_vote([None, None]) is None
    assert majority_vote([1, None, None, 2, 2]) == 2
    assert majority_vote([1, 1, 2, 3]) == 1 and majority_vote([1, 1, 2, 3], strict=True) is None
    assert majority_vote([1, 1, 1, 2, 3], strict=True) == 1 and majority_vote([1, 1, 2, 2], strict=True) is None


# ---------------------------------------------------------------------------------------------------------
# D4 properties (>= 1000 cases each).

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=8).filter(str.strip)
IDS = st.text("abc:>-_0123", min_size=1, max_size=4).filter(str.strip)


@settings(max_examples=1000, deadline=None)
@given(rid=IDS, responses=st.lists(TEXT, min_size=2, max_size=8, unique=True))
def test_D4_ranking_gives_k_choose_2_pairs_consistent_with_the_order(rid: str, responses: list[str]) -> None:
    pairs = ranking_to_pairs(Ranking(rid, PROMPT, responses))
    k = len(responses)
    assert len(pairs) == k * (k - 1) // 2
    rank = {text: i for i, text in enumerate(responses)}
    assert all(rank[p.chosen] < rank[p.rejected] and p.chosen != p.rejected for p in pairs)
    assert {(p.chosen, p.rejected) for p in pairs} == set(itertools.combinations(responses, 2))
    assert all(p.meta["group"] == rid for p in pairs)
    validate_records(pairs)
    assert [p.id for p in ranking_to_pairs(Ranking(rid, PROMPT, responses))] == [p.id for p in pairs]


SCORE = st.one_of(st.integers(1, 5), st.floats(-1e6, 1e6, allow_nan=False))


@settings(max_examples=1000, deadline=None)
@given(
    rows=st.lists(st.tuples(st.sampled_from(["p", "q"]), st.sampled_from([None, "x", "y"]), TEXT, SCORE), max_size=10),
    min_gap=st.sampled_from([0, 0.5, 2]),
)
def test_D4_ratings_never_pair_equal_scores_and_margins_are_positive(
    rows: list[tuple[str, str | None, str, float]], min_gap: float
) -> None:
    ratings = [Rating(f"r{i}", [{"role": "user", "content": p}], text, {"overall": s},
                      meta={} if ann is None else {"annotator_id": ann}) for i, (p, ann, text, s) in enumerate(rows)]
    pairs, report = ratings_to_pairs(ratings, min_gap=min_gap)
    by_id = {r.id: r for r in ratings}
    for p in pairs:
        hi, lo = by_id[p.meta["chosen_id"]], by_id[p.meta["rejected_id"]]
        assert hi.scores["overall"] != lo.scores["overall"]
        assert p.margin == hi.scores["overall"] - lo.scores["overall"] and p.margin > 0 and p.margin >= min_gap
        assert (hi.prompt, hi.meta.get("annotator_id")) == (lo.prompt, lo.meta.get("annotator_id"))
        assert (p.chosen, p.rejected) == (hi.response, lo.response)
    groups: dict[tuple[str, str | None], int] = {}
    for p_, ann, *_ in rows:
        groups[(p_, ann)] = groups.get((p_, ann), 0) + 1
    assert report.kept == len(pairs) and report.kept + report.dropped == sum(n * (n - 1) // 2 for n in groups.values())
    validate_records(pairs)


@settings(max_examples=1000, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(["a", "b", "tie", "both_bad"]), st.booleans(),
                               st.sampled_from(["much better", "better", "slightly better"])), max_size=12))
def test_D4_votes_to_pairs_and_thumbs_account_for_every_vote(rows: list[tuple[str, bool, str]]) -> None:
    votes = [Vote(f"v{i}", PROMPT, "red", "blue", choice,
                  (strength if choice in ("a", "b") else "tie") if with_strength else None)
             for i, (choice, with_strength, strength) in enumerate(rows)]
    pairs, report = pairs_from_votes(votes)
    n = {c: sum(v.choice == c for v in votes) for c in ("a", "b", "tie", "both_bad")}
    assert report == ConversionReport(kept=n["a"] + n["b"], dropped_ties=n["tie"], dropped_both_bad=n["both_bad"])
    assert all((p.chosen == "red") == (p.id in {v.id for v in votes if v.choice == "a"}) for p in pairs)
    thumbs = votes_to_thumbs(votes)
    assert len(thumbs) == 2 * len(votes)
    assert sum(t.up for t in thumbs) == n["a"] + n["b"] + 2 * n["tie"]
    validate_records(pairs)
    validate_records(thumbs)


@settings(max_examples=1000, deadline=None)
@given(rid=IDS, original=TEXT, edited=TEXT)
def test_D4_edit_round_trip_validates(rid: str, original: str, edited: str) -> None:
    edit = Edit(rid, PROMPT, original, edited)
    if original == edited:
        with pytest.raises(DataError):
            edit_to_pair(edit)
        return
    pair = edit_to_pair(edit)
    assert (pair.chosen, pair.rejected) == (edited, original)
    validate_records([pair])


@settings(max_examples=1000, deadline=None)
@given(labels=st.lists(st.one_of(st.none(), st.integers(0, 3)), max_size=9), strict=st.booleans())
def test_D4_majority_vote_matches_a_count(labels: list[int | None], strict: bool) -> None:
    given_ = [x for x in labels if x is not None]
    winner = majority_vote(labels, strict=strict)
    if winner is None:
        counts = sorted((given_.count(x) for x in set(given_)), reverse=True)
        assert not counts or (len(counts) > 1 and counts[0] == counts[1]) or (strict and 2 * counts[0] <= len(given_))
    else:
        assert all(given_.count(winner) > given_.count(x) for x in set(given_) - {winner})
        assert not strict or 2 * given_.count(winner) > len(given_)
