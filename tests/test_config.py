"""Config: defaults, YAML, dotted overrides, errors naming the key, docstrings on every field."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from alignloop.config import (
    ConfigError,
    GenConfig,
    OptimConfig,
    RunConfig,
    describe,
    field_docs,
    load_config,
    parse_overrides,
    save_config,
)
from alignloop.train.sft import SFTConfig


def test_defaults_yaml_then_cli_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n  warmup_steps: 5\nbatch:\n  micro_batch_size: 4\n")
    cfg = load_config(SFTConfig, path, ["--optim.lr", "3e-4", "--run.seed=7"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.warmup_steps == 5
    assert cfg.batch.micro_batch_size == 4
    assert cfg.run.seed == 7
    assert cfg.optim.beta2 == OptimConfig().beta2


def test_derived_sizes_resolved_once(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(SFTConfig, None, ["--batch.micro_batch_size", "8", "--batch.grad_accum_steps", "3"])
    assert (cfg.batch.world_size, cfg.batch.global_batch_size) == (2, 48)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--optim.lrr", "1"], "optim.lrr"),
        (["--nope", "1"], "nope"),
        (["--optim.lr", "fast"], "optim.lr"),
        (["--batch.micro_batch_size", "2.5"], "batch.micro_batch_size"),
        (["--run.resume", "maybe"], "run.resume"),
        (["--run.tensorboard", "3"], "run.tensorboard"),
        (["--model.lora.target_modules", "q_proj"], "model.lora.target_modules"),
        (["--optim.lr"], "optim.lr"),
    ],
)
def test_bad_keys_and_types_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SFTConfig, None, overrides)


def test_yaml_unknown_key_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(SFTConfig, path)


def test_int_accepted_for_float_but_not_bool_for_int():
    assert load_config(OptimConfig, None, ["--lr", "1"]).lr == 1.0
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(OptimConfig, None, ["--warmup_steps", "true"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(SFTConfig, None, ["--optim.lr", "0.002"])
    save_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["optim"]["lr"] == 0.002 and data["batch"]["global_batch_size"] == cfg.batch.global_batch_size
    again = load_config(SFTConfig, tmp_path / "config.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def _all_dataclasses(cls, seen=None):
    seen = seen if seen is not None else set()
    if cls in seen:
        return seen
    seen.add(cls)
    for tp in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(tp):
            _all_dataclasses(tp, seen)
    return seen


@pytest.mark.parametrize("root", [SFTConfig, GenConfig])
def test_every_field_has_a_docstring(root):
    for cls in _all_dataclasses(root):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without docstring: {missing}"


def test_describe_lists_dotted_keys():
    keys = [k for k, _, _ in describe(SFTConfig)]
    assert "optim.lr" in keys and "model.tiny.hidden_size" in keys and "model.lora.r" in keys


def test_parse_overrides_rejects_positional():
    with pytest.raises(ConfigError, match="expected an override"):
        parse_overrides(["lr", "1"])


@pytest.mark.parametrize("name", ["sandbox_sft.yaml", "hf_sft.yaml", "sandbox_reward.yaml", "sandbox_ppo.yaml"])
def test_shipped_configs_load(name):
    from pathlib import Path

    from alignloop.train.ppo import PPOConfig
    from alignloop.train.reward import RewardConfig

    cls = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}[name.removesuffix(".yaml").split("_")[-1]]
    cfg = load_config(cls, Path(__file__).parents[1] / "configs" / name)
    assert cfg.run.output_dir.startswith("runs/")


def test_override_keeps_the_owning_configs_section_defaults():
    """Overriding one key of a section must not reset the section's other keys to the shared class defaults."""
    from alignloop.train.reward import RewardConfig

    default = RewardConfig()
    cfg = load_config(RewardConfig, None, ["--run.seed", "3", "--optim.lr", "0.01"])
    assert cfg.run.seed == 3 and cfg.optim.lr == 0.01
    assert cfg.run.output_dir == default.run.output_dir != RunConfig().output_dir
    assert cfg.optim.warmup_steps == default.optim.warmup_steps != OptimConfig().warmup_steps


def test_yaml_boolean_spelling_of_a_choice_is_the_choice(tmp_path):
    """YAML 1.1 reads `no` as False; for a choice field the user meant the choice `no`, on the CLI and in files."""
    assert load_config(SFTConfig, None, ["--run.mixed_precision", "no"]).run.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  mixed_precision: no\n")
    assert load_config(SFTConfig, path).run.mixed_precision == "no"
    with pytest.raises(ConfigError, match="run.mixed_precision"):
        load_config(SFTConfig, None, ["--run.mixed_precision", "yes"])  # no choice is spelled yes
