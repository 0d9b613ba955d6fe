"""Fixtures of the sandbox tests."""

from __future__ import annotations

import pytest
from sandbox_worlds import world_for

from alignloop.sandbox import GoldJudge, World


@pytest.fixture(scope="session")
def world() -> World:
    return world_for("seed0")


@pytest.fixture(scope="session")
def judge(world: World) -> GoldJudge:
    return GoldJudge(world)
