"""Inter-annotator agreement: Cohen's kappa, Fleiss' kappa, Krippendorff's alpha, percent agreement.

Pure Python and numpy, no torch: the feedback app imports this module (a test checks that torch stays
unloaded). Labels are any hashable values (ints, strings); `None` and float NaN mean "no rating".

Conventions for the awkward cases (each is tested):
- Missing ratings: Cohen's kappa and percent agreement use the items both raters (or at least two
  raters) labelled; Krippendorff's alpha is built for missing data and uses every pairable value;
  Fleiss' kappa needs the same number of ratings on every item and raises ValueError otherwise
  (use Krippendorff's alpha there).
- Undefined values are `nan`, never an exception: no shared items, no pairable values, or a single
  category in use (chance agreement is 1, so kappa and alpha are 0/0). Perfect agreement on two or
  more categories is 1.0.
- Small samples give the plain estimate (no small-sample correction beyond alpha's own n - 1).
- Invalid input raises ValueError: sequences of different lengths, a count table that is not 2-D, has
  negative counts or fewer than two raters per item, an unknown level, non-numeric ordinal values.

Callers that count elsewhere (the feedback app counts in its database) pass tables instead of labels:
`fleiss_kappa(table)`, `cohen_kappa_table`, `krippendorff_alpha_counts`, `percent_agreement_counts`; the
label-list functions build those tables and call them, so both ways give the same figures.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

Level = Literal["nominal", "ordinal", "interval"]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _categories(values: Iterable[Hashable]) -> list[Hashable]:
    """Distinct values, sorted when they can be, else in order of first appearance."""
    distinct = list(dict.fromkeys(values))
    try:
        return sorted(distinct)  # type: ignore[type-var]
    except TypeError:
        return distinct


def count_table(items: Iterable[Sequence[Hashable | None]]) -> tuple[np.ndarray, list[Hashable]]:
    """Items x categories table of how many raters gave each label (missing ratings are skipped), and the
    categories in column order: the input of `fleiss_kappa` (like statsmodels' `aggregate_raters`)."""
    rows = [[v for v in item if not _missing(v)] for item in items]
    cats = _categories(v for row in rows for v in row)
    col = {c: j for j, c in enumerate(cats)}
    table = np.zeros((len(rows), len(cats)), dtype=np.int64)
    for i, row in enumerate(rows):
        for v in row:
            table[i, col[v]] += 1
    return table, cats


def cohen_kappa(a: Sequence[Hashable | None], b: Sequence[Hashable | None]) -> float:
    """Cohen's kappa of two raters over the items both labelled: (p_o - p_e) / (1 - p_e), with p_e from each
    rater's own label frequencies (Cohen 1960). nan with no shared items or one category in use."""
    if len(a) != len(b):
        raise ValueError(f"the two raters label different numbers of items ({len(a)} and {len(b)})")
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if not _missing(x) and not _missing(y)]
    cats = _categories(v for p in pairs for v in p)
    col = {c: j for j, c in enumerate(cats)}
    table = np.zeros((len(cats), len(cats)))
    for x, y in pairs:
        table[col[x], col[y]] += 1
    return cohen_kappa_table(table)


def cohen_kappa_table(table: Any) -> float:
    """Cohen's kappa from a categories x categories confusion table of two raters (rows: the first rater's
    label, columns: the second's, on the items both labelled), for callers that count in a database.
    nan with no items or one category in use."""
    counts = _counts(table)
    if counts.shape[0] != counts.shape[1]:
        raise ValueError(f"the confusion table must be square, got shape {counts.shape}")
    n = counts.sum()
    if n == 0 or np.count_nonzero(counts.sum(0) + counts.sum(1)) < 2:
        return math.nan
    p_o = np.trace(counts) / n
    p_e = float((counts.sum(1) / n) @ (counts.sum(0) / n))
    return float((p_o - p_e) / (1 - p_e))


def _counts(table: Any) -> np.ndarray:
    """A 2-D float64 table of finite, non-negative counts (ValueError otherwise)."""
    counts = np.asarray(table, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"the count table must be 2-D, got shape {counts.shape}")
    if counts.size and (not np.isfinite(counts).all() or (counts < 0).any()):
        raise ValueError("counts must be finite and non-negative")
    return counts


def fleiss_kappa(table: Any = None, *, labels: Iterable[Sequence[Hashable | None]] | None = None) -> float:
    """Fleiss' kappa (Fleiss 1971) from an items x categories count table, or from per-item label lists
    (`labels=`, converted with `count_table`). Every item needs the same number n >= 2 of ratings.
    nan with no items or one category in use."""
    if (table is None) == (labels is None):
        raise ValueError("give exactly one of a count table or labels=")
    counts = _counts(count_table(labels)[0] if labels is not None else table)
    if counts.shape[0] == 0:
        return math.nan
    per_item = counts.sum(1)
    n = per_item[0]
    if not np.all(per_item == n):
        raise ValueError("Fleiss' kappa needs the same number of ratings on every item "
                         f"(found {sorted(set(per_item.tolist()))}); use krippendorff_alpha for missing ratings")
    if n < 2:
        raise ValueError(f"Fleiss' kappa needs at least 2 ratings per item, got {n:g}")
    if np.count_nonzero(counts.sum(0)) < 2:
        return math.nan
    p_cat = counts.sum(0) / counts.sum()
    p_bar = float(((counts * counts).sum(1) - n).mean() / (n * (n - 1)))
    p_e = float(p_cat @ p_cat)
    return (p_bar - p_e) / (1 - p_e)


def _delta2(values: list[Any], marginals: np.ndarray, level: str) -> np.ndarray:
    """Squared distances between the values (Krippendorff 2011, section on metric differences)."""
    k = len(values)
    if level == "nominal":
        return 1.0 - np.eye(k)
    if any(isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        raise ValueError(f"{level} alpha needs numeric values")
    if level == "interval":
        x = np.asarray(values, dtype=np.float64)
        return (x[:, None] - x[None, :]) ** 2
    # ordinal: values sorted; the distance counts the pairable values between c and k, halving the ends
    cum = np.concatenate([[0.0], np.cumsum(marginals)])
    lo, hi = np.minimum.outer(np.arange(k), np.arange(k)), np.maximum.outer(np.arange(k), np.arange(k))
    return (cum[hi + 1] - cum[lo] - (marginals[lo] + marginals[hi]) / 2) ** 2  # type: ignore[no-any-return]


def krippendorff_alpha(data: Iterable[Sequence[Hashable | None]], level: Level = "nominal") -> float:
    """Krippendorff's alpha, 1 - D_o / D_e, from items x raters (None or NaN = missing). Only items with at
    least two ratings are pairable. nan with fewer than two pairable values or one value in use."""
    counts, values = count_table(data)  # (U, V)
    return krippendorff_alpha_counts(counts, values, level)


def krippendorff_alpha_counts(table: Any, values: Sequence[Hashable], level: Level = "nominal") -> float:
    """Krippendorff's alpha from a units x values count table (how many raters gave each value to each
    unit, columns in the order of `values`, sorted for ordinal and interval data), for callers that count
    in a database; units with fewer than two ratings are left out, as in `krippendorff_alpha`."""
    if level not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"level must be 'nominal', 'ordinal' or 'interval', got {level!r}")
    counts = _counts(table)
    if counts.shape[1] != len(values):
        raise ValueError(f"the count table has {counts.shape[1]} columns for {len(values)} values")
    counts = counts[counts.sum(1) >= 2]
    present = counts.sum(0) > 0
    counts, values = counts[:, present], [v for v, keep in zip(values, present, strict=True) if keep]
    if len(values) < 2:
        return math.nan
    weight = 1.0 / (counts.sum(1) - 1)  # (U,)
    coincidence = (counts * weight[:, None]).T @ counts - np.diag(counts.T @ weight)  # (V, V)
    marginals = coincidence.sum(0)  # (V,)
    n = marginals.sum()
    delta2 = _delta2(values, marginals, level)
    observed = float((coincidence * delta2).sum())
    expected = float((np.outer(marginals, marginals) * delta2).sum())
    return float(1.0 - (n - 1) * observed / expected)


def percent_agreement(data: Iterable[Sequence[Hashable | None]]) -> float:
    """Share of agreeing rater pairs per item, averaged over items with at least two ratings (a fraction in
    [0, 1]; for two raters, the share of shared items where they agree). nan when no item has two."""
    return percent_agreement_counts(count_table(data)[0])


def percent_agreement_counts(table: Any) -> float:
    """`percent_agreement` from an items x categories count table (see `count_table`)."""
    table = _counts(table)  # (U, V)
    n = table.sum(1)
    keep = n >= 2
    if not keep.any():
        return math.nan
    table, n = table[keep], n[keep]
    return float((((table * (table - 1)).sum(1)) / (n * (n - 1))).mean())


def pairwise_cohen(labels_by_annotator: Mapping[str, Mapping[Any, Any]]) -> dict[tuple[str, str], float]:
    """Cohen's kappa for every pair of annotators (in the mapping's order) on the items both labelled;
    nan for a pair with no shared items or one category in use."""
    out = {}
    for (a, la), (b, lb) in itertools.combinations(labels_by_annotator.items(), 2):
        shared = [item for item, v in la.items() if not _missing(v) and item in lb and not _missing(lb[item])]
        out[(a, b)] = cohen_kappa([la[i] for i in shared], [lb[i] for i in shared])
    return out
