"""The real data sets beside the repository (../shared/data): read in place, never copied in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared(relative: str) -> Path:
    """Path of a shared data file; skips the test where it is absent, but fails under CI (CI=true)."""
    path = SHARED_DATA / relative
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing and CI=true")
        pytest.skip(f"{path} is absent (shared test data lives next to the repository)")
    return path
