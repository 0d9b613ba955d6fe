"""Proximal policy optimisation against a reward source (the third RLHF stage).

Choices (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022; the implementation details of
Huang et al. 2024, "The N+ implementation details of RLHF with PPO"):
- One step = one rollout of `rollout_prompts` prompts (x `gen.num_samples`) sampled from the current
  policy at T=1 with no truncation (on-policy; tempered or truncated sampling is refused, since it would
  need an importance correction), scored by the reward source, then `ppo_epochs` passes of shuffled
  minibatches over it, one optimizer step per minibatch.
- Reward per token: -kl_coef * KL estimate (policy vs reference) on every response token, plus the
  sequence score on the last one. The score is optionally normalised (the reward model's saved statistics
  or running ones) and clipped; a response cut at `max_new_tokens` before EOS scores `no_eos_penalty` less.
- Advantages by GAE over response tokens (the value after the last token is 0), whitened per rollout.
- Old log-probs and values come from a training-style forward over prompt + response (the same masks and
  position ids as the update), never from the generation scores. The first minibatch must then give
  ratio 1 and approx KL 0 (T7e; a difference above 1e-4 is an error); the generation log-probs are
  compared with them and logged (T7f).
- Critic: a separate model with a scalar head read at every token, initialised from the reward model
  (InstructGPT) or from the policy (fresh head); its own optimizer, learning rate and gradient clipping.
- Reference: a frozen copy of the starting (SFT) weights; with LoRA, the policy with adapters disabled.
- Dropout is off in every forward (the models stay in eval mode), so log-probs are deterministic.
- The learning-rate schedules advance once per PPO step, so `target_kl` early stopping leaves them alone.
- Halting (T7h): a rollout whose KL exceeds `halt_kl` or whose entropy falls below `min_entropy` raises an
  alert and, with `halt_on_alert`, stops the run before that rollout is trained on.
- Exact resume: policy, critic, both optimizers and schedules, the KL controller, running score statistics,
  data position and RNG come from the newest complete checkpoint; sampling and minibatch order are pure
  functions of (seed, step), so an interrupted rollout or update is simply redone.
- Deviation: single process only for now.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from alignloop import checkpoint, runtime
from alignloop.advantages import AdaptiveKLController, FixedKLController, gae, kl_penalty, token_rewards
from alignloop.config import ConfigError, GenConfig, ModelConfig, OptimConfig, RunConfig, save_config, to_dict
from alignloop.data import load_records
from alignloop.generation import Rollout, decode_responses, generate
from alignloop.losses import entropy_from_logits, explained_variance, ppo_policy_loss, value_loss
from alignloop.models import accepts_logits_to_keep, build_policy, load_sequence_classifier, save_pretrained
from alignloop.rewards import RewardSource, RunningScoreNorm, reward_source, token_scores
from alignloop.tensors import exact_div, logprobs_of, masked_mean, masked_whiten, position_ids_from_mask
from alignloop.tokenization import encode_prompt

log = logging.getLogger(__name__)

MISMATCH_TOLERANCE = 1e-4
"""Largest |ratio - 1| or approx KL allowed on the first minibatch before the run stops (T7e)."""


class RolloutMismatchError(RuntimeError):
    """The update's forward disagrees with the rollout's (ratio != 1 before any step): a masking bug."""


@dataclass
class PPODataConfig:
    """Prompts to sample from."""

    train_path: str = ""
    """Prompt records (conversations ending with a user turn): JSONL/JSON/CSV/Parquet, a `datasets` folder or hub name."""
    eval_path: str = ""
    """Held-out prompt records, sampled and scored every `run.eval_every` steps (empty: no eval)."""
    max_prompt_length: int = 96
    """Prompts longer than this many tokens are dropped (counted in data/train_dropped)."""
    max_eval_prompts: int = 256
    """Score at most this many held-out prompts."""


@dataclass
class PPORewardConfig:
    """Where the score comes from and how it is shaped."""

    source: str = ""
    """A reward-model folder, sandbox:WORLD_DIR (gold judge), python:module:function or an http(s):// URL."""
    normalize: Literal["none", "saved", "running"] = "none"
    """none; saved: (s - mean) / std with the reward model's reward_stats.json; running: with running statistics."""
    clip: float = 0.0
    """Clip the (normalised) score to [-clip, clip]; 0 disables clipping."""
    no_eos_penalty: float = 0.0
    """Subtracted from the score of a response cut at gen.max_new_tokens before its EOS."""
    eval_sources: list[str] = field(default_factory=list)
    """Judges that never train the policy, scored on the held-out samples as `eval/<name>_score`: entries
    NAME=SPEC (e.g. gold=sandbox:runs/world, or a second reward model). A proxy score that rises while
    these fall is reward hacking."""


@dataclass
class KLConfig:
    """The KL penalty against the reference policy."""

    init_coef: float = 0.05
    """Starting KL coefficient (the fixed one when `adaptive` is false)."""
    adaptive: bool = True
    """Steer the coefficient towards `target` (Ziegler et al. 2019); false keeps it fixed."""
    target: float = 6.0
    """Target of the per-sequence KL (sum over response tokens) for the adaptive controller."""
    horizon: float = 10000.0
    """Adaptive controller horizon, in samples: larger moves the coefficient more slowly."""
    estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 = log p - log p_ref, k2, k3 (Schulman 2020)."""


# Sections whose defaults differ from the shared ones are subclasses, not `default_factory` lambdas: a YAML or
# CLI override of one key rebuilds the section from its class defaults, which would drop the lambda's values.


@dataclass
class PPOGenConfig(GenConfig):
    """Rollout sampling: temperature 1, no top-k / top-p (PPO is on-policy)."""

    max_new_tokens: int = 48
    """Most tokens per response; a response cut here before its EOS gets reward.no_eos_penalty."""


@dataclass
class PolicyOptimConfig(OptimConfig):
    """AdamW for the policy; the schedule advances once per PPO step."""

    lr: float = 1e-4
    """Peak learning rate."""
    warmup_steps: int = 0
    """PPO steps of linear warmup from 0 to `lr`."""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """Decay after warmup, down to `min_lr_ratio * lr` at the last PPO step."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (linear to 0, as in lm-human-preferences)."""


@dataclass
class CriticOptimConfig(PolicyOptimConfig):
    """AdamW for the critic: its own learning rate and gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate of the critic."""


@dataclass
class PPORunConfig(RunConfig):
    """Run directory, logging and checkpoints, counted in PPO steps."""

    output_dir: str = "runs/ppo"
    """Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/, final/, final_critic/ and manifest.json."""
    log_every: int = 1
    """PPO steps between metric lines."""
    eval_every: int = 20
    """PPO steps between held-out evaluations (0: only at the end)."""
    save_every: int = 20
    """PPO steps between checkpoints (0: never)."""


@dataclass
class PPOConfig:
    """Everything a PPO run needs."""

    policy: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train, usually the SFT final/ folder; also the frozen reference."""
    critic_from: Literal["reward", "policy"] = "reward"
    """Initialise the critic from the reward model folder (InstructGPT) or from the policy (fresh value head)."""
    critic_path: str = ""
    """Folder to initialise the critic from; empty: the reward source folder or policy.name_or_path (by critic_from)."""
    reward: PPORewardConfig = field(default_factory=PPORewardConfig)
    """The reward source and score shaping."""
    data: PPODataConfig = field(default_factory=PPODataConfig)
    """Prompts."""
    gen: PPOGenConfig = field(default_factory=PPOGenConfig)
    """Rollout sampling: temperature 1, no top-k / top-p (on-policy)."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL penalty and controller."""
    optim: PolicyOptimConfig = field(default_factory=PolicyOptimConfig)
    """Policy optimizer; the schedule advances once per PPO step."""
    critic_optim: CriticOptimConfig = field(default_factory=CriticOptimConfig)
    """Critic optimizer (its own learning rate and gradient clipping)."""
    run: PPORunConfig = field(default_factory=PPORunConfig)
    """Run directory, logging, checkpoints (every `save_every` PPO steps)."""
    total_steps: int = 200
    """PPO steps (rollout + update) to run."""
    rollout_prompts: int = 64
    """Prompts per rollout; each gets gen.num_samples responses."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    minibatch_size: int = 16
    """Rollout rows per optimizer step; must divide rollout_prompts * gen.num_samples."""
    clip_range: float = 0.2
    """PPO ratio clip c: the surrogate stops pulling beyond 1 +- c."""
    clip_range_value: float = 0.2
    """Value clip: the critic moves at most this far from the rollout's values before its loss stops pulling."""
    vf_coef: float = 0.1
    """Weight of the value loss (the critic's gradient is vf_coef * d value loss)."""
    gamma: float = 1.0
    """Discount over response tokens."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over each rollout's response tokens."""
    target_kl: float = 0.0
    """Stop a step's update early when a minibatch's approx KL (k2) to the rollout policy exceeds this; 0: never."""
    dual_clip: float = 0.0
    """Dual-clip constant (> 1) capping the loss of negative-advantage tokens (Ye et al. 2020); 0 disables it."""
    halt_kl: float = 0.0
    """Alert when a rollout's mean per-sequence KL (ppo/kl) exceeds this; 0: never."""
    min_entropy: float = 0.0
    """Alert when a rollout's mean token entropy (ppo/entropy) falls below this; 0: never."""
    halt_on_alert: bool = True
    """On an alert, stop the run before training on that rollout (false: log the alert and go on)."""

    def resolve(self) -> None:
        """Check the sampling is on-policy and the rollout splits into whole minibatches."""
        if self.gen.temperature != 1.0 or self.gen.top_k != 0 or self.gen.top_p != 1.0:
            raise ConfigError("gen: PPO samples from the policy itself (temperature 1, top_k 0, top_p 1); tempered "
                              "or truncated sampling would need an importance correction that is not implemented")
        if self.gen.stop_strings:
            raise ConfigError("gen.stop_strings: PPO responses end at EOS or max_new_tokens only")
        if min(self.total_steps, self.rollout_prompts, self.ppo_epochs, self.minibatch_size) < 1:
            raise ConfigError("total_steps, rollout_prompts, ppo_epochs and minibatch_size must be >= 1")
        if self.dual_clip and self.dual_clip <= 1.0:
            raise ConfigError(f"dual_clip must exceed 1 (or be 0 to disable it), got {self.dual_clip}")
        try:
            exact_div(self.rollout_prompts * self.gen.num_samples, self.minibatch_size, "rollout rows")
        except ValueError as err:
            raise ConfigError(f"minibatch_size: {err}") from None


@dataclass
class PPOModels:
    """Pre-built models (tests inject tiny ones); `reference` None means a frozen copy of the policy
    (or, for a peft LoRA policy, the policy with its adapters disabled)."""

    policy: Any
    critic: Any
    tokenizer: Any
    reference: Any = None


@dataclass
class Experience:
    """One rollout prepared for the update; per-token tensors are (N, R) over response tokens."""

    input_ids: torch.Tensor  # (N, P + R) left-padded prompt, then the right-padded response
    attention_mask: torch.Tensor  # (N, P + R)
    prompt_width: int
    response_mask: torch.Tensor  # (N, R)
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@dataclass
class EncodedPrompt:
    """A prompt record with its tokens (rendered with the generation prompt)."""

    id: str
    messages: list[dict[str, str]]
    input_ids: list[int]


@dataclass
class PPOResult:
    """What a finished run hands to the next stage."""

    run_dir: Path
    final_dir: Path
    critic_dir: Path
    steps: int
    metrics: dict[str, float]
    halted: str | None = None


# ----------------------------------------------------------------------------------------------
# Phase helpers


def build_models(cfg: PPOConfig, device: torch.device) -> PPOModels:
    """Policy from its folder; critic from the reward model or the policy (fresh head, seeded init)."""
    if not cfg.policy.name_or_path:
        raise ConfigError("policy.name_or_path: PPO starts from a trained policy folder (e.g. the SFT final/)")
    policy, tokenizer = build_policy(cfg.policy, seed=cfg.run.seed)
    path = cfg.critic_path or (cfg.reward.source if cfg.critic_from == "reward" else cfg.policy.name_or_path)
    if not Path(path).is_dir():
        raise ConfigError(f"critic_path: the critic starts from a model folder, got {path!r} "
                          "(with a non-model reward source, set critic_from: policy or critic_path)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)  # a fresh value head's init depends on the seed only
        critic = load_sequence_classifier(path, cfg.policy.dtype)
    if critic.config.vocab_size != policy.config.vocab_size:
        raise ConfigError(f"critic {path!r} has a vocabulary of {critic.config.vocab_size}, the policy "
                          f"{policy.config.vocab_size}: the critic must read the policy's tokens")
    critic.config.pad_token_id = tokenizer.pad_token_id
    return PPOModels(policy, critic, tokenizer)  # train() moves them to its device


def load_prompts(cfg: PPOConfig, tokenizer: Any) -> tuple[list[EncodedPrompt], list[EncodedPrompt], dict[str, float]]:
    """Load and encode train and eval prompts with the generation prompt; drop the over-long ones."""
    def encoded(path: str, limit: int | None) -> tuple[list[EncodedPrompt], int]:
        rows = [EncodedPrompt(p.id, p.messages, encode_prompt(p.messages, tokenizer))
                for p in load_records(path, "prompt")[:limit]]
        kept = [r for r in rows if len(r.input_ids) <= cfg.data.max_prompt_length]
        return kept, len(rows) - len(kept)

    train, dropped = encoded(cfg.data.train_path, None)
    evals, _ = encoded(cfg.data.eval_path, cfg.data.max_eval_prompts) if cfg.data.eval_path else ([], 0)
    if len(train) < cfg.rollout_prompts:
        raise ConfigError(f"rollout_prompts {cfg.rollout_prompts} > {len(train)} usable training prompts")
    return train, evals, {"data/train_prompts": len(train), "data/train_dropped": dropped, "data/eval_prompts": len(evals)}


def step_seed(seed: int, step: int, purpose: int) -> int:
    """A seed that depends only on (run seed, step, purpose): sampling and shuffling replay exactly on resume."""
    return int(np.random.SeedSequence([seed, step, purpose]).generate_state(1, dtype=np.uint64)[0] >> 1)


def policy_forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and logits of the response tokens: (B, P + R) -> (B, R), (B, R, V); positions count real tokens.

    Only the last R + 1 positions go through the LM head (`logits_to_keep`), not the prompt's.
    """
    keep = ids.shape[1] - prompt_width + 1
    extra = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False,
                   **extra).logits
    logits = logits[:, -keep:-1]  # (B, R, V): position t predicts token t + 1
    return logprobs_of(logits, ids[:, prompt_width:]), logits


def critic_values(critic: Any, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """Value of the state before each response token (the heads' mean): (B, P + R) -> (B, R)."""
    return token_scores(critic, ids, mask)[:, prompt_width - 1 : -1].float().mean(dim=-1)  # (B, R)


def reference_context(reference: Any, policy: Any) -> tuple[Any, AbstractContextManager[Any]]:
    """The model giving reference log-probs, and the context to run it in (adapters off for LoRA)."""
    if reference is not None:
        return reference, nullcontext()
    return policy, policy.disable_adapter()


@torch.no_grad()
def rollout_forward(models: PPOModels, ids: torch.Tensor, mask: torch.Tensor, prompt_width: int,
                    chunk: int) -> dict[str, torch.Tensor]:
    """Old and reference log-probs, values and entropies of a whole rollout, `chunk` rows per forward."""
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
    for start in range(0, ids.shape[0], chunk):
        rows = slice(start, start + chunk)
        logp, logits = policy_forward(models.policy, ids[rows], mask[rows], prompt_width)
        parts["logprobs"].append(logp)
        parts["entropy"].append(entropy_from_logits(logits))
        reference, context = reference_context(models.reference, models.policy)
        with context, torch.inference_mode():
            ref = policy_forward(reference, ids[rows], mask[rows], prompt_width)[0]
        parts["ref_logprobs"].append(ref.clone())
        parts["values"].append(critic_values(models.critic, ids[rows], mask[rows], prompt_width))
    return {k: torch.cat(v) for k, v in parts.items()}


def policy_minibatch_loss(models: PPOModels, exp: Experience, idx: torch.Tensor, cfg: PPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss of rows `idx`, with its stats under their logged names."""
    ids, mask, real = exp.input_ids[idx], exp.attention_mask[idx], exp.response_mask[idx]
    logprobs, _ = policy_forward(models.policy, ids, mask, exp.prompt_width)  # (B, R)
    old = exp.old_logprobs[idx]
    policy_loss, stats = ppo_policy_loss(logprobs, old, exp.advantages[idx], real, cfg.clip_range, cfg.dual_clip or None)
    with torch.no_grad():
        ratio_dev = torch.where(real.bool(), torch.expm1(logprobs - old).abs(), torch.zeros_like(old)).max()
    stats.update({"ppo/policy/loss": policy_loss.detach(), "ppo/check/ratio_dev": ratio_dev})
    return policy_loss, stats


def value_minibatch_loss(models: PPOModels, exp: Experience, idx: torch.Tensor, cfg: PPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """vf_coef x clipped value loss of rows `idx`, with its stats under their logged names."""
    ids, mask, real = exp.input_ids[idx], exp.attention_mask[idx], exp.response_mask[idx]
    values = critic_values(models.critic, ids, mask, exp.prompt_width)  # (B, R)
    vf_loss, stats = value_loss(values, exp.old_values[idx], exp.returns[idx], real, cfg.clip_range_value)
    with torch.no_grad():
        value_dev = torch.where(real.bool(), (values - exp.old_values[idx]).abs(), torch.zeros_like(values)).max()
    stats.update({"ppo/value/loss": vf_loss.detach(), "ppo/check/value_dev": value_dev})
    return cfg.vf_coef * vf_loss, stats


MINIBATCH_LOSSES = (policy_minibatch_loss, value_minibatch_loss)
"""The two terms of PPO's loss, policy + vf_coef x value. The models share no parameter, so backpropagating each
term right after its own forward gives the gradients of the sum exactly, and the policy's activations are
freed before the critic's are made (peak memory holds one model's activations, not both)."""


def check_first_minibatch(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """T7e: before any update the ratio is 1 and the approx KL 0; otherwise generation and training disagree."""
    checks = {"ppo/check/ratio_dev": float(stats["ppo/check/ratio_dev"]),
              "ppo/check/approxkl": float(stats["ppo/policy/approxkl_k2"]),
              "ppo/check/value_dev": float(stats["ppo/check/value_dev"])}
    if max(checks.values()) > MISMATCH_TOLERANCE:
        raise RolloutMismatchError(f"first minibatch before any update: {checks} exceed {MISMATCH_TOLERANCE}; the "
                                   "update's forward differs from the rollout's (masking, position ids or dropout)")
    return checks


def prepare_experience(cfg: PPOConfig, models: PPOModels, rollout: Rollout, scores: torch.Tensor, kl_coef: float,
                       device: torch.device) -> tuple[Experience, dict[str, float]]:
    """Forward the rollout, penalise KL per token, GAE and whitening; return it with the rollout's stats."""
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1).to(device)  # (N, P + R)
    mask = torch.cat([rollout.prompt_mask, rollout.response_mask], dim=1).to(device)  # (N, P + R)
    real = rollout.response_mask.to(device)  # (N, R)
    width = rollout.prompt_ids.shape[1]
    out = rollout_forward(models, ids, mask, width, cfg.minibatch_size)
    with torch.no_grad():
        kl = kl_penalty(out["logprobs"], out["ref_logprobs"], cfg.kl.estimator) * real  # (N, R)
        ended = rollout.ended.to(device)
        rewards, kl_rewards = token_rewards(scores.to(device), kl, real, kl_coef,
                                            no_eos_penalty=cfg.reward.no_eos_penalty, ended=ended)  # (N, R)
        advantages, returns = gae(rewards, out["values"], real, cfg.gamma, cfg.lam)  # (N, R)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, real)
        gen_dev = masked_mean(torch.expm1(rollout.logprobs.to(device) - out["logprobs"]).abs(), real)
    stats = {
        "ppo/kl": float(kl.sum(1).mean()),
        "ppo/entropy": float(masked_mean(out["entropy"], real)),
        "ppo/reward": float(rewards.sum(1).mean()),
        "ppo/non_score_reward": float(kl_rewards.sum(1).mean()),
        "ppo/value/mean": float(masked_mean(out["values"], real)),
        "ppo/value/explained_variance": float(explained_variance(out["values"], returns, real)),
        "ppo/check/gen_logprob_dev": float(gen_dev),
    }
    exp = Experience(ids, mask, width, real, out["logprobs"], out["values"], advantages, returns)
    return exp, stats


def rollout_stats(rollout: Rollout, raw: torch.Tensor, eos_id: int) -> dict[str, float]:
    """What the sampled responses look like, before any training on them."""
    real = rollout.response_mask.bool()
    return {
        "ppo/score": float(raw.mean()),
        "ppo/score_std": float(raw.std()) if raw.numel() > 1 else 0.0,
        "ppo/response_length": float(real.sum(1).float().mean()),
        "ppo/no_eos_share": float((~rollout.ended).float().mean()),
        "ppo/num_eos_tokens": float(((rollout.response_ids == eos_id) & real).sum()),
    }


def alerts(cfg: PPOConfig, stats: dict[str, float]) -> dict[str, float]:
    """T7h: 1.0 for each threshold the rollout breaches (KL too high, entropy too low)."""
    return {"alert/kl": float(bool(cfg.halt_kl) and stats["ppo/kl"] > cfg.halt_kl),
            "alert/entropy": float(bool(cfg.min_entropy) and stats["ppo/entropy"] < cfg.min_entropy)}


def ppo_update(cfg: PPOConfig, models: PPOModels, exp: Experience, optimizers: dict[str, torch.optim.Optimizer],
               guard: runtime.NonFiniteGuard, step: int, acc: Any) -> dict[str, float]:
    """`ppo_epochs` passes of shuffled minibatches over one rollout; returns the stats averaged over minibatches."""
    shuffle = torch.Generator().manual_seed(step_seed(cfg.run.seed, step, 1))
    clip = {"policy": cfg.optim.max_grad_norm, "critic": cfg.critic_optim.max_grad_norm}
    sums: dict[str, float] = {}
    checks: dict[str, float] = {}
    taken = 0
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(exp.input_ids.shape[0], generator=shuffle).to(exp.input_ids.device)
        for idx in perm.split(cfg.minibatch_size):
            poison = runtime.test_hooks(step + 1, taken)  # kill here: `taken` optimizer steps into the update
            stats: dict[str, torch.Tensor] = {}
            for minibatch_loss in MINIBATCH_LOSSES:
                with acc.autocast():
                    loss, part = minibatch_loss(models, exp, idx, cfg)
                stats.update(part)
                (loss * float("inf") if poison else loss).backward()
            if taken == 0:
                checks = check_first_minibatch(stats)
            norms = {name: torch.nn.utils.clip_grad_norm_(getattr(models, name).parameters(),
                                                          clip[name] if clip[name] > 0 else float("inf"))
                     for name in ("policy", "critic")}
            if guard.check(torch.stack(list(norms.values()))):  # both models step, or neither
                for optimizer in optimizers.values():
                    optimizer.step()
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            stats.update({"train/policy_grad_norm": norms["policy"], "train/critic_grad_norm": norms["critic"]})
            for key, value in stats.items():
                if not key.startswith("ppo/check/"):
                    sums[key] = sums.get(key, 0.0) + float(value)
            taken += 1
            if cfg.target_kl > 0 and float(stats["ppo/policy/approxkl_k2"]) > cfg.target_kl:
                return {**{k: v / taken for k, v in sums.items()}, **checks,
                        "ppo/update/minibatches": taken, "ppo/update/early_stopped": 1.0}
    return {**{k: v / taken for k, v in sums.items()}, **checks, "ppo/update/minibatches": taken,
            "ppo/update/early_stopped": 0.0}


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: runtime.lr_factor(s, total_steps, cfg))


@torch.no_grad()
def eval_judges(specs: list[str], device: torch.device) -> dict[str, RewardSource]:
    """The held-out judges of `reward.eval_sources`, by name (NAME=SPEC)."""
    judges = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name.isidentifier():
            raise ConfigError(f"reward.eval_sources: expected NAME=SPEC with NAME a plain word, got {spec!r}")
        judges[name] = reward_source(source, device)
    return judges


def evaluate(cfg: PPOConfig, models: PPOModels, prompts: list[EncodedPrompt], score_fn: RewardSource,
             judges: dict[str, RewardSource] | None = None) -> dict[str, float]:
    """Sample once per held-out prompt (fixed seed, so steps compare); score with the reward source and each judge."""
    gen = copy.copy(cfg.gen)
    gen.num_samples = 1
    rollout = generate(models.policy, models.tokenizer, [p.input_ids for p in prompts], gen, seed=step_seed(cfg.run.seed, 0, 2))
    messages = [prompts[i].messages for i in rollout.prompt_index.tolist()]
    responses = decode_responses(rollout, models.tokenizer)
    stats = {"eval/score": float(score_fn(messages, responses).mean()),
             "eval/response_length": float(rollout.response_mask.sum(1).float().mean()),
             "eval/no_eos_share": float((~rollout.ended).float().mean())}
    for name, judge in (judges or {}).items():
        stats[f"eval/{name}_score"] = float(judge(messages, responses).mean())
    return stats


# ----------------------------------------------------------------------------------------------


def train(cfg: PPOConfig, *, models: PPOModels | None = None, reward_fn: RewardSource | None = None,
          on_step_end: Callable[[int], None] | None = None) -> PPOResult:
    """Run PPO to completion (or resume it); save the policy (final/) and critic (final_critic/).

    `on_step_end(step)` is called after each PPO step (rollout + update) and its logging (the benchmarks time
    steps with it).
    """
    # 1. runtime, prompts, models, reward source (all checked before anything is written)
    cfg.resolve()
    runtime.seed_everything(cfg.run.seed, deterministic=cfg.run.deterministic)
    acc = runtime.setup_accelerator(mixed_precision=cfg.run.mixed_precision)
    if acc.num_processes > 1:
        raise ConfigError("PPO runs in a single process for now (launch it without torchrun)")
    device = acc.device
    models = models or build_models(cfg, device)
    policy, critic, tokenizer = models.policy.to(device), models.critic.to(device), models.tokenizer
    if models.reference is None and not hasattr(policy, "disable_adapter"):
        models.reference = copy.deepcopy(policy)  # the starting weights, before any resume or update
    if models.reference is not None:
        models.reference.requires_grad_(False).eval()
    policy.eval()  # dropout off everywhere; gradients still flow
    critic.eval()
    score_fn = reward_fn or reward_source(cfg.reward.source, device, normalize=cfg.reward.normalize == "saved")
    if reward_fn is not None and cfg.reward.normalize == "saved":
        raise ConfigError("reward.normalize=saved needs a reward-model folder as reward.source")
    judges = eval_judges(cfg.reward.eval_sources, device)
    train_prompts, eval_prompts, data_counts = load_prompts(cfg, tokenizer)
    steps_per_epoch = len(train_prompts) // cfg.rollout_prompts
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    # 2. optimizers, schedules, controller, resume
    optimizers = {"policy": runtime.make_optimizer(policy, cfg.optim), "critic": runtime.make_optimizer(critic, cfg.critic_optim)}
    schedulers = {"policy": make_scheduler(optimizers["policy"], cfg.optim, cfg.total_steps),
                  "critic": make_scheduler(optimizers["critic"], cfg.critic_optim, cfg.total_steps)}
    kl_ctl = (AdaptiveKLController(cfg.kl.init_coef, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive
              else FixedKLController(cfg.kl.init_coef))
    score_norm, guard, step = RunningScoreNorm(), runtime.NonFiniteGuard(), 0
    resumed = checkpoint.resume(run_dir, cfg.run.resume, model={"policy": policy, "critic": critic},
                                optimizer=optimizers, scheduler=schedulers)
    if resumed is not None:
        step = resumed["step"]
        kl_ctl.load_state_dict(resumed["kl_controller"])
        score_norm.load_state_dict(resumed["score_norm"])
        guard.load_state_dict(resumed["guard"])
        if cfg.run.record_sample_ids:
            runtime.truncate_jsonl(run_dir / "sample_ids.jsonl", max_step=step)
    metrics = runtime.MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard, resume_step=step if resumed else None)
    if resumed is None:  # the starting policy's held-out scores are the baseline every later eval compares with
        start = evaluate(cfg, models, eval_prompts, score_fn, judges) if eval_prompts and cfg.run.eval_every else {}
        metrics.log(0, {**data_counts, **start})
    bar = runtime.progress(cfg.total_steps, "ppo", disable=not cfg.run.progress_bar, initial=step)
    order: list[int] = []
    order_epoch, last, halted = -1, {}, None
    t_start = time.perf_counter()

    while step < cfg.total_steps:
        # 3. this step's prompts (a pure function of seed and data position) and the rollout
        t0 = time.perf_counter()
        epoch, pos = runtime.data_position(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = np.random.default_rng([cfg.run.seed, epoch]).permutation(len(train_prompts)).tolist(), epoch
        chosen = [train_prompts[i] for i in order[pos * cfg.rollout_prompts : (pos + 1) * cfg.rollout_prompts]]
        rollout = generate(policy, tokenizer, [p.input_ids for p in chosen], cfg.gen, seed=step_seed(cfg.run.seed, step, 0))
        t1 = time.perf_counter()

        # 4. score with the reward source; normalise and clip
        raw = score_fn([chosen[i].messages for i in rollout.prompt_index.tolist()], decode_responses(rollout, tokenizer))
        stats = rollout_stats(rollout, raw, tokenizer.eos_token_id)
        scores = raw
        if cfg.reward.normalize == "running":
            score_norm.update(raw)
            scores = score_norm.normalize(raw)
            stats.update({"ppo/score_norm_mean": score_norm.mean, "ppo/score_norm_std": score_norm.std})
        if cfg.reward.clip > 0:
            scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)
        runtime.test_hooks(step + 1, "rollout")
        t2 = time.perf_counter()

        # 5. training-style forward: old and reference log-probs, values; KL-penalised rewards, GAE
        with acc.autocast():
            exp, experience_stats = prepare_experience(cfg, models, rollout, scores, kl_ctl.value, device)
        stats.update(experience_stats)
        stats["ppo/kl_coef"] = kl_ctl.value
        stats.update(alerts(cfg, stats))
        if any(stats[k] for k in ("alert/kl", "alert/entropy")):
            log.warning("alert at step %d: KL %.3f (halt_kl %s), entropy %.3f (min_entropy %s)", step + 1,
                        stats["ppo/kl"], cfg.halt_kl, stats["ppo/entropy"], cfg.min_entropy)
            if cfg.halt_on_alert:
                halted = "kl" if stats["alert/kl"] else "entropy"
                last = stats
                metrics.log(step + 1, stats)
                break
        t3 = time.perf_counter()

        # 6. PPO epochs over shuffled minibatches, one optimizer step each; early stop on approx KL
        lrs = {name: sched.get_last_lr()[0] for name, sched in schedulers.items()}
        stats.update(ppo_update(cfg, models, exp, optimizers, guard, step, acc))
        for sched in schedulers.values():
            sched.step()
        kl_ctl.update(stats["ppo/kl"], n_steps=exp.input_ids.shape[0])
        step += 1
        bar.update(1)
        t4 = time.perf_counter()
        if cfg.run.record_sample_ids:
            with open(run_dir / "sample_ids.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "ids": [p.id for p in chosen]}) + "\n")

        # 7. log, evaluate, checkpoint
        stats.update({"train/lr": float(lrs["policy"]), "train/critic_lr": float(lrs["critic"]), "train/epoch": step / steps_per_epoch,
                      "train/skipped_steps": guard.skipped_steps, "perf/generate_s": t1 - t0, "perf/score_s": t2 - t1,
                      "perf/forward_s": t3 - t2, "perf/train_s": t4 - t3,
                      "perf/steps_per_s": step / max(1e-9, time.perf_counter() - t_start)})
        if eval_prompts and ((cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == cfg.total_steps):
            stats.update(evaluate(cfg, models, eval_prompts, score_fn, judges))
        last = stats
        if step % cfg.run.log_every == 0 or step == cfg.total_steps:
            metrics.log(step, stats)
            bar.set_postfix(score=f"{stats['ppo/score']:.3f}", kl=f"{stats['ppo/kl']:.3f}")
        if cfg.run.save_every and step % cfg.run.save_every == 0 and step < cfg.total_steps:
            state = {"epoch": epoch, "kl_controller": kl_ctl.state_dict(), "score_norm": score_norm.state_dict(),
                     "guard": guard.state_dict()}
            checkpoint.save_checkpoint(run_dir, step, model={"policy": policy, "critic": critic}, optimizer=optimizers,
                                       scheduler=schedulers, state=state, keep_last=cfg.run.keep_checkpoints)
        runtime.test_hooks(step)
        if on_step_end is not None:
            on_step_end(step)

    # 8. final policy and critic in Hugging Face format, run manifest
    bar.close()
    metrics.close()
    final_dir, critic_dir = run_dir / "final", run_dir / "final_critic"
    save_pretrained(critic, tokenizer, critic_dir)
    save_pretrained(policy, tokenizer, final_dir)
    runtime.write_run_manifest(run_dir, command="ppo", config=to_dict(cfg),
                               extra={"steps": step, "halted": halted, "kl_coef": kl_ctl.value, **last})
    return PPOResult(run_dir, final_dir, critic_dir, step, last, halted)
