"""Request and response bodies of the JSON API (they make up its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignloop.preferences import ConversionReport


class ProjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    guidelines: str = Field("", max_length=100_000, description="Shown to annotators above every item (plain text).")
    overlap_k: int = Field(1, ge=1, le=100, description="How many annotators label each item.")
    annotators: list[str] = Field(default_factory=list, description="User names allowed to label it.")


class ProjectOut(BaseModel):
    id: int
    name: str
    guidelines: str
    overlap_k: int
    task: str


class MemberIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str


class ItemsIn(BaseModel):
    """A batch of items, each shaped like one line of the JSONL import (see docs/feedback.md)."""

    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)


class ItemsOut(BaseModel):
    created: int


class Progress(BaseModel):
    project: str
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


class ErrorOut(BaseModel):
    detail: str
    code: str | None = None
    line: int | None = None
    field: str | None = None
