"""Sandbox worlds shared by the sandbox tests, each built once per session (a fraction of a second)."""

from __future__ import annotations

from alignloop.sandbox import SandboxConfig, World, build_world

# A variant nobody tuned on: fewer people, more gaps, fewer phrasings, more follow-ups and bad demos.
VARIANT = SandboxConfig(seed=11, n_known=15, n_unknown=20, n_cities=3, n_colours=3, n_jobs=4, n_pets=2,
                        missing_share=0.3, max_operand=5, n_templates=3, n_sft_train=3000, n_train_prompts=300,
                        n_eval_prompts=150, multi_turn_share=0.5, bad_demo_share=0.7, helpful_share=0.2,
                        honest_share=0.4, harmless_share=0.4)
SMALL = SandboxConfig(n_known=12, n_unknown=10, n_sft_train=800, n_train_prompts=100, n_eval_prompts=60)
CONFIGS = {"seed0": SandboxConfig(seed=0), "seed1": SandboxConfig(seed=1), "seed2": SandboxConfig(seed=2),
           "variant": VARIANT}
_worlds: dict[str, World] = {}


def world_for(name: str) -> World:
    if name not in _worlds:
        _worlds[name] = build_world(CONFIGS[name])
    return _worlds[name]
