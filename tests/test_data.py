"""Loaders, validation (the D1 malformed corpus), format round trips, and length-bucketed batching (D4)."""

from __future__ import annotations

import csv
import dataclasses
import json
import pickle
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_data import shared

from alignloop.data import (
    ERROR_CODES,
    DataError,
    Edit,
    PreferencePair,
    Prompt,
    Ranking,
    Rating,
    SFTExample,
    Thumb,
    load_records,
    validate_records,
)
from alignloop.tokenization import length_bucketed_batches


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def jsonl(*rows: Any) -> str:
    """Rows as JSON Lines; a str row is written verbatim (for broken JSON)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


SFT = {"id": "s1", "messages": [user("Hi"), bot("Hello")]}
PAIR = {"id": "p1", "prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}


def sft(**changes: Any) -> dict[str, Any]:
    return {**SFT, "id": "s2", **changes}


def pair(**changes: Any) -> dict[str, Any]:
    return {**PAIR, "id": "p2", **changes}


def write(path: Path, content: Any) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(content), path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------
# D1: the malformed corpus. Each case: kind, file name, content, then the expected code, line, field (and col).

PRETTY_JSON = '[\n  {"id": "s1",\n   "messages": [{"role": "user", "content": "Hi"},\n                {"role": "assistant", "content": "Hello"}]},\n  {"id": "s2"}\n]\n'

MALFORMED = {
    "bad_json": ("sft", "a.jsonl", jsonl(SFT, '{"id": "s2", "messages": [}'), "D101", 2, None),
    "truncated_line": ("sft", "a.jsonl", jsonl(SFT, json.dumps(sft())[:30]), "D101", 2, None),
    "nan_literal": ("pair", "a.jsonl", jsonl('{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}'), "D101", 1, None),
    "extra_data": ("pair", "a.jsonl", jsonl(PAIR, json.dumps(pair()) + " }"), "D101", 2, None),
    "row_not_object": ("sft", "a.jsonl", jsonl(SFT, [1, 2]), "D103", 2, "<row>"),
    "missing_messages": ("sft", "a.jsonl", jsonl({"id": "s1"}), "D102", 1, "messages"),
    "missing_chosen": ("pair", "a.jsonl", jsonl(PAIR, {"id": "p2", "prompt": "a", "rejected": "b"}), "D102", 2, "chosen"),
    "missing_content": ("sft", "a.jsonl", jsonl(sft(messages=[{"role": "user"}, bot("x")])), "D102", 1, "messages[0].content"),
    "missing_role": ("sft", "a.jsonl", jsonl(sft(messages=[user("a"), {"content": "x"}])), "D102", 1, "messages[1].role"),
    "null_chosen": ("pair", "a.jsonl", jsonl(pair(chosen=None)), "D102", 1, "chosen"),
    "null_content": ("sft", "a.jsonl", jsonl(sft(messages=[user("a"), bot(None)])), "D102", 1, "messages[1].content"),
    "content_number": ("sft", "a.jsonl", jsonl(sft(messages=[user(42), bot("x")])), "D103", 1, "messages[0].content"),
    "messages_string": ("sft", "a.jsonl", jsonl(sft(messages="Hi")), "D103", 1, "messages"),
    "id_number": ("sft", "a.jsonl", jsonl(sft(id=7)), "D103", 1, "id"),
    "margin_string": ("pair", "a.jsonl", jsonl(pair(margin="0.5")), "D103", 1, "margin"),
    "margin_bool": ("pair", "a.jsonl", jsonl(pair(margin=True)), "D103", 1, "margin"),
    "thumb_up_number": ("thumb", "a.jsonl", jsonl({"prompt": "a", "response": "b", "up": 1}), "D103", 1, "up"),
    "score_string": ("rating", "a.jsonl", jsonl({"prompt": "a", "response": "b", "scores": {"helpful": "4"}}), "D103", 1, "scores.helpful"),
    "chosen_two_messages": ("pair", "a.jsonl", jsonl(pair(chosen=[bot("a"), bot("b")])), "D103", 1, "chosen"),
    "message_extra_key": ("sft", "a.jsonl", jsonl(sft(messages=[{**user("a"), "name": "bob"}, bot("b")])), "D103", 1, "messages[0]"),
    "meta_not_object": ("sft", "a.jsonl", jsonl(sft(meta=[1])), "D103", 1, "meta"),
    "empty_chosen": ("pair", "a.jsonl", jsonl(pair(chosen="")), "D104", 1, "chosen"),
    "whitespace_prompt": ("pair", "a.jsonl", jsonl(pair(prompt="  \n\t ")), "D104", 1, "prompt"),
    "empty_messages": ("sft", "a.jsonl", jsonl(sft(messages=[])), "D104", 1, "messages"),
    "empty_id": ("sft", "a.jsonl", jsonl(sft(id="")), "D104", 1, "id"),
    "bad_role": ("sft", "a.jsonl", jsonl(sft(messages=[user("a"), {"role": "robot", "content": "b"}])), "D105", 1, "messages[1].role"),
    "chosen_user_role": ("pair", "a.jsonl", jsonl(pair(chosen=[user("a")])), "D105", 1, "chosen[0].role"),
    "non_alternating": ("sft", "a.jsonl", jsonl(sft(messages=[user("a"), user("b"), bot("c")])), "D106", 1, "messages[1].role"),
    "system_not_first": ("sft", "a.jsonl", jsonl(sft(messages=[user("a"), {"role": "system", "content": "s"}, bot("c")])), "D106", 1, "messages[1].role"),
    "starts_with_assistant": ("sft", "a.jsonl", jsonl(sft(messages=[bot("a"), user("b"), bot("c")])), "D106", 1, "messages[0].role"),
    "sft_ends_on_user": ("sft", "a.jsonl", jsonl(SFT, sft(messages=[user("a"), bot("b"), user("c")])), "D106", 2, "messages[2].role"),
    "prompt_ends_on_assistant": ("prompt", "a.jsonl", jsonl({"messages": [user("a"), bot("b")]}), "D106", 1, "messages[1].role"),
    "pair_prompt_ends_on_assistant": ("pair", "a.jsonl", jsonl(pair(prompt=[user("a"), bot("b")])), "D106", 1, "prompt[1].role"),
    "duplicate_id": ("pair", "a.jsonl", jsonl(PAIR, pair(), pair(id="p1")), "D107", 3, "id"),
    "lone_surrogate": ("sft", "a.jsonl", jsonl(sft(messages=[user("a\ud800b"), bot("c")])), "D108", 1, "messages[0].content"),
    "nul_character": ("pair", "a.jsonl", jsonl(pair(chosen="a\x00b")), "D108", 1, "chosen"),
    "invalid_utf8": ("pair", "a.jsonl", jsonl(PAIR).encode() + b'{"prompt": "caf\xe9"}\n', "D108", 2, None),
    "negative_margin": ("pair", "a.jsonl", jsonl(pair(margin=-0.5)), "D109", 1, "margin"),
    "ranking_one_response": ("ranking", "a.jsonl", jsonl({"prompt": "a", "responses": ["b"]}), "D109", 1, "responses"),
    "ranking_duplicate": ("ranking", "a.jsonl", jsonl({"prompt": "a", "responses": ["b", "c", "b"]}), "D109", 1, "responses[2]"),
    "identical_pair": ("pair", "a.jsonl", jsonl(pair(rejected="Hello")), "D109", 1, "rejected"),
    "unchanged_edit": ("edit", "a.jsonl", jsonl({"prompt": "a", "original": "b", "edited": "b"}), "D109", 1, "edited"),
    "messages_and_prompt": ("sft", "a.jsonl", jsonl(sft(prompt="a")), "D109", 1, "prompt"),
    "meta_clash": ("sft", "a.jsonl", jsonl(sft(source="x", meta={"source": "y"})), "D109", 1, "source"),
    "csv_missing_column": ("pair", "a.csv", "id,prompt,chosen\np1,Hi,Hello\n", "D102", 2, "rejected"),
    "csv_empty_cell": ("pair", "a.csv", "id,prompt,chosen,rejected\np1,Hi,,No\n", "D102", 2, "chosen", 3),
    "csv_bad_json_cell": ("sft", "a.csv", 'id,messages\ns1,"[{""role"": ""user""}"\n', "D101", 2, "messages", 2),
    "csv_cell_count": ("pair", "a.csv", "id,prompt,chosen,rejected\np1,Hi,Hello,No,extra\n", "D101", 2, None),
    "csv_margin_text": ("pair", "a.csv", "prompt,chosen,rejected,margin\nHi,Hello,No,\nHi,Hello,No,big\n", "D101", 3, "margin", 4),
    "json_not_a_list": ("sft", "a.json", json.dumps(SFT), "D103", 1, "<file>"),
    "json_trailing_comma": ("sft", "a.json", "[" + json.dumps(SFT) + ",\n]", "D101", 2, None),
    "json_missing_field": ("sft", "a.json", PRETTY_JSON, "D102", 5, "messages"),
    "parquet_null_cell": ("pair", "a.parquet", [PAIR, pair(chosen=None)], "D102", 2, "chosen"),
    "parquet_int_column": ("pair", "a.parquet", [{**PAIR, "chosen": 1}, {**pair(), "chosen": 2}], "D103", 1, "chosen"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_D1_malformed_corpus_gives_coded_error_with_location(case: str, tmp_path: Path) -> None:
    kind, name, content, code, line, fld, *col = MALFORMED[case]
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        load_records(path, kind)
    err = info.value
    assert (err.code, err.path, err.line, err.field) == (code, str(path), line, fld), str(err)
    assert err.name == ERROR_CODES[code]
    if col:
        assert err.col == col[0]
    if err.col and path.suffix in (".jsonl", ".json") and code not in ("D101", "D108") and fld != "<file>":
        text = path.read_text(encoding="utf-8").split("\n")[line - 1]
        assert text[err.col - 1 :].startswith(json.dumps(re.split(r"[.\[]", fld)[0]))  # the field's key
    where = f"{path}:{line}" + (f":{err.col}" if err.col else "")
    assert str(err).startswith(f"{where}: {code} {ERROR_CODES[code]}: ")


def test_D1_corpus_has_at_least_25_cases_and_covers_every_loader_code() -> None:
    assert len(MALFORMED) >= 25
    assert {case[3] for case in MALFORMED.values()} == {f"D1{n:02d}" for n in range(1, 10)}


def test_D1_bad_json_reports_the_column(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", jsonl(SFT, '{"id": "s2", "messages": [}'))
    with pytest.raises(DataError) as info:
        load_records(path, "sft")
    assert info.value.col == 27 and str(info.value).startswith(f"{path}:2:27: D101 bad-json")


def test_D1_field_errors_point_at_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", jsonl(SFT, {"id": "s2", "messages": [user("a"), {"role": "bot", "content": "b"}]}))
    with pytest.raises(DataError) as info:
        load_records(path, "sft")
    assert str(info.value).startswith(f"{path}:2:14: D105 bad-role: field 'messages[1].role': unknown role 'bot'")


def test_D1_field_map_onto_an_existing_column_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", jsonl({"question": "a", "prompt": "b", "chosen": "c", "rejected": "d"}))
    with pytest.raises(DataError) as info:
        load_records(path, "pair", field_map={"question": "prompt"})
    assert (info.value.code, info.value.field) == ("D109", "prompt")


def test_D1_mixed_file_loads_nothing(tmp_path: Path) -> None:
    good = [pair(id=f"p{i}") for i in range(5)]
    path = write(tmp_path / "a.jsonl", jsonl(*good[:3], pair(id="bad", chosen=3), *good[3:]))
    result = None
    with pytest.raises(DataError) as info:
        result = load_records(path, "pair")
    assert result is None and info.value.line == 4 and info.value.record_id is None


def test_D1_valid_rows_load_one_to_one_without_coercion(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "Q?", "chosen": "yes", "rejected": "no", "margin": 2, "strength": "much"},
        {"id": "b", "prompt": [{"role": "system", "content": "Be brief."}, user("1"), bot("2"), user("3")],
         "chosen": [bot(" 4 ")], "rejected": "5", "source": "unit"},
        {"prompt": "Q", "chosen": "x", "rejected": "y"},
    ]
    got = load_records(write(tmp_path / "pairs.jsonl", jsonl(*rows)), "pair")
    assert got == [
        PreferencePair("a", [user("Q?")], "yes", "no", 2.0, "much"),
        PreferencePair("b", rows[1]["prompt"], " 4 ", "5", meta={"source": "unit"}),
        PreferencePair("pairs:3", [user("Q")], "x", "y"),
    ]
    assert type(got[0].margin) is float and got[1].margin is None


def test_D1_error_survives_pickling() -> None:
    err = DataError("D103", "expected a string", path="f.jsonl", line=3, col=4, field="id", record_id="x")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.code, back.line, back.col, back.field) == (str(err), "D103", 3, 4, "id")


# ---------------------------------------------------------------------------------------------------------
# Accepted shapes.


def test_D1_valid_sft_shapes_ours_trl_and_plain(tmp_path: Path) -> None:
    rows = [
        SFT,
        {"id": "t", "prompt": [user("Hi")], "completion": [bot("Hello")]},
        {"id": "u", "prompt": "Hi", "completion": "Hello"},
        {"id": "v", "prompt": "Hi", "response": "Hello", "lang": "en"},
        {"prompt": [{"role": "system", "content": "S"}, user("a"), bot("b"), user("c")], "completion": [bot("d")]},
    ]
    got = load_records(write(tmp_path / "demo.jsonl", jsonl(*rows)), "sft")
    assert [r.id for r in got] == ["s1", "t", "u", "v", "demo:5"]
    assert all(r.messages == [user("Hi"), bot("Hello")] for r in got[:4])
    assert got[3].meta == {"lang": "en"} and len(got[4].messages) == 5


def test_D1_valid_prompt_and_feedback_kinds(tmp_path: Path) -> None:
    prompts = load_records(write(tmp_path / "p.jsonl", jsonl({"messages": [user("a")]}, {"prompt": "b"})), "prompt")
    assert prompts == [Prompt("p:1", [user("a")]), Prompt("p:2", [user("b")])]
    ranking = load_records(write(tmp_path / "r.jsonl", jsonl({"prompt": "a", "responses": ["x", [bot("y")]]})), "ranking")
    assert ranking == [Ranking("r:1", [user("a")], ["x", "y"])]
    rating = load_records(write(tmp_path / "s.jsonl", jsonl({"prompt": "a", "response": "b", "scores": {"h": 4}, "flags": ["rude"]})), "rating")
    assert rating == [Rating("s:1", [user("a")], "b", {"h": 4.0}, ["rude"])]
    edit = load_records(write(tmp_path / "e.jsonl", jsonl({"prompt": "a", "original": "b", "edited": "c"})), "edit")
    assert edit == [Edit("e:1", [user("a")], "b", "c")]
    thumb = load_records(write(tmp_path / "t.jsonl", jsonl({"prompt": "a", "response": "b", "up": False})), "thumb")
    assert thumb == [Thumb("t:1", [user("a")], "b", False)]


def test_D1_field_map_renames_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", jsonl({"question": "Q", "good": "x", "bad": "y"}))
    got = load_records(path, "pair", field_map={"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert got == [PreferencePair("a:1", [user("Q")], "x", "y")]


def test_unknown_kind_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        load_records(tmp_path / "a.jsonl", "dpo")
    with pytest.raises(ValueError, match="unknown format"):
        load_records(write(tmp_path / "a.txt", "x"), "sft")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl", "sft")


def test_D1_blank_lines_and_bom_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jsonl", b"\xef\xbb\xbf" + jsonl(SFT).encode() + b"\n  \r\n" + jsonl(sft()).encode())
    got = load_records(path, "sft")
    assert [r.id for r in got] == ["s1", "s2"]


# ---------------------------------------------------------------------------------------------------------
# Round trip: the same records through every format.

RECORDS: dict[str, list[Any]] = {
    "sft": [SFTExample(f"s{i}", [user(f"q{i}"), bot(f"a {i} ☃")], {"src": "t", "n": i}) for i in range(3)],
    "prompt": [Prompt(f"p{i}", [{"role": "system", "content": "S"}, user(f"q{i}")], {"src": "t", "n": i}) for i in range(3)],
    "pair": [PreferencePair(f"d{i}", [user("q"), bot("a"), user(f"q{i}")], f"c{i}", "r", float(i) if i else None, "s", {"src": "t", "n": i}) for i in range(3)],
    "ranking": [Ranking(f"r{i}", [user("q")], ["a", "b", f"c{i}"], {"src": "t", "n": i}) for i in range(3)],
    "rating": [Rating(f"g{i}", [user("q")], "a", {"helpful": 1.5 + i, "harmless": 5.0}, ["x"] * i, {"src": "t", "n": i}) for i in range(3)],
    "edit": [Edit(f"e{i}", [user("q")], "a", f"b{i}", {"src": "t", "n": i}) for i in range(3)],
    "thumb": [Thumb(f"t{i}", [user("q")], f"a{i}", i % 2 == 0, {"src": "t", "n": i}) for i in range(3)],
}


def _csv_cell(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


def _write_all_formats(rows: list[dict[str, Any]], root: Path) -> list[Path]:
    import datasets

    paths = [root / "r.jsonl", root / "r.json", root / "r.csv", root / "r.parquet", root / "r_hf"]
    write(paths[0], jsonl(*rows))
    write(paths[1], json.dumps(rows, indent=2))
    with paths[2].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in rows)
    write(paths[3], rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(paths[4]))
    return paths


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_D1_round_trip_every_format_gives_identical_records(kind: str, tmp_path: Path) -> None:
    records = RECORDS[kind]
    validate_records(records)
    for path in _write_all_formats([dataclasses.asdict(r) for r in records], tmp_path):
        got = load_records(path, kind)
        assert got == records, path.name


def test_D1_trl_rows_load_identically_from_every_format(tmp_path: Path) -> None:
    rows = [{"prompt": [user(f"q{i}")], "chosen": [bot("yes")], "rejected": [bot("no")]} for i in range(3)]
    loaded = [load_records(p, "pair") for p in _write_all_formats(rows, tmp_path)]
    assert all([r.prompt for r in got] == [[user(f"q{i}")] for i in range(3)] for got in loaded)
    assert all([(r.chosen, r.rejected) for r in got] == [("yes", "no")] * 3 for got in loaded)


def test_datasets_dict_folder_needs_a_split(tmp_path: Path) -> None:
    import datasets

    rows = [dataclasses.asdict(r) for r in RECORDS["sft"]]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "dd", "sft", split="test") == RECORDS["sft"][:1]
    with pytest.raises(ValueError, match="split"):
        load_records(tmp_path / "dd", "sft")


# ---------------------------------------------------------------------------------------------------------
# validate_records: the loader's rules on in-memory records.


def test_D1_validate_records_applies_the_same_rules() -> None:
    validate_records([r for rs in RECORDS.values() for r in rs])
    cases = [
        (SFTExample("a", [user("x")]), "D106", "messages[0].role"),
        (PreferencePair("a", [user("x")], "y", 5), "D103", "rejected"),  # type: ignore[arg-type]
        (PreferencePair("a", [user("x")], "y", "z", margin=-1.0), "D109", "margin"),
        (Thumb("a", [user("x")], "y", None), "D102", "up"),  # type: ignore[arg-type]
        (Prompt("", [user("x")]), "D104", "id"),
        ({"id": "a"}, "D103", "<row>"),
    ]
    for record, code, fld in cases:
        with pytest.raises(DataError) as info:
            validate_records([Prompt("ok", [user("x")]), record], source="mem")  # type: ignore[list-item]
        assert (info.value.code, info.value.field, info.value.line, info.value.path) == (code, fld, 2, "mem")
    with pytest.raises(DataError) as info:
        validate_records([Prompt("a", [user("x")]), Prompt("a", [user("y")])])
    assert info.value.code == "D107"


# ---------------------------------------------------------------------------------------------------------
# Real data next to the repository (never copied into it).




def test_D1_hh_rlhf_harmless_test_pairs_load() -> None:
    pairs = load_records(shared("hh-rlhf/pairs-harmless-test.jsonl"), "pair")
    assert len(pairs) == 1299 and pairs[0].id == "harmless-base-test-000000"
    assert len({p.id for p in pairs}) == len(pairs)
    assert all(p.prompt[-1]["role"] == "user" and p.chosen != p.rejected for p in pairs)
    assert {p.meta["source"] for p in pairs} == {"hh-rlhf/harmless-base"}
    assert sum(len(p.prompt) == 1 for p in pairs) == 390


# ---------------------------------------------------------------------------------------------------------
# D4: length-bucketed batches.


@settings(max_examples=1000, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 512), max_size=300),
    batch_size=st.integers(1, 16),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 100),
    multiplier=st.integers(1, 8),
    drop_last=st.booleans(),
)
def test_D4_bucketed_batches_are_a_permutation(
    lengths: list[int], batch_size: int, seed: int, epoch: int, multiplier: int, drop_last: bool
) -> None:
    batches = length_bucketed_batches(lengths, batch_size, seed, epoch, multiplier, drop_last)
    assert batches == length_bucketed_batches(lengths, batch_size, seed, epoch, multiplier, drop_last)
    flat = [i for b in batches for i in b]
    n, remainder = len(lengths), len(lengths) % batch_size
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(n))
    assert len(flat) == (n - remainder if drop_last else n)
    assert all(0 < len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= (0 if drop_last else 1)


def test_D4_bucketing_cuts_padding_and_reshuffles_each_epoch() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(1, 1000) for _ in range(2000)]

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    bucketed = length_bucketed_batches(lengths, 8, seed=1, epoch=0)
    unsorted = length_bucketed_batches(lengths, 8, seed=1, epoch=0, bucket_size_multiplier=1)
    assert padding(bucketed) < 0.1 * padding(unsorted)
    assert bucketed != length_bucketed_batches(lengths, 8, seed=1, epoch=1)
    assert bucketed != length_bucketed_batches(lengths, 8, seed=2, epoch=0)
