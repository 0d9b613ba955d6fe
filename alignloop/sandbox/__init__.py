"""The sandbox: an embedded, seeded assistant world with a gold judge (docs/judge.md) and a simulated
annotator panel (docs/annotators.md)."""

from alignloop.sandbox.annotators import Annotator, Panel, panel_profiles
from alignloop.sandbox.judge import GoldJudge, JudgeScores
from alignloop.sandbox.world import (
    AnnotatorConfig,
    PanelConfig,
    SandboxConfig,
    World,
    build_world,
    load_world,
    write_world,
)

__all__ = ["Annotator", "AnnotatorConfig", "GoldJudge", "JudgeScores", "Panel", "PanelConfig", "SandboxConfig",
           "World", "build_world", "load_world", "panel_profiles", "write_world"]
