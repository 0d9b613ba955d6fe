"""The count-table entry points of alignloop.agreement (for callers that count in a database) equal the
label-list functions to 1e-12 on random data, whatever the order of the rows and with categories nobody
used: the feedback app's quality figures pass tables built that way."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from alignloop.agreement import (
    cohen_kappa,
    cohen_kappa_table,
    count_table,
    krippendorff_alpha,
    krippendorff_alpha_counts,
    percent_agreement,
    percent_agreement_counts,
)

CATEGORIES = [1, 2, 3, 4, 5]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12 * max(1.0, abs(a))


def random_items(rng: np.random.Generator) -> list[list[int | None]]:
    """Items x raters, some ratings missing, values from a random subset of CATEGORIES."""
    used = rng.choice(CATEGORIES, size=int(rng.integers(1, 6)), replace=False).tolist()
    n_items, n_raters = int(rng.integers(0, 30)), int(rng.integers(2, 7))
    return [[None if rng.random() < 0.3 else int(rng.choice(used)) for _ in range(n_raters)] for _ in range(n_items)]


def padded_table(items: list[list[int | None]], rng: np.random.Generator) -> np.ndarray:
    """The items' count table over every category (unused ones as zero columns), rows shuffled."""
    table = np.zeros((len(items), len(CATEGORIES)), dtype=np.int64)
    for i, row in enumerate(items):
        for v in row:
            if v is not None:
                table[i, CATEGORIES.index(v)] += 1
    return table[rng.permutation(len(items))]


@pytest.mark.parametrize("seed", range(200))
def test_counts_equal_label_lists(seed: int) -> None:
    rng = np.random.default_rng(seed)
    items = random_items(rng)
    table = padded_table(items, rng)
    for level in ("nominal", "ordinal", "interval"):
        assert same(krippendorff_alpha_counts(table, CATEGORIES, level), krippendorff_alpha(items, level)), level
    assert same(percent_agreement_counts(table), percent_agreement(items))
    assert same(krippendorff_alpha_counts(*count_table(items)), krippendorff_alpha(items))

    a, b = [row[0] for row in items], [row[1] for row in items]
    confusion = np.zeros((len(CATEGORIES), len(CATEGORIES)))
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None:
            confusion[CATEGORIES.index(x), CATEGORIES.index(y)] += 1
    assert same(cohen_kappa_table(confusion), cohen_kappa(a, b))
    assert same(cohen_kappa_table(confusion.T), cohen_kappa(b, a))


def test_degenerate_tables() -> None:
    assert math.isnan(cohen_kappa_table(np.zeros((3, 3))))  # nothing shared
    assert math.isnan(cohen_kappa_table([[4, 0], [0, 0]]))  # one category in use
    assert cohen_kappa_table([[2, 0, 0], [0, 0, 0], [0, 0, 3]]) == 1.0
    assert cohen_kappa_table([[0, 1], [1, 0]]) == -1.0
    assert math.isnan(krippendorff_alpha_counts(np.zeros((0, 2)), ["x", "y"]))
    assert math.isnan(krippendorff_alpha_counts([[1, 0], [0, 1]], ["x", "y"]))  # no unit has two ratings
    assert math.isnan(percent_agreement_counts(np.zeros((0, 4))))
    assert percent_agreement_counts([[2, 1, 0], [0, 0, 1]]) == pytest.approx(1 / 3)


@pytest.mark.parametrize(("call", "message"), [
    ((cohen_kappa_table, [[1, 0, 0], [0, 1, 0]]), "square"),
    ((cohen_kappa_table, [1, 2]), "2-D"),
    ((cohen_kappa_table, [[1, -1], [0, 1]]), "non-negative"),
    ((krippendorff_alpha_counts, [[1, 1]], ["x"]), "columns"),
    ((krippendorff_alpha_counts, [[1, 1]], ["x", "y"], "ratio"), "level"),
    ((krippendorff_alpha_counts, [[2, 1]], ["x", "y"], "interval"), "numeric"),
    ((percent_agreement_counts, [[float("nan"), 1]]), "finite"),
])
def test_invalid_tables_raise(call: tuple[Any, ...], message: str) -> None:
    function, *args = call
    with pytest.raises(ValueError, match=message):
        function(*args)
