"""Record types shared by training, the sandbox and the feedback app; loaders and validation.

Every record is a frozen dataclass with a stable `id` and a free-form `meta` dict. A conversation is a
list of `{"role": ..., "content": ...}` messages with roles `system` (optional, first), then `user` and
`assistant` alternating.

Loading (`load_records(path_or_name, kind)`): `.jsonl`, `.json` (a list of objects), `.csv`, `.parquet`,
a folder written by `datasets.Dataset.save_to_disk`, or a Hugging Face hub name. Accepted row shapes:

- ours: `{"id", "messages", "meta"}` (sft, prompt); `{"id", "prompt", "chosen", "rejected", "margin"?,
  "strength"?}` (pair), `"responses"` (ranking), `"response", "scores", "flags"?` (rating),
  `"original", "edited"` (edit), `"response", "up"` (thumb). A `prompt` is a string (one user turn) or a
  message list ending with a user turn; a response is a string or a list of one assistant message.
- TRL conversational: `{"prompt": [msgs], "completion": [msgs]}` (sft), `{"prompt", "chosen", "rejected"}`.
- plain: `{"prompt": str, "response": str}` (sft).

`id` is optional: a missing one becomes `"<file stem>:<line>"`. `null` counts as absent. Columns outside
the shape are kept in `meta`. `field_map` renames input columns first (`{"question": "prompt"}`). CSV
cells are text: an empty cell is absent; `messages`, `responses`, `scores`, `flags`, `meta`, `margin`, `up`
cells are JSON, and a prompt or response cell starting with `[{` is a JSON message list. `line` in errors is
the file line for JSONL, JSON and CSV, and the 1-based row number for Parquet and `datasets`.

Validation is strict and all-or-nothing: the first bad row raises `DataError`, whose message reads
`file:line[:col]: D10x name: field 'f': detail`, and nothing is returned. No value is coerced (a number is
not a string); the only conversion is int -> float for margins and scores. Codes (stable, see ERROR_CODES):
D101 bad-json (also CSV syntax), D102 missing-field (or null), D103 wrong-type, D104 empty (empty or
whitespace-only string, empty list), D105 bad-role, D106 bad-turn-order (not system?, user, assistant, ...
or a wrong last turn: SFT ends with assistant, prompts with user), D107 duplicate-id, D108 bad-unicode
(invalid UTF-8, lone surrogate, NUL), D109 bad-value (negative or non-finite margin, < 2 or repeated ranked
responses, identical chosen/rejected or original/edited, conflicting columns), D110 too-long
(truncation="error"), D111 special-token (content holds a special-token string such as `<|eos|>`).

Conversions between feedback kinds live in `preferences.py`; chat formatting, tokenisation with prompt
masking and batching in `tokenization.py`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, overload

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SFTExample:
    """A demonstration: a conversation whose assistant turns are the training targets."""

    id: str
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prompt:
    """A conversation that ends with a user turn, waiting for a response."""

    id: str
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PreferencePair:
    """`chosen` preferred over `rejected` for `prompt`; `margin` (>= 0) or `strength` say by how much."""

    id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    margin: float | None = None
    strength: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ranking:
    """K responses to one prompt, best first."""

    id: str
    prompt: list[Message]
    responses: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rating:
    """Scores for one response, by axis (e.g. helpful/honest/harmless on 1-5), with optional flags."""

    id: str
    prompt: list[Message]
    response: str
    scores: dict[str, float]
    flags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Edit:
    """A person rewrote `original` into `edited`: the edit is preferred over the original."""

    id: str
    prompt: list[Message]
    original: str
    edited: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Thumb:
    """An unpaired judgement of one response: up (desirable) or down (undesirable)."""

    id: str
    prompt: list[Message]
    response: str
    up: bool
    meta: dict[str, Any] = field(default_factory=dict)


Record = SFTExample | Prompt | PreferencePair | Ranking | Rating | Edit | Thumb
Kind = Literal["sft", "prompt", "pair", "ranking", "rating", "edit", "thumb"]
RECORD_TYPES: dict[str, type] = {
    "sft": SFTExample, "prompt": Prompt, "pair": PreferencePair, "ranking": Ranking,
    "rating": Rating, "edit": Edit, "thumb": Thumb,
}
_KIND_OF = {cls: kind for kind, cls in RECORD_TYPES.items()}

ERROR_CODES = {
    "D101": "bad-json", "D102": "missing-field", "D103": "wrong-type", "D104": "empty", "D105": "bad-role",
    "D106": "bad-turn-order", "D107": "duplicate-id", "D108": "bad-unicode", "D109": "bad-value",
    "D110": "too-long", "D111": "special-token",
}


class DataError(ValueError):
    """A record breaks a data rule. Attributes: code ("D101"), name, detail, path, line, col, field, record_id."""

    def __init__(
        self, code: str, detail: str, *, path: str | None = None, line: int | None = None,
        col: int | None = None, field: str | None = None, record_id: str | None = None,
    ) -> None:
        self.code, self.name, self.detail = code, ERROR_CODES[code], detail
        self.path, self.line, self.col, self.field, self.record_id = path, line, col, field, record_id
        where = ":".join(str(p) for p in (path or "<memory>", line, col) if p is not None)
        what = (f"field {field!r}: " if field else "") + (f"id {record_id!r}: " if record_id else "")
        super().__init__(f"{where}: {code} {self.name}: {what}{detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        keys = ("path", "line", "col", "field", "record_id")
        return (_rebuild_error, (self.code, self.detail, {k: getattr(self, k) for k in keys}))


def _rebuild_error(code: str, detail: str, kwargs: dict[str, Any]) -> DataError:
    return DataError(code, detail, **kwargs)


class _Bad(Exception):
    """A rule broken inside one row; the caller adds where (path, line) and raises DataError."""

    def __init__(self, code: str, fld: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.field, self.detail = code, fld, detail


def _fail(code: str, fld: str, detail: str) -> NoReturn:
    raise _Bad(code, fld, detail)


def _tname(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ---------------------------------------------------------------------------------------------------------
# Field checks: each returns the clean value or raises _Bad naming the field.


def _text(value: Any, fld: str) -> str:
    if not isinstance(value, str):
        _fail("D103", fld, f"expected a string, got {_tname(value)}")
    if not value.strip():
        _fail("D104", fld, "empty or whitespace-only string")
    if "\x00" in value:
        _fail("D108", fld, "NUL character in text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        _fail("D108", fld, f"lone surrogate at character {err.start}")
    return value


def _number(value: Any, fld: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail("D103", fld, f"expected a number, got {_tname(value)}")
    if not math.isfinite(value):
        _fail("D109", fld, f"expected a finite number, got {value}")
    return float(value)


def _message(value: Any, fld: str) -> Message:
    if not isinstance(value, dict):
        _fail("D103", fld, f"expected a message object, got {_tname(value)}")
    for key in ("role", "content"):
        if value.get(key) is None:
            _fail("D102", f"{fld}.{key}", "required field is missing or null")
    extra = sorted(str(k) for k, v in value.items() if k not in ("role", "content") and v is not None)
    if extra:
        _fail("D103", fld, f"unexpected message keys {extra}")
    role = value["role"]
    if not isinstance(role, str):
        _fail("D103", f"{fld}.role", f"expected a string, got {_tname(role)}")
    if role not in ROLES:
        _fail("D105", f"{fld}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return {"role": role, "content": _text(value["content"], f"{fld}.content")}


def _msgs(value: Any, fld: str, text_role: str | None) -> list[tuple[Message, str]]:
    """Messages with their field names; a string becomes one `text_role` turn (when allowed)."""
    if isinstance(value, str) and text_role is not None:
        return [({"role": text_role, "content": _text(value, fld)}, fld)]
    if not isinstance(value, list):
        _fail("D103", fld, f"expected {'a string or ' if text_role else ''}a list of messages, got {_tname(value)}")
    if not value:
        _fail("D104", fld, "empty message list")
    return [(_message(m, f"{fld}[{i}]"), f"{fld}[{i}]") for i, m in enumerate(value)]


def _turns(items: list[tuple[Message, str]], end: str) -> list[Message]:
    """Check optional system, then user/assistant alternating, ending with `end`."""
    first = 1 if items[0][0]["role"] == "system" else 0
    for k in range(first, len(items)):
        want, (msg, name) = ("user", "assistant")[(k - first) % 2], items[k]
        if msg["role"] != want:
            _fail("D106", f"{name}.role", f"expected {want!r} (optional system first, then user and "
                  f"assistant alternating), got {msg['role']!r}")
    if len(items) == first or items[-1][0]["role"] != end:
        _fail("D106", f"{items[-1][1]}.role", f"the conversation must end with a {end!r} turn")
    return [m for m, _ in items]


def _response(value: Any, fld: str) -> str:
    """A response: a string, or a list holding exactly one assistant message (TRL conversational)."""
    if not isinstance(value, list):
        return _text(value, fld)
    if len(value) != 1:
        _fail("D103", fld, f"expected a string or a list of one assistant message, got {len(value)} items")
    msg = _message(value[0], f"{fld}[0]")
    if msg["role"] != "assistant":
        _fail("D105", f"{fld}[0].role", f"a response must have role 'assistant', got {msg['role']!r}")
    return msg["content"]


# ---------------------------------------------------------------------------------------------------------
# Row -> record, one builder per kind.


class _Row:
    """A row with nulls removed; remembers which columns the builder used (the rest go to meta)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = {k: v for k, v in data.items() if v is not None}
        self.used = {"id", "meta"}

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def req(self, key: str, hint: str = "") -> Any:
        if key not in self.data:
            _fail("D102", key, "required field is missing or null" + hint)
        return self.get(key)

    def one_of(self, *keys: str) -> str:
        present = [k for k in keys if k in self.data]
        if len(present) > 1:
            _fail("D109", present[1], f"give only one of {present}")
        return present[0] if present else keys[0]


def _prompt(r: _Row) -> list[Message]:
    return _turns(_msgs(r.req("prompt"), "prompt", "user"), "user")


def _build_sft(r: _Row) -> dict[str, Any]:
    if r.one_of("messages", "prompt") == "messages":
        return {"messages": _turns(_msgs(r.req("messages", " (or give 'prompt' + 'completion')"), "messages", None), "assistant")}
    answer = r.one_of("completion", "response")
    items = _msgs(r.req("prompt"), "prompt", "user") + _msgs(r.req(answer), answer, "assistant")
    return {"messages": _turns(items, "assistant")}


def _build_prompt(r: _Row) -> dict[str, Any]:
    if r.one_of("messages", "prompt") == "messages":
        return {"messages": _turns(_msgs(r.req("messages", " (or give 'prompt')"), "messages", None), "user")}
    return {"messages": _prompt(r)}


def _build_pair(r: _Row) -> dict[str, Any]:
    prompt, chosen, rejected = _prompt(r), _response(r.req("chosen"), "chosen"), _response(r.req("rejected"), "rejected")
    if chosen == rejected:
        _fail("D109", "rejected", "chosen and rejected are identical")
    margin = r.get("margin")
    if margin is not None and (margin := _number(margin, "margin")) < 0:
        _fail("D109", "margin", f"margin must be >= 0, got {margin}")
    strength = r.get("strength")
    strength = None if strength is None else _text(strength, "strength")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin, "strength": strength}


def _build_ranking(r: _Row) -> dict[str, Any]:
    prompt, raw = _prompt(r), r.req("responses")
    if not isinstance(raw, list):
        _fail("D103", "responses", f"expected a list of responses, got {_tname(raw)}")
    responses = [_response(v, f"responses[{i}]") for i, v in enumerate(raw)]
    if len(responses) < 2:
        _fail("D109", "responses", f"a ranking needs at least 2 responses, got {len(responses)}")
    for i, text in enumerate(responses):
        if text in responses[:i]:
            _fail("D109", f"responses[{i}]", f"duplicate of responses[{responses.index(text)}]")
    return {"prompt": prompt, "responses": responses}


def _build_rating(r: _Row) -> dict[str, Any]:
    prompt, response, raw = _prompt(r), _response(r.req("response"), "response"), r.req("scores")
    if not isinstance(raw, dict):
        _fail("D103", "scores", f"expected an object of axis -> number, got {_tname(raw)}")
    scores = {_text(k, "scores"): _number(v, f"scores.{k}") for k, v in raw.items() if v is not None}
    if not scores:
        _fail("D104", "scores", "no scores")
    flags = r.get("flags") or []
    if not isinstance(flags, list):
        _fail("D103", "flags", f"expected a list of strings, got {_tname(flags)}")
    return {"prompt": prompt, "response": response, "scores": scores,
            "flags": [_text(f, f"flags[{i}]") for i, f in enumerate(flags)]}


def _build_edit(r: _Row) -> dict[str, Any]:
    prompt, original, edited = _prompt(r), _response(r.req("original"), "original"), _response(r.req("edited"), "edited")
    if original == edited:
        _fail("D109", "edited", "edited is identical to original")
    return {"prompt": prompt, "original": original, "edited": edited}


def _build_thumb(r: _Row) -> dict[str, Any]:
    prompt, response, up = _prompt(r), _response(r.req("response"), "response"), r.req("up")
    if not isinstance(up, bool):
        _fail("D103", "up", f"expected true or false, got {_tname(up)}")
    return {"prompt": prompt, "response": response, "up": up}


_BUILDERS = {
    "sft": _build_sft, "prompt": _build_prompt, "pair": _build_pair, "ranking": _build_ranking,
    "rating": _build_rating, "edit": _build_edit, "thumb": _build_thumb,
}


def _parse(kind: str, raw: Any, default_id: str | None) -> Record:
    if not isinstance(raw, dict):
        _fail("D103", "<row>", f"expected an object, got {_tname(raw)}")
    r = _Row(raw)
    if r.has("id"):
        rid = _text(r.data["id"], "id")
    elif default_id is None:
        _fail("D102", "id", "required field is missing or null")
    else:
        rid = default_id
    fields = _BUILDERS[kind](r)
    meta = r.data.get("meta", {})
    if not isinstance(meta, dict):
        _fail("D103", "meta", f"expected an object, got {_tname(meta)}")
    extra = {k: v for k, v in r.data.items() if k not in r.used}
    for key in extra:
        if key in meta:
            _fail("D109", key, "column also present in meta")
    return RECORD_TYPES[kind](id=rid, meta={**meta, **extra}, **fields)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------------------
# Readers: (line, raw row) pairs. Syntax errors raise DataError directly.

_WS = re.compile(r"[ \t\r\n]*")
_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_JSON_CELLS = {"messages", "responses", "scores", "flags", "meta", "margin", "up"}
_MESSAGE_LIST = re.compile(r"\s*\[\s*\{")
_TEXT_OR_LIST_CELLS = {"prompt", "chosen", "rejected", "completion", "response", "original", "edited"}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        col = err.start - data.rfind(b"\n", 0, err.start)
        raise DataError("D108", f"invalid UTF-8 byte {data[err.start]:#04x}", path=path, line=line, col=col) from None


def _jsonl_rows(path: str) -> list[tuple[int, Any]]:
    rows = []
    for line, text in enumerate(_decode(Path(path).read_bytes(), path).split("\n"), 1):
        if text.strip():
            try:
                rows.append((line, json.loads(text, parse_constant=_no_constant)))
            except json.JSONDecodeError as err:
                raise DataError("D101", err.msg, path=path, line=line + err.lineno - 1, col=err.colno) from None
            except (ValueError, RecursionError) as err:
                raise DataError("D101", str(err) or "nested too deeply", path=path, line=line) from None
    return rows


def _json_rows(path: str) -> list[tuple[int, Any]]:
    """A JSON list of objects, each tagged with the line it starts on."""
    text, decoder, rows = _decode(Path(path).read_bytes(), path), json.JSONDecoder(parse_constant=_no_constant), []

    def error(code: str, i: int, detail: str, fld: str | None = None) -> DataError:
        line, col = text.count("\n", 0, i) + 1, i - text.rfind("\n", 0, i)
        return DataError(code, detail, path=path, line=line, col=col, field=fld)

    i = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if text[i : i + 1] != "[":
        raise error("D103", i, "a .json file must hold a list of objects", "<file>")
    i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    while text[i : i + 1] != "]":
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise error("D101", err.pos, err.msg) from None
        except (ValueError, RecursionError) as err:
            raise error("D101", i, str(err) or "nested too deeply") from None
        rows.append((text.count("\n", 0, i) + 1, obj))
        i = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[i : i + 1] == ",":
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
            if text[i : i + 1] == "]":
                raise error("D101", i, "trailing comma before ']'")
        elif text[i : i + 1] != "]":
            raise error("D101", i, "expected ',' or ']'")
    if _WS.match(text, i + 1).end() != len(text):  # type: ignore[union-attr]
        raise error("D101", i + 1, "extra data after the list")
    return rows


def _csv_rows(path: str) -> tuple[list[str], list[tuple[int, Any]]]:
    reader = csv.reader(io.StringIO(_decode(Path(path).read_bytes(), path), newline=""))
    rows, header = [], []
    try:
        header = next(reader, [])
        if not header or len(set(header)) != len(header):
            raise DataError("D101", f"missing or repeated column names in the header {header}", path=path, line=1)
        start = reader.line_num + 1
        for cells in reader:
            if cells and len(cells) != len(header):
                raise DataError("D101", f"row has {len(cells)} cells, the header {len(header)}", path=path, line=start)
            if cells:
                rows.append((start, dict(zip(header, cells, strict=True))))
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataError("D101", str(err), path=path, line=reader.line_num) from None
    return header, rows


def _csv_cells(row: dict[str, str]) -> dict[str, Any]:
    """Typed values from CSV text: empty cells are absent, structured cells are JSON."""
    out: dict[str, Any] = {}
    for key, cell in row.items():
        if cell == "":
            continue
        if key in _JSON_CELLS or (key in _TEXT_OR_LIST_CELLS and _MESSAGE_LIST.match(cell)):
            try:
                out[key] = json.loads(cell, parse_constant=_no_constant)
            except (ValueError, RecursionError) as err:
                _fail("D101", key, f"cell is not valid JSON: {err}")
        else:
            out[key] = cell
    return out


def _parquet_rows(path: str) -> list[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as err:
        raise DataError("D101", f"not a readable Parquet file: {err}", path=path) from None
    return list(enumerate(table.to_pylist(), 1))


def _datasets_rows(name: str, split: str | None, local: bool) -> list[tuple[int, Any]]:
    import datasets

    ds = datasets.load_from_disk(name) if local else datasets.load_dataset(name, split=split or "train")
    if isinstance(ds, datasets.DatasetDict):
        split = split or (next(iter(ds)) if len(ds) == 1 else None)
        if split not in ds:
            raise ValueError(f"{name}: pass split= one of {sorted(ds)}")
        ds = ds[split]
    return list(enumerate(ds.to_list(), 1))


def _read(name: str, split: str | None) -> tuple[str, str, list[tuple[int, Any]], list[str] | None]:
    """(source for errors, stem for derived ids, rows, CSV header or None) of a file, a saved `datasets`
    folder or a hub data set."""
    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        return name, path.stem, _datasets_rows(str(path), split, local=True), None
    if path.is_file():
        if suffix == ".jsonl":
            return name, path.stem, _jsonl_rows(str(path)), None
        if suffix == ".json":
            return name, path.stem, _json_rows(str(path)), None
        if suffix == ".csv":
            header, rows = _csv_rows(str(path))
            return name, path.stem, rows, header
        if suffix == ".parquet":
            return name, path.stem, _parquet_rows(str(path)), None
        raise ValueError(f"{name}: unknown format {suffix!r}; expected one of {_SUFFIXES} or a datasets folder")
    if suffix in _SUFFIXES or name.startswith(("/", ".", "~")):
        raise FileNotFoundError(name)
    source = f"{name}/{split or 'train'}"
    return source, source, _datasets_rows(name, split, local=False), None


@overload
def load_records(path_or_name: str | Path, kind: Literal["sft"], *, split: str | None = ..., field_map: Mapping[str, str] | None = ...) -> list[SFTExample]: ...
@overload
def load_records(path_or_name: str | Path, kind: Literal["prompt"], *, split: str | None = ..., field_map: Mapping[str, str] | None = ...) -> list[Prompt]: ...
@overload
def load_records(path_or_name: str | Path, kind: Literal["pair"], *, split: str | None = ..., field_map: Mapping[str, str] | None = ...) -> list[PreferencePair]: ...
@overload
def load_records(path_or_name: str | Path, kind: Literal["ranking"], *, split: str | None = ..., field_map: Mapping[str, str] | None = ...) -> list[Ranking]: ...
@overload
def load_records(path_or_name: str | Path, kind: Literal["rating"], *, split: str | None = ..., field_map: Mapping[str, str] | None = ...) -> list[Rating]: ...
@overload
def load_records(path_or_name: str | Path, kind: Literal["edit"], *, split: str | None = ..., field_map: Mapping[str, str] | None = ...) -> list[Edit]: ...
@overload
def load_records(path_or_name: str | Path, kind: Literal["thumb"], *, split: str | None = ..., field_map: Mapping[str, str] | None = ...) -> list[Thumb]: ...
@overload
def load_records(path_or_name: str | Path, kind: str, *, split: str | None = ..., field_map: Mapping[str, str] | None = ...) -> list[Record]: ...
def load_records(
    path_or_name: str | Path, kind: str, *, split: str | None = None, field_map: Mapping[str, str] | None = None
) -> list[Any]:
    """Load and validate every row of a file or data set as `kind` records; the first bad row raises DataError.

    `split` picks a split of a `datasets` folder or hub data set (ignored for single files); `field_map`
    renames input columns before validation. Rows without an `id` get `"<file stem>:<line>"`.
    """
    if kind not in RECORD_TYPES:
        raise ValueError(f"kind must be one of {sorted(RECORD_TYPES)}, got {kind!r}")
    name = str(path_or_name)
    source, stem, rows, header = _read(name, split)
    fmap = dict(field_map or {})
    records: list[Record] = []
    seen: dict[str, int] = {}
    for line, raw in rows:
        try:
            row = _renamed(raw, fmap)
            rec = _parse(kind, _csv_cells(row) if header is not None else row, f"{stem}:{line}")
        except _Bad as bad:
            col = _column(source, header, fmap, line, bad.field)
            raise DataError(bad.code, bad.detail, path=source, line=line, col=col, field=bad.field) from None
        if rec.id in seen:
            col = _column(source, header, fmap, line, "id")
            raise DataError("D107", f"id already used on line {seen[rec.id]}", path=source, line=line, col=col,
                            field="id", record_id=rec.id)
        seen[rec.id] = line
        records.append(rec)
    logger.info("loaded %d %s records from %s", len(records), kind, source)
    return records


def _renamed(raw: Any, fmap: dict[str, str]) -> Any:
    if not isinstance(raw, dict) or not fmap:
        return raw
    row = dict(raw)
    for src, dst in fmap.items():
        if src in row:
            if row.get(dst) is not None:
                _fail("D109", dst, f"field_map renames {src!r} onto a column that already exists")
            row[dst] = row.pop(src)
    return row


def _column(source: str, header: list[str] | None, fmap: dict[str, str], line: int, fld: str) -> int | None:
    """1-based column of a field's input column (CSV) or key (JSON Lines, JSON: if on the row's first line),
    for the error location; only computed once a row has failed."""
    root = re.split(r"[.\[]", fld, maxsplit=1)[0]
    original = next((src for src, dst in fmap.items() if dst == root), root)
    if header is not None:
        return header.index(original) + 1 if original in header else None
    if not source.lower().endswith((".jsonl", ".json")):
        return None
    text = Path(source).expanduser().read_text(encoding="utf-8-sig").split("\n")[line - 1]
    found = re.search(re.escape(json.dumps(original)) + r"\s*:", text)
    return found.start() + 1 if found else None


def validate_records(records: Iterable[Record], *, source: str = "<memory>") -> None:
    """Apply the loader's rules to in-memory records (types, turns, text, unique ids); raise DataError."""
    seen: dict[str, int] = {}
    for line, rec in enumerate(records, 1):
        rid = getattr(rec, "id", None)
        try:
            kind = _KIND_OF.get(type(rec))
            if kind is None:
                _fail("D103", "<row>", f"expected a record (SFTExample, PreferencePair, ...), got {_tname(rec)}")
            _parse(kind, dataclasses.asdict(rec), None)
        except _Bad as bad:
            rid = rid if isinstance(rid, str) else None
            raise DataError(bad.code, bad.detail, path=source, line=line, field=bad.field, record_id=rid) from None
        if rec.id in seen:
            raise DataError("D107", f"id already used by record {seen[rec.id]}", path=source, line=line, field="id", record_id=rec.id)
        seen[rec.id] = line
