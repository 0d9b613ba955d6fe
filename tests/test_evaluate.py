"""Evaluation math against hand-computed values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from alignloop.data import PreferencePair
from alignloop.evaluate import calibration_error, pearson, reward_report, summarise_scores


def test_calibration_error_hand_computed():
    # one pair with diff 0 -> p = 0.5 in both orders: bin 5 holds (0.5, 1) and (0.5, 0): |0.5 - 0.5| = 0
    assert calibration_error(torch.tensor([1.0]), torch.tensor([1.0])) == pytest.approx(0.0)
    # diff = log 3 -> p = 0.75 (label 1) and 0.25 (label 0): each bin off by 0.25, weight 1/2 -> ECE 0.25
    assert calibration_error(torch.tensor([math.log(3)]), torch.tensor([0.0])) == pytest.approx(0.25)


def test_pearson_hand_computed():
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0])) == pytest.approx(1.0)
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 1.0, 2.0])) == pytest.approx(-0.5)
    assert math.isnan(pearson(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])))


@dataclass
class FakeScore:
    overall: float
    helpful: float = 0.0
    honest: float = 0.0
    harmless: float = 0.0
    well_formed: bool = True
    meta: dict = field(default_factory=dict)


def test_reward_report_accuracy_by_kind_and_gold_agreement():
    prompt = [{"role": "user", "content": "q"}]
    pairs = [PreferencePair(f"p{i}", prompt, f"good {'x ' * i}".strip(), "bad", meta={"kind": k})
             for i, k in enumerate(["helpful", "helpful", "honest"])]
    chosen = torch.tensor([[2.0], [0.0], [1.0]])
    rejected = torch.tensor([[1.0], [1.0], [0.0]])
    gold = {"bad": 0.0}

    def judge(_, text):
        return FakeScore(overall=gold.get(text, 1.0))

    report = reward_report(pairs, chosen, rejected, judge)
    assert report["rm/accuracy"] == pytest.approx(2 / 3)
    assert report["rm/accuracy/helpful"] == pytest.approx(0.5) and report["rm/accuracy/honest"] == 1.0
    assert report["gold/agreement"] == pytest.approx(2 / 3)
    assert report["rm/uncertainty"] == 0.0


def test_reward_report_splits_agreement_and_ensemble_uncertainty_by_gold_gap():
    prompt = [{"role": "user", "content": "q"}]
    gold = {"a": 1.0, "b": 0.9, "c": 0.0, "d": 0.6}
    pairs = [PreferencePair("close", prompt, "a", "b"), PreferencePair("clear", prompt, "a", "c"),
             PreferencePair("middle", prompt, "d", "c"), PreferencePair("tie", prompt, "a", "a")]
    # two heads; r_c - r_r per head: close (1, -1), clear (3, 5), middle (1, 1), tie (0, 0)
    chosen = torch.tensor([[1.0, -1.0], [3.0, 5.0], [1.0, 1.0], [0.0, 0.0]])
    rejected = torch.zeros(4, 2)
    report = reward_report(pairs, chosen, rejected, lambda _, text: FakeScore(overall=gold[text]))
    assert report["gold/pairs_close"] == 1.0 and report["gold/pairs_clear"] == 2.0
    assert report["gold/agreement_close"] == 0.0  # head mean 0: not above
    assert report["gold/agreement_clear"] == 1.0
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  sample std of two values a, b is |a - b| / sqrt(2)
    assert report["gold/uncertainty_close"] == pytest.approx((s(1) - s(-1)) / math.sqrt(2))
    assert report["gold/uncertainty_clear"] == pytest.approx(((s(5) - s(3)) / math.sqrt(2) + 0.0) / 2)


def test_summarise_scores_by_kind():
    class P:
        def __init__(self, kind):
            self.meta = {"kind": kind}

    means, by_kind = summarise_scores([P("a"), P("a"), P("b")], [FakeScore(1.0), FakeScore(0.0), FakeScore(0.5)])
    assert means["overall"] == pytest.approx(0.5) and by_kind["a"]["overall"] == 0.5 and by_kind["b"]["n"] == 1
