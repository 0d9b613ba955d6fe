"""PPO trainer on tiny models with a rule reward: ratio 1 and approx KL 0 on the first minibatch (T7e),
generation vs trainer log-probs (T7f), no-EOS handling and masked positions (T7g), alerts and halting (T7h),
parameters that train and a reference that does not (T7j), exact resume after SIGKILL in the rollout and
in the update (T1-PPO), and a policy that learns what the reward asks for."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import run_subprocess

from alignloop.config import ConfigError, TinyModelConfig, load_config
from alignloop.generation import generate
from alignloop.models import load_sequence_classifier, save_pretrained, tiny_model, train_tokenizer
from alignloop.train import ppo

WORDS = "alpha beta gamma delta river stone cloud bright quiet lamp north seven blue green".split()


def letter_reward(prompt: list[dict[str, str]], response: str) -> float:
    """Share of the response's characters that are a-z (`python:test_ppo:letter_reward`): dense for a random
    tiny policy, whose tokens are mostly single bytes, and reached by preferring some tokens over others."""
    return sum("a" <= c <= "z" for c in response) / max(1, len(response))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a tiny random policy, a tiny reward model (both HF folders) and prompt files."""
    root = tmp_path_factory.mktemp("ppo_assets")
    rng = random.Random(0)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 10))) for _ in range(400)]
    tok = train_tokenizer(texts, vocab_size=200)
    shape = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_position_embeddings=64)
    save_pretrained(tiny_model(shape, tok, seed=0), tok, root / "policy")
    torch.manual_seed(1)
    rm = load_sequence_classifier(str(root / "policy"), num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    save_pretrained(rm, tok, root / "rm")
    (root / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.1, "std": 0.5, "count": 10}))
    for name, n in (("train.jsonl", 48), ("eval.jsonl", 8)):
        rows = [{"id": f"{name}{i}", "prompt": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))} for i in range(n)]
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "policy": root / "policy", "rm": root / "rm", "train": root / "train.jsonl",
            "eval": root / "eval.jsonl"}


def overrides(assets: dict[str, Path], out: Path, **extra: object) -> list[str]:
    base = {
        "policy.name_or_path": assets["policy"], "critic_from": "policy",
        "reward.source": "python:test_ppo:letter_reward", "data.train_path": assets["train"],
        "gen.max_new_tokens": 8, "gen.num_samples": 2, "total_steps": 6, "rollout_prompts": 8, "minibatch_size": 8,
        "ppo_epochs": 2, "optim.lr": 3e-3, "critic_optim.lr": 3e-3, "kl.target": 0.05, "kl.horizon": 200,
        "run.output_dir": out, "run.save_every": 2, "run.record_sample_ids": True, "run.progress_bar": False, "run.tensorboard": False,
    }
    base.update(extra)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def config(assets: dict[str, Path], out: Path, **extra: object) -> ppo.PPOConfig:
    return load_config(ppo.PPOConfig, None, overrides(assets, out, **extra))


def rows(run_dir: Path) -> dict[int, dict[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "ppo/policy/loss" in r or "alert/kl" in r}


def params(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def baseline(assets, tmp_path_factory) -> Path:
    """The uninterrupted 6-step run (running score normalisation, adaptive KL, checkpoints every 2 steps)."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    ppo.train(config(assets, out, **{"reward.normalize": "running", "data.eval_path": assets["eval"], "run.eval_every": 3}))
    return out


def test_T7e_T7f_first_minibatch_ratio_one_and_generation_logprobs_agree(baseline):
    steps = rows(baseline)
    assert sorted(steps) == list(range(1, 7))
    for r in steps.values():
        assert r["ppo/check/ratio_dev"] < 1e-6 and r["ppo/check/approxkl"] < 1e-6, r
        assert r["ppo/check/value_dev"] < 1e-6
        assert r["ppo/check/gen_logprob_dev"] <= 0.01  # T7f at T=1, fp32
    assert len({r["ppo/kl_coef"] for r in steps.values()}) == 6, "the adaptive coefficient moves every step"
    for name in ("config.yaml", "manifest.json", "final/model.safetensors", "final/tokenizer.json",
                 "final_critic/model.safetensors"):
        assert (baseline / name).exists(), name
    assert "eval/score" in steps[3] and "eval/score" in steps[6] and "eval/score" not in steps[4]


def test_T7e_mismatch_between_rollout_and_update_forward_is_an_error(assets, tmp_path, monkeypatch):
    original = ppo.rollout_forward

    def shifted(*args, **kwargs):
        out = original(*args, **kwargs)
        out["logprobs"] = out["logprobs"] + 1e-3  # what a masking or position-id bug looks like
        return out

    monkeypatch.setattr(ppo, "rollout_forward", shifted)
    with pytest.raises(ppo.RolloutMismatchError, match="first minibatch"):
        ppo.train(config(assets, tmp_path / "run", total_steps=1))


@pytest.mark.parametrize("key, value", [("gen.temperature", 0.7), ("gen.top_p", 0.9), ("gen.top_k", 5),
                                        ("minibatch_size", 5), ("dual_clip", 0.5)])
def test_off_policy_sampling_and_bad_sizes_are_refused(assets, tmp_path, key, value):
    with pytest.raises(ConfigError):
        config(assets, tmp_path / "run", **{key: value})


def test_every_logged_metric_is_documented(baseline):
    doc = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    names = {k for line in (baseline / "metrics.jsonl").read_text().splitlines() for k in json.loads(line) if k != "step"}
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"metrics logged but not in docs/metrics.md: {missing}"


@pytest.mark.parametrize("kill_at, resumes_from", [("5:rollout", 4), ("3:2", 2)], ids=["during-rollout", "during-update"])
def test_T1_PPO_sigkill_then_resume_equals_uninterrupted(assets, baseline, tmp_path, kill_at, resumes_from):
    out = tmp_path / "run"
    extra = {"reward.normalize": "running", "data.eval_path": assets["eval"], "run.eval_every": 3}
    args = overrides(assets, out, **extra)
    env = {"ALIGNLOOP_TEST_KILL_AT": kill_at, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    killed = run_subprocess(args, env, cmd="ppo")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(rows(out)) == resumes_from  # killed inside the step after the checkpoint
    assert not (out / "final").exists()
    if kill_at.endswith("rollout"):  # negative controls: each restored piece of state matters
        for target, attr in ((ppo.AdaptiveKLController, "ppo/kl_coef"), (ppo.RunningScoreNorm, "ppo/score_norm_mean")):
            control = tmp_path / f"control-{attr.replace('/', '_')}"
            shutil.copytree(out, control)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(target, "load_state_dict", lambda self, state: None)
                ppo.train(load_config(ppo.PPOConfig, None, overrides(assets, control, **extra)))
            assert rows(control)[5][attr] != rows(baseline)[5][attr], attr
    ppo.train(load_config(ppo.PPOConfig, None, args))
    a, b = rows(baseline), rows(out)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        for key in a[step]:
            if not key.startswith("perf/"):
                assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    assert (baseline / "sample_ids.jsonl").read_text() == (out / "sample_ids.jsonl").read_text()
    for folder in ("final", "final_critic"):
        pa, pb = params(baseline / folder), params(out / folder)
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa), folder
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (baseline, out)]
    assert manifests[0]["kl_coef"] == manifests[1]["kl_coef"]


def test_T7j_policy_and_critic_train_reference_frozen(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", total_steps=3)
    models = ppo.build_models(cfg, torch.device("cpu"))
    before = {"policy": copy.deepcopy(models.policy.state_dict()), "critic": copy.deepcopy(models.critic.state_dict())}
    ppo.train(cfg, models=models)
    for name in ("policy", "critic"):
        model = getattr(models, name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        after = model.state_dict()
        unchanged = [n for n in trainable if torch.equal(before[name][n], after[n])]
        assert not unchanged, f"{name}: {unchanged} did not change"
    reference = models.reference.state_dict()
    assert all(torch.equal(before["policy"][n], reference[n]) for n in reference), "the reference must stay frozen"
    assert not any(p.requires_grad for p in models.reference.parameters())


def test_T7j_lora_policy_trains_adapters_only_and_reference_is_the_base(assets, tmp_path):
    out = tmp_path / "run"
    cfg = config(assets, out, total_steps=2, **{"policy.lora.r": 4, "optim.lr": 1e-2, "run.save_every": 1})
    models = ppo.build_models(cfg, torch.device("cpu"))
    trainable = {n for n, p in models.policy.named_parameters() if p.requires_grad}
    before = copy.deepcopy(models.policy.state_dict())
    result = ppo.train(cfg, models=models)
    assert models.reference is None, "LoRA: the reference is the base with adapters disabled, no copy"
    assert result.metrics["ppo/check/ratio_dev"] < 1e-6
    # read step 1's checkpoint: the final save merges the adapters into the base
    after = load_file(str(out / "checkpoints" / "step-00000001" / "model-policy.safetensors"))
    changed = {n for n, t in after.items() if not torch.equal(before[n], t)}
    assert trainable and trainable <= changed, sorted(trainable - changed)[:5]
    assert changed <= trainable, f"frozen base weights changed: {sorted(changed - trainable)[:5]}"


def test_T7g_no_eos_penalty_is_exactly_p_and_eos_count_logged(assets, tmp_path):
    p = 0.7
    out = tmp_path / "run"
    ppo.train(config(assets, out, total_steps=1, **{"gen.max_new_tokens": 2, "reward.no_eos_penalty": p,
                                                   "kl.adaptive": False, "kl.init_coef": 0.0}))
    r = rows(out)[1]
    assert r["ppo/no_eos_share"] > 0.5
    assert r["ppo/non_score_reward"] == 0.0
    assert abs(r["ppo/reward"] - (r["ppo/score"] - p * r["ppo/no_eos_share"])) < 1e-6
    assert r["ppo/num_eos_tokens"] == round(16 * (1 - r["ppo/no_eos_share"]))


def test_T7g_masked_positions_and_rows_give_zero_gradient(assets, tmp_path):
    cfg = config(assets, tmp_path / "run")
    models = ppo.build_models(cfg, torch.device("cpu"))
    models.reference = copy.deepcopy(models.policy)
    prompts = [models.tokenizer.encode("river stone blue"), models.tokenizer.encode("north")]
    gen = copy.copy(cfg.gen)
    rollout = generate(models.policy, models.tokenizer, prompts * 2, gen, seed=0)
    rollout.response_mask[0, 3:] = 0  # row 0 ends early: positions 3.. are padding
    rollout.response_mask[1] = 0  # row 1 is masked out entirely
    exp, _ = ppo.prepare_experience(cfg, models, rollout, torch.tensor([1.0, 0.0, 0.5, 0.2] * 2), 0.05, torch.device("cpu"))

    def grads(e: ppo.Experience) -> list[torch.Tensor]:
        for m in (models.policy, models.critic):
            m.zero_grad(set_to_none=True)
        for minibatch_loss in ppo.MINIBATCH_LOSSES:
            minibatch_loss(models, e, torch.arange(4), cfg)[0].backward()
        return [p.grad.clone() for m in (models.policy, models.critic) for p in m.parameters()]

    reference = grads(exp)
    noisy = copy.deepcopy(exp)
    width = exp.prompt_width
    garbage = torch.randint(0, len(models.tokenizer), exp.input_ids.shape, generator=torch.Generator().manual_seed(0))
    hidden = torch.cat([torch.zeros_like(exp.attention_mask[:, :width]), 1 - exp.response_mask], dim=1).bool()
    hidden[1, width:] = True  # all of row 1's response
    noisy.input_ids = torch.where(hidden, garbage, exp.input_ids)
    for name in ("old_logprobs", "old_values", "advantages", "returns"):
        t = getattr(noisy, name)
        setattr(noisy, name, torch.where(exp.response_mask.bool(), t, torch.full_like(t, 1e3)))
    assert not torch.equal(noisy.input_ids, exp.input_ids)
    for a, b in zip(reference, grads(noisy), strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=0)


def test_policy_and_value_terms_backpropagated_apart_give_the_joint_gradients(assets, tmp_path):
    """The update backpropagates each loss term right after its forward (one model's activations alive at a
    time); the gradients must be those of policy loss + vf_coef x value loss in one backward, bit for bit."""
    cfg = config(assets, tmp_path / "run")
    models = ppo.build_models(cfg, torch.device("cpu"))
    models.reference = copy.deepcopy(models.policy)
    prompts = [models.tokenizer.encode("river stone blue"), models.tokenizer.encode("north")]
    rollout = generate(models.policy, models.tokenizer, prompts * 2, copy.copy(cfg.gen), seed=1)
    exp, _ = ppo.prepare_experience(cfg, models, rollout, torch.tensor([1.0, -0.5, 0.5, 0.2] * 2), 0.05, torch.device("cpu"))
    idx = torch.tensor([2, 0, 3])

    def grads(joint: bool) -> list[torch.Tensor]:
        for m in (models.policy, models.critic):
            m.zero_grad(set_to_none=True)
        losses = [loss(models, exp, idx, cfg)[0] for loss in ppo.MINIBATCH_LOSSES] if joint else []
        if joint:
            (losses[0] + losses[1]).backward()
        else:
            for loss in ppo.MINIBATCH_LOSSES:
                loss(models, exp, idx, cfg)[0].backward()
        return [p.grad.clone() for m in (models.policy, models.critic) for p in m.parameters()]

    apart, joint = grads(False), grads(True)
    assert any(g.abs().sum() > 0 for g in apart[: len(list(models.policy.parameters()))])
    assert any(g.abs().sum() > 0 for g in apart[len(list(models.policy.parameters())):])
    for a, b in zip(apart, joint, strict=True):
        assert torch.equal(a, b)


def test_T7h_kl_breach_halts_before_training_on_it(assets, tmp_path):
    out = tmp_path / "run"
    result = ppo.train(config(assets, out, total_steps=20, halt_kl=0.3, **{"optim.lr": 2e-2, "kl.adaptive": False,
                                                                          "kl.init_coef": 0.0}))
    steps = rows(out)
    assert result.halted == "kl" and result.steps < 20
    breach = min(s for s, r in steps.items() if r["ppo/kl"] > 0.3)
    assert breach == result.steps + 1 == max(steps), "halt at the first rollout over the threshold"
    assert steps[breach]["alert/kl"] == 1.0 and all(steps[s]["alert/kl"] == 0.0 for s in steps if s < breach)
    assert json.loads((out / "manifest.json").read_text())["halted"] == "kl"


def test_T7h_entropy_alert_halts_or_only_warns(assets, tmp_path):
    halted = ppo.train(config(assets, tmp_path / "a", total_steps=3, min_entropy=100.0))
    assert halted.halted == "entropy" and halted.steps == 0
    warned = ppo.train(config(assets, tmp_path / "b", total_steps=2, min_entropy=100.0, halt_on_alert=False))
    assert warned.halted is None and warned.steps == 2
    assert all(r["alert/entropy"] == 1.0 for r in rows(tmp_path / "b").values())


def test_critic_from_reward_model_and_saved_normalisation(assets, tmp_path):
    cfg = config(assets, tmp_path / "run", total_steps=1, critic_from="reward",
                 **{"reward.source": assets["rm"], "reward.normalize": "saved"})
    models = ppo.build_models(cfg, torch.device("cpu"))
    rm = params(assets["rm"])
    assert all(torch.equal(t, rm[n]) for n, t in models.critic.state_dict().items() if n in rm)
    result = ppo.train(cfg, models=models)
    assert result.steps == 1 and (tmp_path / "run" / "final_critic" / "model.safetensors").exists()
    from_path = ppo.build_models(config(assets, tmp_path / "y", critic_path=assets["rm"]), torch.device("cpu"))
    assert torch.equal(from_path.critic.score.weight, rm["score.weight"]), "critic_path wins over critic_from"
    with pytest.raises(ConfigError, match="critic_from: policy"):
        ppo.build_models(config(assets, tmp_path / "x", critic_from="reward"), torch.device("cpu"))


def test_policy_learns_what_the_reward_asks_for(assets, tmp_path):
    out = tmp_path / "run"
    ppo.train(config(assets, out, total_steps=20, **{"run.save_every": 0, "optim.lr": 1e-2, "optim.schedule": "constant",
                                                     "kl.adaptive": False, "kl.init_coef": 0.01}))
    steps = rows(out)
    early = sum(steps[s]["ppo/score"] for s in (1, 2, 3)) / 3
    late = sum(steps[s]["ppo/score"] for s in (18, 19, 20)) / 3
    assert late > early + 0.4, (early, late)
    assert all(torch.isfinite(torch.tensor(r["ppo/kl"])) for r in steps.values())


def digits_flattered_proxy(prompt: list[dict[str, str]], response: str) -> float:
    """A proxy with an exploitable bias (`python:test_ppo:digits_flattered_proxy`): the gold score below plus
    4 per unit share of digits, as a length- or flattery-biased reward model adds utility the judge does not."""
    return letters_minus_digits_gold(prompt, response) + 4 * sum(c.isdigit() for c in response) / max(1, len(response))


def letters_minus_digits_gold(prompt: list[dict[str, str]], response: str) -> float:
    """The gold judge of the short reward-hacking test: letters are good, digits are bad."""
    n = max(1, len(response))
    return (sum("a" <= c <= "z" for c in response) - sum(c.isdigit() for c in response)) / n


def test_reward_hacking_short_proxy_rises_gold_falls_without_kl_and_not_with_it(assets, tmp_path):
    """CI's short version of benchmarks/reward_hacking.py: against a biased proxy and with no KL penalty, the
    proxy rises while the never-trained-on gold judge falls; the sandbox's KL coefficient (1.0, fixed) holds the
    policy near the reference, so neither moves much."""
    curves = {}
    for name, coef in (("no_kl", 0.0), ("kl", 1.0)):
        out = tmp_path / name
        ppo.train(config(assets, out, total_steps=12, **{
            "run.save_every": 0, "optim.lr": 1e-2, "optim.schedule": "constant", "kl.adaptive": False,
            "kl.init_coef": coef, "reward.source": "python:test_ppo:digits_flattered_proxy", "data.eval_path": assets["eval"],
            "run.eval_every": 6, "reward.eval_sources": ["gold=python:test_ppo:letters_minus_digits_gold"]}))
        lines = (out / "metrics.jsonl").read_text().splitlines()
        curves[name] = [r for r in map(json.loads, lines) if "eval/gold_score" in r]
        assert [r["step"] for r in curves[name]] == [0, 6, 12]
    free, held = curves["no_kl"], curves["kl"]
    assert free[0]["eval/score"] == held[0]["eval/score"]  # one starting policy, one seed
    assert free[-1]["eval/score"] > free[0]["eval/score"] + 1.0, free
    assert free[-1]["eval/gold_score"] < free[0]["eval/gold_score"] - 0.2, free
    assert abs(held[-1]["eval/score"] - held[0]["eval/score"]) < 0.3, held
    assert held[-1]["eval/gold_score"] > free[-1]["eval/gold_score"] + 0.2, (held, free)
    last_kl = {name: sum(rows(tmp_path / name)[s]["ppo/kl"] for s in (10, 11, 12)) / 3 for name in curves}
    assert last_kl["kl"] < 0.25 * last_kl["no_kl"], last_kl


@pytest.fixture(scope="module")
def short_base(assets, tmp_path_factory) -> dict[int, dict[str, float]]:
    out = tmp_path_factory.mktemp("short") / "run"
    ppo.train(config(assets, out, total_steps=2, **{"run.save_every": 0}))
    return rows(out)


OPTIONS = {  # each option changes what its metric shows (DESIGN rule 5)
    # the first minibatch is the rollout policy itself (approx KL 0); the second one is over the target
    "target_kl": (1e-12, lambda base, r: r[1]["ppo/update/early_stopped"] == 1 and r[1]["ppo/update/minibatches"] == 2
                  < base[1]["ppo/update/minibatches"]),
    "dual_clip": (1.01, lambda base, r: r[2]["ppo/policy/dual_clipfrac"] > 0 == base[2]["ppo/policy/dual_clipfrac"]),
    "reward.clip": (0.05, lambda base, r: abs(r[1]["ppo/reward"] - r[1]["ppo/non_score_reward"]) <= 0.05
                    < base[1]["ppo/reward"] - base[1]["ppo/non_score_reward"]),
    "whiten_advantages": (False, lambda base, r: r[1]["ppo/policy/loss"] != base[1]["ppo/policy/loss"]),
    "kl.estimator": ("k3", lambda base, r: r[1]["ppo/kl"] == 0 and r[2]["ppo/kl"] != base[2]["ppo/kl"]),
    "gamma": (0.5, lambda base, r: r[1]["ppo/value/explained_variance"] != base[1]["ppo/value/explained_variance"]),
    "lam": (0.5, lambda base, r: r[1]["ppo/value/explained_variance"] != base[1]["ppo/value/explained_variance"]),
    "vf_coef": (1.0, lambda base, r: r[1]["train/critic_grad_norm"] > base[1]["train/critic_grad_norm"]),
    "clip_range": (1e-3, lambda base, r: r[1]["ppo/policy/clipfrac"] > base[1]["ppo/policy/clipfrac"]),
    "clip_range_value": (1e-5, lambda base, r: r[1]["ppo/value/clipfrac"] > base[1]["ppo/value/clipfrac"]),
    "kl.init_coef": (0.5, lambda base, r: r[1]["ppo/kl_coef"] == 0.5 != base[1]["ppo/kl_coef"]),
    "critic_optim.lr": (0.0, lambda base, r: r[2]["ppo/value/mean"] != base[2]["ppo/value/mean"]),
}


@pytest.mark.parametrize("key", sorted(OPTIONS))
def test_option_changes_behaviour(assets, short_base, tmp_path, key):
    value, check = OPTIONS[key]
    out = tmp_path / "run"
    ppo.train(config(assets, out, total_steps=2, **{"run.save_every": 0, key: value}))
    assert check(short_base, rows(out)), {k: (short_base[1].get(k), rows(out)[1].get(k)) for k in rows(out)[1]}


def test_long_prompts_dropped_and_injected_reward_function(assets, tmp_path):
    out = tmp_path / "run"
    result = ppo.train(config(assets, out, total_steps=1, rollout_prompts=2, minibatch_size=4,
                              **{"data.max_prompt_length": 25}), reward_fn=lambda prompts, responses: torch.ones(len(responses)))
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data/train_dropped"] > 0 and first["data/train_prompts"] + first["data/train_dropped"] == 48
    assert result.metrics["ppo/score"] == 1.0


def test_checkpoint_with_named_models_round_trips_and_a_missing_part_is_named(tmp_path):
    """The multi-model checkpoint PPO uses (T2b): every part restored exactly; a missing one is an error."""
    from alignloop import checkpoint

    def parts(seed: int) -> tuple[dict, dict]:
        torch.manual_seed(seed)
        models = {"policy": torch.nn.Linear(3, 2), "critic": torch.nn.Linear(3, 1)}
        optims = {k: torch.optim.AdamW(m.parameters(), lr=0.1) for k, m in models.items()}
        for k, m in models.items():
            m(torch.ones(1, 3)).sum().backward()
            optims[k].step()
        return models, optims

    models, optims = parts(0)
    ckpt = checkpoint.save_checkpoint(tmp_path, 3, model=models, optimizer=optims, state={"kl": {"value": 0.1}})
    assert {p.name for p in ckpt.iterdir()} >= {"model-policy.safetensors", "optimizer-critic.json"}
    fresh, fresh_optims = parts(1)
    state = checkpoint.load_checkpoint(ckpt, model=fresh, optimizer=fresh_optims, restore_rng=False)
    assert state == {"kl": {"value": 0.1}, "step": 3}
    for k in models:
        assert all(torch.equal(a, b) for a, b in zip(models[k].parameters(), fresh[k].parameters(), strict=True))
        assert torch.equal(optims[k].state_dict()["state"][0]["exp_avg"], fresh_optims[k].state_dict()["state"][0]["exp_avg"])
    with pytest.raises(checkpoint.CheckpointError, match="model-value.safetensors: missing"):
        checkpoint.load_checkpoint(ckpt, model={**fresh, "value": torch.nn.Linear(3, 1)}, restore_rng=False)
    with pytest.raises(checkpoint.CheckpointError, match="optimizer-policy.json: missing"):
        single = checkpoint.save_checkpoint(tmp_path / "single", 1, model=models["policy"])
        checkpoint.load_checkpoint(single, model=models["policy"], optimizer={"policy": optims["policy"]}, restore_rng=False)


def test_eval_sources_score_the_held_out_samples_and_never_train(assets, tmp_path):
    """A held-out judge is logged as eval/<name>_score; naming errors are caught before anything runs."""
    out = tmp_path / "run"
    cfg = config(assets, out, total_steps=2, **{"data.eval_path": assets["eval"], "run.eval_every": 1,
                                                "reward.eval_sources": ["letters=python:test_ppo:letter_reward",
                                                                        "half=python:test_ppo:half_reward"]})
    ppo.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/score" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]  # step 0: the starting policy, the baseline
    for row in evals:  # the training reward is letter_reward too: the same samples give the same mean
        assert row["eval/letters_score"] == pytest.approx(row["eval/score"], abs=1e-6)
        assert row["eval/half_score"] == 0.5
    with pytest.raises(ConfigError, match="NAME=SPEC"):
        ppo.train(config(assets, tmp_path / "bad", **{"reward.eval_sources": ["python:test_ppo:half_reward"]}))


def half_reward(prompt: list[dict[str, str]], response: str) -> float:
    return 0.5
