"""Inter-annotator agreement against statsmodels and the krippendorff package (1e-9), degenerate cases, and
the module staying free of torch (the feedback app imports it)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from typing import Any

import krippendorff
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats import inter_rater

from alignloop.agreement import (
    cohen_kappa,
    count_table,
    fleiss_kappa,
    krippendorff_alpha,
    pairwise_cohen,
    percent_agreement,
)


def reference_cohen(a: list[Any], b: list[Any]) -> float:
    cats = sorted(set(a) | set(b))
    table = np.zeros((len(cats), len(cats)))
    for x, y in zip(a, b, strict=True):
        table[cats.index(x), cats.index(y)] += 1
    with warnings.catch_warnings():  # statsmodels also computes standard errors, which warn on small tables
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(inter_rater.cohens_kappa(table, return_results=False))


def reference_alpha(items: list[list[int | None]], level: Any) -> float:
    data = np.array([[np.nan if v is None else v for v in row] for row in items], dtype=float).T  # raters x items
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement=level))


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9


# ---------------------------------------------------------------------------------------------------------
# Hand-computed values and degenerate cases.


def test_cohen_hand_example() -> None:
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5 -> 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    assert close(cohen_kappa(a, b), reference_cohen(a, b))


def test_degenerate_values_are_documented() -> None:
    assert math.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]))  # one category: chance agreement 1
    assert math.isnan(cohen_kappa([], [])) and math.isnan(cohen_kappa([1, None], [None, 2]))  # nothing shared
    assert cohen_kappa([1, 2], [1, 2]) == 1.0 and cohen_kappa([1, 2], [2, 1]) == -1.0
    assert cohen_kappa([1, 1], [2, 2]) == 0.0
    assert math.isnan(fleiss_kappa(labels=[[1, 1], [1, 1]])) and math.isnan(fleiss_kappa(np.zeros((0, 3))))
    assert fleiss_kappa(labels=[[1, 1], [2, 2]]) == 1.0
    assert math.isnan(krippendorff_alpha([[1, 1], [1, None]])) and math.isnan(krippendorff_alpha([[1], [2]]))
    assert math.isnan(krippendorff_alpha([])) and krippendorff_alpha([[1, 1], [2, 2]]) == 1.0
    assert math.isnan(percent_agreement([[1, None], [None]])) and percent_agreement([[1, 1, 2]]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="different numbers"):
        cohen_kappa([1], [1, 2])
    with pytest.raises(ValueError, match="krippendorff_alpha"):
        fleiss_kappa(labels=[[1, 2, None], [1, 2, 2]])
    with pytest.raises(ValueError, match="at least 2"):
        fleiss_kappa([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="exactly one"):
        fleiss_kappa()
    with pytest.raises(ValueError, match="non-negative"):
        fleiss_kappa([[3, -1], [1, 1]])
    with pytest.raises(ValueError, match="2-D"):
        fleiss_kappa([1, 2])
    with pytest.raises(ValueError, match="level"):
        krippendorff_alpha([[1, 2]], level="ratio")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="numeric"):
        krippendorff_alpha([["a", "b"], ["a", "a"]], level="interval")


def test_count_table_and_labels_of_any_type() -> None:
    table, cats = count_table([["x", "y", None], ["y", "y", "y"], [float("nan"), "x", "x"]])
    assert cats == ["x", "y"] and table.tolist() == [[1, 1], [0, 3], [2, 0]]
    assert krippendorff_alpha([["x", "y"], ["y", "y"]]) == pytest.approx(
        reference_alpha([[0, 1], [1, 1]], "nominal"), abs=1e-12)


def test_pairwise_cohen_uses_shared_items_only() -> None:
    labels = {
        "ann1": {"i1": 1, "i2": 2, "i3": 1, "i4": 2},
        "ann2": {"i1": 1, "i2": 2, "i3": 2, "i5": 1},
        "ann3": {"i9": 1},
    }
    out = pairwise_cohen(labels)
    assert list(out) == [("ann1", "ann2"), ("ann1", "ann3"), ("ann2", "ann3")]
    assert out[("ann1", "ann2")] == pytest.approx(cohen_kappa([1, 2, 1], [1, 2, 2]), abs=1e-15)
    assert math.isnan(out[("ann1", "ann3")]) and math.isnan(out[("ann2", "ann3")])


# ---------------------------------------------------------------------------------------------------------
# Against independent implementations on random data.

LABEL_ROWS = st.integers(2, 5).flatmap(lambda raters: st.lists(
    st.lists(st.integers(0, 3), min_size=raters, max_size=raters), min_size=1, max_size=40))


@settings(max_examples=1000, deadline=None)
@given(rows=LABEL_ROWS)
def test_cohen_and_fleiss_match_statsmodels(rows: list[list[int]]) -> None:
    a, b = [r[0] for r in rows], [r[1] for r in rows]
    assert close(cohen_kappa(a, b), reference_cohen(a, b))
    table, _ = inter_rater.aggregate_raters(np.array(rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = float(inter_rater.fleiss_kappa(table))
    assert close(fleiss_kappa(labels=rows), expected) and close(fleiss_kappa(table), expected)
    agree = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    assert percent_agreement([[x, y] for x, y in zip(a, b, strict=True)]) == pytest.approx(agree, abs=1e-12)


@settings(max_examples=1000, deadline=None)
@given(rows=st.integers(2, 5).flatmap(lambda raters: st.lists(
    st.lists(st.one_of(st.none(), st.integers(-2, 4)), min_size=raters, max_size=raters), min_size=1, max_size=30)),
    level=st.sampled_from(["nominal", "ordinal", "interval"]))
def test_krippendorff_alpha_matches_the_krippendorff_package_with_missing_values(
    rows: list[list[int | None]], level: str
) -> None:
    pairable = [v for r in rows if sum(v is not None for v in r) >= 2 for v in r if v is not None]
    mine = krippendorff_alpha(rows, level)  # type: ignore[arg-type]
    if len(set(pairable)) < 2:  # the package raises or divides 0 by 0 here; ours documents nan
        assert math.isnan(mine)
        return
    assert close(mine, reference_alpha(rows, level))


def test_seeded_larger_samples_match() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        truth = rng.integers(0, 4, size=300)
        noisy = np.where(rng.random((300, 4)) < 0.3, rng.integers(0, 4, size=(300, 4)), truth[:, None])
        rows = noisy.tolist()
        assert close(cohen_kappa(noisy[:, 0].tolist(), noisy[:, 1].tolist()),
                     reference_cohen(noisy[:, 0].tolist(), noisy[:, 1].tolist()))
        assert close(fleiss_kappa(labels=rows), float(inter_rater.fleiss_kappa(inter_rater.aggregate_raters(noisy)[0])))
        holes = [[None if rng.random() < 0.2 else v for v in row] for row in rows]
        for level in ("nominal", "ordinal", "interval"):
            assert close(krippendorff_alpha(holes, level), reference_alpha(holes, level))  # type: ignore[arg-type]


def test_agreement_module_does_not_import_torch() -> None:
    code = "import sys, alignloop.agreement; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
