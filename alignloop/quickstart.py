"""The main job on the embedded default, all three RLHF stages: build the sandbox world and its
simulated annotators' comparisons, train a tokenizer and a tiny model from scratch with SFT, train a
reward model on the comparisons, optimise the policy with PPO against it, and score every stage on
held-out prompts with the gold judge (which no trainer sees)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alignloop.config import GenConfig, load_config, save_config
from alignloop.data import Prompt
from alignloop.evaluate import PolicyEval, evaluate_policy
from alignloop.models import build_policy, load_causal_lm, load_tokenizer, train_tokenizer
from alignloop.sandbox import GoldJudge, SandboxConfig, build_world, write_world
from alignloop.sandbox.annotators import write_preference_files
from alignloop.train import ppo, reward, sft

log = logging.getLogger(__name__)


SANDBOX_PPO = [
    "--total_steps", "60", "--reward.normalize", "saved", "--data.max_eval_prompts", "128",
    "--kl.init_coef", "1.0", "--kl.adaptive", "false", "--run.eval_every", "10", "--run.save_every", "20",
]
"""PPO on the sandbox: a fixed KL coefficient of 1.0 per nat. With 0.05 the policy found, within 30 steps,
one admission string the reward model overrates and said it to every prompt (helpful prompts fell from
39% to 9% gold overall at T=1); with 0.3 a length-biased reward model was hacked (answers padded, gold
to 0), which 1.0 holds off; see docs/benchmarks.md."""


@dataclass
class QuickstartConfig:
    """The embedded default end to end."""

    out_dir: str = "runs/quickstart"
    """Everything goes under here: world/, tokenizer/, sft/, reward/, ppo/."""
    stages: Literal["sft", "reward", "ppo"] = "ppo"
    """The last stage to run: SFT only, SFT and the reward model, or all three."""
    world: SandboxConfig = field(default_factory=SandboxConfig)
    """The sandbox world (seeded)."""
    prefs_per_prompt: int = 3
    """Simulated comparisons per training prompt for the reward model."""
    sft: sft.SFTConfig = field(default_factory=sft.SFTConfig)
    """SFT settings; data paths and output_dir are filled in from out_dir."""
    reward: reward.RewardConfig = field(default_factory=reward.RewardConfig)
    """Reward-model settings; backbone (the SFT model), data paths and output_dir are filled in."""
    ppo: ppo.PPOConfig = field(default_factory=lambda: load_config(ppo.PPOConfig, None, SANDBOX_PPO))
    """PPO settings (SANDBOX_PPO over PPOConfig's defaults); policy (SFT), critic and reward (the reward
    model), prompts, the gold judge as a held-out watcher and output_dir are filled in."""
    eval_prompts: int = 300
    """Held-out prompts scored before and after (greedy)."""
    gen: GenConfig = field(default_factory=lambda: GenConfig(temperature=0.0, max_new_tokens=48))
    """Greedy decoding: shows the model's most likely behaviour (and whether its output is well formed)."""
    sample_gen: GenConfig = field(default_factory=lambda: GenConfig(temperature=1.0, max_new_tokens=48))
    """Sampling at temperature 1: shows the learned distribution, whose gold score should track the
    share of good demonstrations (SFT imitates its data, good and bad alike)."""

    def resolve(self) -> None:
        """Point every stage at the world's files, the previous stage's model and its run directory."""
        root = Path(self.out_dir)
        self.sft.data.train_path = str(root / "world" / "sft_train.jsonl")
        self.sft.data.eval_path = str(root / "world" / "sft_eval.jsonl")
        self.sft.run.output_dir = str(root / "sft")
        self.sft.resolve()
        self.reward.model.name_or_path = str(root / "sft" / "final")
        self.reward.data.train_path = str(root / "world" / "prefs_train.jsonl")
        self.reward.data.eval_path = str(root / "world" / "prefs_eval.jsonl")
        self.reward.run.output_dir = str(root / "reward")
        self.reward.resolve()
        self.ppo.policy.name_or_path = str(root / "sft" / "final")
        self.ppo.critic_path = str(root / "reward" / "final")
        self.ppo.reward.source = str(root / "reward" / "final")
        self.ppo.data.train_path = str(root / "world" / "prompts_train.jsonl")
        self.ppo.data.eval_path = str(root / "world" / "prompts_eval.jsonl")
        self.ppo.reward.eval_sources = [f"gold=sandbox:{root / 'world'}"]
        self.ppo.run.output_dir = str(root / "ppo")
        self.ppo.resolve()


@dataclass
class QuickstartResult:
    """Gold scores after each stage, the reward model's report, and timings."""

    before: PolicyEval
    after: PolicyEval
    after_sampled: PolicyEval
    good_demo_share: float
    sft_seconds: float
    sft: sft.SFTResult
    reward: reward.RewardResult | None = None
    reward_report: dict[str, float] = field(default_factory=dict)
    reward_seconds: float = 0.0
    ppo: ppo.PPOResult | None = None
    ppo_seconds: float = 0.0
    after_ppo: PolicyEval | None = None
    after_ppo_sampled: PolicyEval | None = None


def run(cfg: QuickstartConfig) -> QuickstartResult:
    """Build the world, then SFT, reward model and PPO (up to `cfg.stages`), scoring each with the gold judge."""
    cfg.resolve()
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")

    # 1. the world, its panel's comparisons, and the gold judge
    world = build_world(cfg.world)
    write_world(world, root / "world")
    judge = GoldJudge(world)
    good_share = sum(bool(ex.meta.get("good")) for ex in world.sft_train) / len(world.sft_train)
    prompts: list[Prompt] = list(world.prompts_eval)[: cfg.eval_prompts]

    # 2. tokenizer trained on the world's text; the untrained model for "before"
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(world.tokenizer_corpus(), vocab_size=cfg.sft.model.tokenizer_vocab_size).save_pretrained(tok_dir)
    cfg.sft.model.tokenizer = str(tok_dir)
    model, tokenizer = build_policy(cfg.sft.model, seed=cfg.sft.run.seed)
    before = evaluate_policy(model, tokenizer, prompts, judge.score, cfg.gen, seed=cfg.sft.run.seed)
    del model

    # 3. SFT (each stage resumes if a checkpoint of an interrupted run exists)
    t0 = time.perf_counter()
    sft_result = sft.train(cfg.sft)
    sft_seconds = time.perf_counter() - t0
    after, sampled = evaluate_folder(sft_result.final_dir, prompts, judge, cfg)
    result = QuickstartResult(before, after, sampled, good_share, sft_seconds, sft_result)
    if cfg.stages == "sft":
        return result

    # 4. reward model on the simulated panel's comparisons, checked against the gold judge
    write_preference_files(world, root / "world", cfg.prefs_per_prompt)
    t0 = time.perf_counter()
    result.reward = reward.train(cfg.reward)
    result.reward_seconds = time.perf_counter() - t0
    result.reward_report = reward.evaluate_against(result.reward.final_dir, cfg.reward, judge.score)
    if cfg.stages == "reward":
        return result

    # 5. PPO against the reward model
    t0 = time.perf_counter()
    result.ppo = ppo.train(cfg.ppo)
    result.ppo_seconds = time.perf_counter() - t0
    result.after_ppo, result.after_ppo_sampled = evaluate_folder(result.ppo.final_dir, prompts, judge, cfg)
    return result


def evaluate_folder(folder: Path, prompts: list[Prompt], judge: GoldJudge, cfg: QuickstartConfig) -> tuple[PolicyEval, PolicyEval]:
    """Greedy and T=1 gold scores of the policy saved in `folder`."""
    model, tokenizer = load_causal_lm(str(folder)), load_tokenizer(str(folder))
    greedy = evaluate_policy(model, tokenizer, prompts, judge.score, cfg.gen, seed=cfg.sft.run.seed)
    sampled = evaluate_policy(model, tokenizer, prompts, judge.score, cfg.sample_gen, seed=cfg.sft.run.seed)
    return greedy, sampled
