"""The README's main job on the embedded default, end to end.

CI runs a short version that still asserts the direction of learning; the full acceptance run
(default config: SFT in at most 4 minutes, >= 95% well-formed greedy responses, sampled gold score
within 10 points of the share of good demonstrations) is marked slow.
"""

from __future__ import annotations

import json

import pytest

from alignloop import cli
from alignloop.config import load_config
from alignloop.quickstart import QuickstartConfig, run

SHORT = [
    "--world.n_known", "12", "--world.n_unknown", "12", "--world.n_sft_train", "1200",
    "--world.n_train_prompts", "100", "--world.n_eval_prompts", "60", "--eval_prompts", "60",
    "--sft.batch.max_steps", "60", "--sft.batch.micro_batch_size", "32", "--sft.run.eval_every", "30",
    "--sft.run.save_every", "0", "--sft.run.progress_bar", "false", "--sft.run.tensorboard", "false",
    "--sft.model.tiny.hidden_size", "128", "--sft.model.tiny.intermediate_size", "344",
    "--sft.model.tiny.num_layers", "2", "--prefs_per_prompt", "2",
    "--reward.batch.max_steps", "15", "--reward.batch.micro_batch_size", "16", "--reward.run.progress_bar", "false",
    "--reward.run.tensorboard", "false", "--reward.run.save_every", "0", "--reward.run.eval_every", "0",
    "--ppo.total_steps", "4", "--ppo.rollout_prompts", "16", "--ppo.minibatch_size", "8", "--ppo.ppo_epochs", "1",
    "--ppo.gen.max_new_tokens", "16", "--ppo.run.progress_bar", "false", "--ppo.run.tensorboard", "false",
    "--ppo.run.save_every", "0", "--ppo.run.eval_every", "0",
]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    cfg = load_config(QuickstartConfig, None, ["--out_dir", str(out), *SHORT])
    return out, run(cfg)


def test_quickstart_short_direction_of_learning(short_run):
    _, result = short_run
    assert result.after.means["well_formed"] > result.before.means["well_formed"] + 0.5
    assert result.after.means["overall"] > result.before.means["overall"] + 0.2


def test_quickstart_run_directory_and_table(short_run, capsys):
    out, result = short_run
    for name in ("world/sft_train.jsonl", "world/world.json", "world/prefs_train.jsonl", "tokenizer/tokenizer.json",
                 "sft/final/model.safetensors", "sft/config.yaml", "sft/metrics.jsonl", "sft/manifest.json", "config.yaml",
                 "reward/final/model.safetensors", "reward/final/reward_stats.json", "ppo/final/model.safetensors",
                 "ppo/metrics.jsonl"):
        assert (out / name).exists(), name
    evals = [json.loads(line)["eval/loss"] for line in (out / "sft/metrics.jsonl").read_text().splitlines()
             if "eval/loss" in line]
    assert evals[-1] < evals[0]
    cli.print_quickstart(result, str(out))
    printed = capsys.readouterr().out
    assert "before SFT, greedy" in printed and "after SFT, T=1" in printed and "after PPO, T=1" in printed
    assert "reward model:" in printed and "PPO:" in printed and "[helpful] user:" in printed
    assert 0.0 <= result.reward_report["gold/agreement"] <= 1.0 and result.ppo.steps == 4


def test_cli_help_lists_config_keys(capsys):
    for command in ("quickstart", "sft", "reward", "ppo", "sandbox", "generate"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "optim.lr" in printed and "bad_demo_share" in printed and "temperature" in printed


def test_cli_bad_override_is_a_named_error(capsys):
    assert cli.main(["sft", "--optim.lrr", "1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_quickstart_default_acceptance(tmp_path, seed):
    """Issue 2, acceptance 1, on the default config. Since our own sampler replaced `model.generate` (which
    applied top-k 50 when sampling), exact T=1 sampling measured 46.4% against 60% good demonstrations on
    seed 0: 13.6 points, outside the bound (with top-k 50 it was 52.6%; seed 1 48.7%)."""
    cfg = load_config(QuickstartConfig, None, ["--out_dir", str(tmp_path / "qs"), "--world.seed", str(seed), "--stages", "sft",
                                               "--sft.run.seed", str(seed), "--sft.run.progress_bar", "false"])
    result = run(cfg)
    assert result.sft_seconds <= 240
    assert result.after.means["well_formed"] >= 0.95
    assert abs(result.after_sampled.means["overall"] - result.good_demo_share) <= 0.10


def test_cli_sandbox_and_generate(short_run, tmp_path, capsys):
    out, _ = short_run
    assert cli.main(["sandbox", "--out", str(tmp_path / "w"), "--seed", "3", "--n_sft_train", "1200",
                     "--n_known", "12", "--n_unknown", "12", "--n_train_prompts", "50", "--n_eval_prompts", "20"]) == 0
    assert (tmp_path / "w" / "prompts_eval.jsonl").exists()
    capsys.readouterr()
    model = str(out / "sft" / "final")
    args = ["generate", model, "--prompt", "What is 3 plus 4?", "--prompt", "Hello", "--max_new_tokens", "12"]
    assert cli.main([*args, "--temperature", "0"]) == 0
    greedy = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [g["prompt"] for g in greedy] == ["What is 3 plus 4?", "Hello"]
    assert cli.main([*args, "--temperature", "1.0", "--num_samples", "2", "--seed", "5"]) == 0
    first = capsys.readouterr().out
    assert cli.main([*args, "--temperature", "1.0", "--num_samples", "2", "--seed", "5"]) == 0
    assert capsys.readouterr().out == first and len(first.splitlines()) == 4
    assert cli.main(["generate", model, "--prompts-file", str(tmp_path / "w" / "prompts_eval.jsonl"),
                     "--temperature", "0", "--max_new_tokens", "8"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 20
