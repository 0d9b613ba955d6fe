"""The sandbox: an embedded, seeded assistant world with a gold judge (see docs/judge.md)."""

from alignloop.sandbox.judge import GoldJudge, JudgeScores
from alignloop.sandbox.world import SandboxConfig, World, build_world, load_world, write_world

__all__ = ["GoldJudge", "JudgeScores", "SandboxConfig", "World", "build_world", "load_world", "write_world"]
