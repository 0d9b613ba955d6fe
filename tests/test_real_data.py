"""Real data next to the repository (../shared/data, never copied into it) through the same loaders: PandaLM
(three annotators, agreement checked against statsmodels and krippendorff), LLMBar and hh-rlhf. Skipped when
the folder is absent, failed when CI=true. Small synthetic files check the error locations without it."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import krippendorff
import numpy as np
import pytest
from shared_data import shared
from statsmodels.stats import inter_rater

from alignloop.agreement import (
    cohen_kappa,
    fleiss_kappa,
    krippendorff_alpha,
    pairwise_cohen,
    percent_agreement,
)
from alignloop.data import DataError, load_records, validate_records
from alignloop.preferences import (
    PANDALM_ANNOTATORS,
    ConversionReport,
    PandaLMItem,
    load_llmbar,
    load_pandalm,
    pandalm_annotator_pairs,
    pandalm_majority_pairs,
    pandalm_votes,
    votes_to_thumbs,
)


@pytest.fixture(scope="module")
def pandalm() -> list[PandaLMItem]:
    return load_pandalm(shared("pandalm/testset-v1.json"))


# ---------------------------------------------------------------------------------------------------------
# PandaLM.


def test_pandalm_loads_every_item_with_its_labels(pandalm: list[PandaLMItem]) -> None:
    assert len(pandalm) == 999 and len({i.id for i in pandalm}) == 999 and pandalm[0].id == "pandalm-0"
    ties = {a: sum(i.labels[a] == 0 for i in pandalm) for a in PANDALM_ANNOTATORS}
    assert ties == {"annotator1": 97, "annotator2": 116, "annotator3": 113}
    assert pandalm[0].meta == {"idx": 0, "motivation_app": "Grammarly", "cmp_key": "bloom-7b_llama-7b"}
    # odd records kept as items: 6 responses are JSON `true` upstream (None here), 54 responses are empty
    assert sum(t is None for i in pandalm for t in (i.response1, i.response2)) == 6
    assert sum(t == "" for i in pandalm for t in (i.response1, i.response2)) == 54
    # prompt = instruction + "\n\n" + input; a blank part is left out
    first = pandalm[0]
    assert first.prompt == [{"role": "user", "content": first.instruction + "\n\n" + first.input}]
    no_input = next(i for i in pandalm if i.input == "")
    assert no_input.prompt == [{"role": "user", "content": no_input.instruction}]
    assert pandalm[466].instruction == " " and pandalm[466].prompt == [{"role": "user", "content": "Truthfulness"}]


def test_pandalm_pairs_count_every_drop(pandalm: list[PandaLMItem]) -> None:
    pairs, report = pandalm_annotator_pairs(pandalm)
    assert report == ConversionReport(kept=2501, dropped_ties=316, dropped_unusable=180)
    assert report.kept + report.dropped == 3 * 999
    assert Counter(p.meta["annotator_id"] for p in pairs) == {"annotator1": 844, "annotator2": 825, "annotator3": 832}
    validate_records(pairs)
    majority, report = pandalm_majority_pairs(pandalm)
    assert report == ConversionReport(kept=836, dropped_ties=103, dropped_unusable=60, dropped_no_majority=0)
    assert report.kept + report.dropped == 999
    validate_records(majority)
    by_id = {i.id: i for i in pandalm}
    for pair in majority:
        item, label = by_id[pair.id], Counter(by_id[pair.id].labels.values()).most_common(1)[0][0]
        assert (pair.chosen, pair.rejected) == ((item.response1, item.response2) if label == 1 else (item.response2, item.response1))
    votes, report = pandalm_votes(pandalm)
    assert len(votes) == 2817 and report.dropped_unusable == 180
    thumbs = votes_to_thumbs(votes)  # ties kept as two thumbs up
    assert len(thumbs) == 2 * 2817 and sum(t.up for t in thumbs) == 2501 + 2 * 316
    validate_records(thumbs)


def _reference_figures(rows: np.ndarray) -> dict[str, float]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            table = np.zeros((3, 3))
            np.add.at(table, (rows[:, i], rows[:, j]), 1)
            out[f"cohen_{i + 1}{j + 1}"] = float(inter_rater.cohens_kappa(table, return_results=False))
        out["fleiss"] = float(inter_rater.fleiss_kappa(inter_rater.aggregate_raters(rows)[0]))
    out["alpha"] = float(krippendorff.alpha(reliability_data=rows.T, level_of_measurement="nominal"))
    return out


def test_pandalm_agreement_matches_statsmodels_and_krippendorff(pandalm: list[PandaLMItem]) -> None:
    rows = np.array([[i.labels[a] for a in PANDALM_ANNOTATORS] for i in pandalm])  # (999, 3)
    by_annotator = {a: {i.id: i.labels[a] for i in pandalm} for a in PANDALM_ANNOTATORS}
    pairwise = pairwise_cohen(by_annotator)
    ours = {
        "cohen_12": pairwise[("annotator1", "annotator2")],
        "cohen_13": pairwise[("annotator1", "annotator3")],
        "cohen_23": pairwise[("annotator2", "annotator3")],
        "fleiss": fleiss_kappa(labels=rows.tolist()),
        "alpha": krippendorff_alpha(rows.tolist(), "nominal"),
    }
    reference = _reference_figures(rows)
    assert all(abs(ours[k] - reference[k]) <= 1e-9 for k in ours), (ours, reference)
    assert ours["cohen_12"] == cohen_kappa(rows[:, 0].tolist(), rows[:, 1].tolist())
    # the published figures, pinned (README of the reply; labels 0 tie / 1 / 2 as nominal categories)
    expected = {"cohen_12": 0.852023, "cohen_13": 0.878944, "cohen_23": 0.861661, "fleiss": 0.864175, "alpha": 0.864221}
    assert all(math.isclose(ours[k], v, abs_tol=1e-6) for k, v in expected.items()), ours
    assert percent_agreement(rows.tolist()) == pytest.approx(0.919920, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# LLMBar and hh-rlhf.


def test_llmbar_loads_every_subset() -> None:
    folder = shared("llmbar")
    natural = load_llmbar(folder / "raw-natural.json")
    assert len(natural) == 100 and natural[0].id == "llmbar-natural-0"
    everything = load_llmbar(folder)
    assert Counter(p.meta["subset"] for p in everything) == {
        "natural": 100, "adversarial-neighbor": 134, "adversarial-gptinst": 92, "adversarial-gptout": 47,
        "adversarial-manual": 46}
    validate_records(everything)
    raw = json.loads((folder / "raw-natural.json").read_text(encoding="utf-8"))
    for pair, row in zip(natural, raw, strict=True):
        assert pair.prompt == [{"role": "user", "content": row["input"]}]
        assert pair.chosen == row[f"output_{row['label']}"] and pair.rejected == row[f"output_{3 - row['label']}"]


def test_hh_rlhf_multi_turn_prompts_survive() -> None:
    path = shared("hh-rlhf/pairs-harmless-test.jsonl")
    pairs = load_records(path, "pair")
    assert len(pairs) == 1299
    multi = [p for p in pairs if len(p.prompt) > 1]
    assert len(multi) == 1299 - 390
    for p in pairs:
        assert [m["role"] for m in p.prompt] == ["user", "assistant"] * (len(p.prompt) // 2) + ["user"]
    raw = json.loads(path.read_text(encoding="utf-8").split("\n", 1)[0])
    assert len(raw["prompt"]) > 1 and pairs[0].prompt == raw["prompt"]


# ---------------------------------------------------------------------------------------------------------
# Error locations on small synthetic files (no shared data needed).

PANDA_ROW = {"idx": 0, "instruction": "Say hi.", "input": "", "response1": "hi", "response2": "hello",
             "annotator1": 1, "annotator2": 1, "annotator3": 0}


@pytest.mark.parametrize(("change", "code", "field"), [
    ({"annotator2": 3}, "D109", "annotator2"),
    ({"annotator3": "1"}, "D103", "annotator3"),
    ({"annotator1": True}, "D103", "annotator1"),
    ({"response1": 5}, "D103", "response1"),
    ({"response2": None}, "D102", "response2"),
    ({"instruction": "a\x00b"}, "D108", "instruction"),
    ({"idx": "0"}, "D103", "idx"),
    ({"idx": 1}, "D107", "idx"),
])
def test_pandalm_errors_name_file_line_and_field(change: dict[str, Any], code: str, field: str, tmp_path: Path) -> None:
    path = tmp_path / "testset.json"
    rows = [PANDA_ROW, {**PANDA_ROW, "idx": 1}, {**PANDA_ROW, "idx": 2, **change}]
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_pandalm(path)
    assert (info.value.code, info.value.path, info.value.line, info.value.field) == (code, str(path), 4, field)
    assert str(info.value).startswith(f"{path}:4: {code}")


def test_pandalm_odd_items_are_kept_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "testset.json"
    rows = [PANDA_ROW, {**PANDA_ROW, "idx": 1, "response1": True}, {**PANDA_ROW, "idx": 2, "response2": " "},
            {**PANDA_ROW, "idx": 3, "instruction": "", "input": None}, {**PANDA_ROW, "idx": 4, "response2": "hi"},
            {**PANDA_ROW, "idx": 5, "annotator1": 2}]
    path.write_text(json.dumps(rows), encoding="utf-8")
    items = load_pandalm(path)
    assert len(items) == 6 and items[1].response1 is None and items[3].prompt is None
    pairs, report = pandalm_majority_pairs(items)
    assert [p.id for p in pairs] == ["pandalm-0"]
    assert report == ConversionReport(kept=1, dropped_unusable=3, dropped_identical=1, dropped_no_majority=1)
    pairs, report = pandalm_annotator_pairs(items)
    assert report == ConversionReport(kept=4, dropped_ties=2, dropped_unusable=9, dropped_identical=3)
    assert [(p.id, p.chosen) for p in pairs] == [("pandalm-0:annotator1", "hi"), ("pandalm-0:annotator2", "hi"),
                                                 ("pandalm-5:annotator1", "hello"), ("pandalm-5:annotator2", "hi")]


@pytest.mark.parametrize(("change", "code", "field"), [
    ({"output_2": ""}, "D104", "output_2"),
    ({"output_2": "A"}, "D109", "output_2"),
    ({"label": 0}, "D109", "label"),
    ({"label": "1"}, "D103", "label"),
    ({"input": None}, "D102", "input"),
])
def test_llmbar_errors_name_file_line_and_field(change: dict[str, Any], code: str, field: str, tmp_path: Path) -> None:
    good = {"input": "Q", "output_1": "A", "output_2": "B", "label": 2}
    path = tmp_path / "raw-natural.json"
    path.write_text(json.dumps([good, {**good, **change}], indent=2), encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_llmbar(tmp_path)
    assert (info.value.code, info.value.path, info.value.line, info.value.field) == (code, str(path), 8, field)
    path.write_text(json.dumps([good]), encoding="utf-8")
    (pair,) = load_llmbar(tmp_path)
    assert (pair.id, pair.chosen, pair.rejected, pair.meta) == ("llmbar-natural-0", "B", "A", {"subset": "natural", "label": 2})
    with pytest.raises(FileNotFoundError):
        load_llmbar(tmp_path / "absent")
