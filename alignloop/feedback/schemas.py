"""Request and response bodies of the JSON API (they make up its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from annotated_types import Interval
from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignloop.feedback.conversations import TEST_MESSAGE
from alignloop.preferences import ConversionReport

MAX_ROW_ID = 2**31 - 1
RowId = Annotated[int, Interval(ge=1, le=MAX_ROW_ID)]
"""A row id from a URL or a form. Ids are PostgreSQL `integer`s (SQLite's are 64-bit): a larger number
cannot even be a query parameter there (a 500), so it is refused with 422 like any malformed value."""


def _nul_at(value: Any, where: str) -> str | None:
    """Where the first NUL character in a JSON value is (keys included), or None."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, BaseModel):
        value = dict(value)
    if isinstance(value, dict):
        if any("\x00" in str(k) for k in value):
            return f"{where} (a key)"
        return next((found for k, v in value.items() if (found := _nul_at(v, f"{where}.{k}"))), None)
    if isinstance(value, list):
        return next((found for i, v in enumerate(value) if (found := _nul_at(v, f"{where}[{i}]"))), None)
    return None


class Body(BaseModel):
    """A request body: unknown fields are refused, and so is a NUL character anywhere in its text, which
    PostgreSQL cannot store (it would fail as a 500 there and be kept in SQLite)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _no_nul(self) -> Body:
        if (where := _nul_at(self, "body")) is not None:
            raise ValueError(f"{where}: text must not contain NUL characters")
        return self


class ProjectIn(Body):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "helpfulness-round-2", "overlap_k": 3, "annotators": ["ann", "bob"], "task": "pairwise"}]})

    name: str = Field(min_length=1, max_length=200)
    guidelines: str = Field("", max_length=100_000, description="Shown to annotators above every item (plain text).")
    overlap_k: int = Field(1, ge=1, le=100, description="How many annotators label each item.")
    annotators: list[str] = Field(default_factory=list, description="User names allowed to label it.")
    task: Literal["pairwise", "rank", "rate", "edit", "chat"] = Field(
        "pairwise", description="What annotators do: compare 2 responses, rank 2-9, rate 1 (1-5 on helpful, honest, "
                                "harmless, with flags), edit 1, or chat with the project's model (set it with "
                                "PUT /projects/{id}/model). Fixed once the project exists.")


class ProjectOut(BaseModel):
    id: int
    name: str
    guidelines: str
    overlap_k: int
    task: str
    version: int = Field(description="Raised by every accepted edit; send it back with PATCH /projects/{id}.")


class ProjectEditIn(Body):
    """A change of a project's settings, made from the version the client read (W13: a stale one gets 409)."""

    version: int = Field(ge=1, description="The project's version when you read it.")
    name: str | None = Field(None, min_length=1, max_length=200)
    guidelines: str | None = Field(None, max_length=100_000)
    overlap_k: int | None = Field(None, ge=1, le=100)


class MemberIn(Body):
    model_config = ConfigDict(json_schema_extra={"examples": [{"username": "ann"}]})

    username: str


class ItemsIn(Body):
    """A batch of items, each shaped like one line of the JSONL import (see docs/feedback.md)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"items": [{
        "id": "q1", "prompt": "What is the capital of France?",
        "responses": [{"text": "Paris.", "model": "policy", "version": "v2"},
                      {"text": "Lyon.", "model": "reference", "version": "v1"}]}]}]})

    items: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)


class ItemsOut(BaseModel):
    created: int


class Progress(BaseModel):
    project: str
    task: str
    items: int
    overlap_k: int
    votes: int
    items_complete: int
    skips: int
    votes_per_annotator: dict[str, int]
    agreement: dict[str, float | None]


class LabelsOut(BaseModel):
    kind: str
    records: list[dict[str, Any]]
    report: ConversionReport
    """What each conversion kept and left out, by reason (`preferences.ConversionReport`)."""


class ModelIn(Body):
    """A chat project's model: any OpenAI-compatible server (`alignloop serve`, vLLM, a provider)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"base_url": "http://8.8.8.8:8001/v1", "model": "policy", "n_drafts": 2, "temperature": 0.7}]})

    base_url: str = Field(min_length=1, max_length=2000, description="e.g. http://gpu-box:8001/v1")
    model: str = Field(min_length=1, max_length=200, description="the model name the server serves")
    api_key: str | None = Field(None, max_length=4096, description="sent as a bearer token; never returned. "
                                "Left out: the stored key stays; null: it is removed.")
    n_drafts: int = Field(2, ge=1, le=9, description="drafts per turn (one digit key each)")
    temperature: float | None = Field(None, ge=0, le=2, description="null: the server's default")
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    timeout_s: float = Field(60.0, ge=1, le=600, description="how long one request for drafts may take")


class ModelOut(BaseModel):
    base_url: str | None
    model: str | None
    api_key_set: bool
    n_drafts: int | None
    temperature: float | None
    top_p: float | None
    max_tokens: int | None
    timeout_s: float | None


class ModelTestIn(Body):
    message: str = Field(TEST_MESSAGE, min_length=1, max_length=20_000)


class ModelTestOut(BaseModel):
    """One draft for the test message, with what produced it (`version`: the server's system_fingerprint)."""

    text: str
    model: str
    version: str | None
    finish_reason: str | None
    ms: int


class ErrorOut(BaseModel):
    detail: str
    code: str | None = None
    line: int | None = None
    field: str | None = None


class CohenPair(BaseModel):
    a: str
    b: str
    kappa: float | None
    shared_units: int


class Agreement(BaseModel):
    """Over the task's units (docs/feedback.md): Krippendorff's alpha on every unit with 2+ labels, Fleiss'
    kappa on the units with exactly `fleiss_n` labels, Cohen's kappa per annotator pair on shared units."""

    units: int
    units_shared: int
    level: str
    krippendorff_alpha: float | None
    percent_agreement: float | None
    fleiss_kappa: float | None
    fleiss_units: int
    fleiss_n: int
    cohen: list[CohenPair]


class AnnotatorQuality(BaseModel):
    annotator: str
    answers: int
    consensus_agreement: float | None
    consensus_units: int
    gold_agreement: float | None
    gold_units: int
    median_ms: float | None
    position_bias: float | None
    """Share of stated preferences for the response shown first (pairwise: left); None for rate and edit."""
    position_votes: int


class QualityOut(BaseModel):
    project: str
    task: str
    answers: int
    gold_items: int
    agreement: Agreement
    annotators: list[AnnotatorQuality]
    position_bias: float | None
    position_chance: float | None
