"""Reward model training on human comparisons (the second RLHF stage).

Choices:
- Model: a sequence classifier with `ensemble_size` scalar heads on one backbone, by default the SFT
  policy's weights (InstructGPT). The score is read at each sequence's last real token, with position
  ids counted over real tokens, so left and right padding give the same score.
- Loss: Bradley-Terry, -log sigmoid(r_chosen - r_rejected - margin) (margin from the data's Likert
  strength when `use_margin`), plus optional reward centering coef * mean(r^2).
- Chosen and rejected go through the model in one concatenated forward.
- Rankings become all C(K,2) pairs, kept adjacent in the data order and weighted 1/C(K,2) so one
  ranking counts as one comparison (InstructGPT). Deviation: a ranking can straddle two batches.
- Ensemble: each head sees its own bootstrap resample of the pairs (Poisson(1) weights fixed per
  pair and head); the reward is the heads' mean, the uncertainty their standard deviation.
- The held-out split is by prompt (no prompt in both splits); training stops early when the train
  minus held-out accuracy gap exceeds `max_overfit_gap` (RELIABILITY T7i).
- After training, the mean and std of the reward on the held-out responses are saved next to the
  model (`reward_stats.json`) for later normalisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from alignloop import checkpoint, files, runtime
from alignloop.config import (
    BatchConfig,
    ConfigError,
    ModelConfig,
    OptimConfig,
    RunConfig,
    save_config,
    to_dict,
)
from alignloop.data import PreferencePair, load_records
from alignloop.losses import bradley_terry, reward_centering
from alignloop.models import load_sequence_classifier, load_tokenizer, save_pretrained
from alignloop.preferences import ranking_to_pairs
from alignloop.rewards import has_decoder_backbone, sequence_scores, shared_prefix_pair_scores
from alignloop.tensors import pack_shared_prefix
from alignloop.tokenization import tokenize_conversation

log = logging.getLogger(__name__)


@dataclass
class RewardDataConfig:
    """Comparisons to learn from."""

    train_path: str = ""
    """Preference pairs (or rankings, see `kind`): JSONL/JSON/CSV/Parquet, a `datasets` folder or hub name."""
    eval_path: str = ""
    """Held-out comparisons; empty: hold out `eval_share` of the training prompts."""
    kind: Literal["pair", "ranking"] = "pair"
    """Record kind of the files: pairs, or K-way rankings turned into all C(K,2) pairs."""
    eval_share: float = 0.1
    """Share of prompts held out when there is no eval_path (split by prompt, never by pair)."""
    max_length: int = 128
    """Longest tokenised prompt + response."""
    truncation: Literal["drop", "truncate_prompt", "error"] = "truncate_prompt"
    """Longer sequences: drop the pair, cut the prompt from the left, or stop with an error."""
    use_margin: bool = True
    """Use each pair's margin (from its Likert strength) in the loss."""


@dataclass
class RewardConfig:
    """Everything a reward-model run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone: usually the SFT policy's final folder (a causal LM gets a fresh scalar head)."""
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    """Comparisons."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.0))
    """Optimizer and schedule."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/reward", eval_every=100, save_every=100))
    """Run directory, logging, checkpoints."""
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(micro_batch_size=32, epochs=1.5))
    """Pairs per step (each pair is two sequences in one forward) and training length."""
    ensemble_size: int = 1
    """Number of reward heads; > 1 trains each on a bootstrap resample and reports an uncertainty."""
    center_coef: float = 0.0
    """Weight of the reward-centering term mean(r^2) (0 disables it)."""
    max_overfit_gap: float = 0.15
    """Stop when train accuracy exceeds held-out accuracy by more than this (evaluated every eval_every)."""
    shared_prompt: bool = True
    """Train on each pair as one row: the prompt once, then both responses, each seeing the prompt and itself
    (exact for causal decoders, and the prompt is computed once instead of twice); encoders and multi-process
    runs use two rows per pair."""

    def resolve(self) -> None:
        """Compute derived sizes once."""
        self.batch.resolve()
        if self.ensemble_size < 1:
            raise ConfigError("ensemble_size must be >= 1")


@dataclass
class TokenizedPair:
    """Token ids of prompt+chosen and prompt+rejected, with loss weights per ensemble head."""

    id: str
    prompt_key: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float
    weights: list[float]


@dataclass
class RewardResult:
    """What a finished run hands to the next stage."""

    run_dir: Path
    final_dir: Path
    steps: int
    metrics: dict[str, float]
    stopped_early: bool = False


# ----------------------------------------------------------------------------------------------
# Phase helpers


def prompt_key(pair: PreferencePair) -> str:
    """Identity of a pair's prompt for splitting: `meta['prompt_id']` if given, else a hash of the prompt."""
    if "prompt_id" in pair.meta:
        return str(pair.meta["prompt_id"])
    return hashlib.sha256(json.dumps(pair.prompt, sort_keys=True).encode()).hexdigest()[:16]


def split_by_prompt(pairs: list[PreferencePair], eval_share: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic held-out split by prompt: no prompt has pairs on both sides."""
    def held_out(key: str) -> bool:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < eval_share

    train = [p for p in pairs if not held_out(prompt_key(p))]
    evals = [p for p in pairs if held_out(prompt_key(p))]
    return train, evals


def load_comparisons(cfg: RewardConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Load, validate and split the comparisons before anything is written."""
    def read(path: str) -> list[PreferencePair]:
        if cfg.data.kind == "ranking":
            return [pair for r in load_records(path, "ranking") for pair in ranking_to_pairs(r)]
        return load_records(path, "pair")

    pairs = read(cfg.data.train_path)
    if cfg.data.eval_path:
        return pairs, read(cfg.data.eval_path)
    return split_by_prompt(pairs, cfg.data.eval_share, cfg.run.seed)


def tokenize_pairs(
    pairs: list[PreferencePair], tokenizer: Any, cfg: RewardConfig, seed: int
) -> tuple[list[TokenizedPair], int]:
    """Tokenise both sides of every pair (EOS closes each response); returns the pairs and the number dropped."""
    group_sizes: dict[str, int] = {}
    for p in pairs:
        if "group" in p.meta:
            group_sizes[str(p.meta["group"])] = group_sizes.get(str(p.meta["group"]), 0) + 1
    gen = torch.Generator().manual_seed(seed)
    out, dropped = [], 0
    for p in pairs:
        sides = [
            tokenize_conversation([*p.prompt, {"role": "assistant", "content": text}], tokenizer,
                                  cfg.data.max_length, cfg.data.truncation, example_id=p.id)
            for text in (p.chosen, p.rejected)
        ]
        bootstrap = torch.poisson(torch.ones(cfg.ensemble_size), generator=gen) if cfg.ensemble_size > 1 else torch.ones(1)
        if sides[0] is None or sides[1] is None:
            dropped += 1
            continue
        group_weight = 1.0 / group_sizes[str(p.meta["group"])] if "group" in p.meta else 1.0
        margin = float(p.margin) if (cfg.data.use_margin and p.margin is not None) else 0.0
        weights = [float(b) * group_weight for b in bootstrap.tolist()]
        out.append(TokenizedPair(p.id, prompt_key(p), sides[0].input_ids, sides[1].input_ids, margin, weights))
    return out, dropped


def collate_pairs(batch: list[TokenizedPair], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one padded batch: input_ids/attention_mask (2B, T), margin (B,), weights (B, K)."""
    seqs = [p.chosen_ids for p in batch] + [p.rejected_ids for p in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.tensor(s)
        mask[i, cols] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "margin": torch.tensor([p.margin for p in batch], dtype=torch.float32),
        "weights": torch.tensor([p.weights for p in batch], dtype=torch.float32),
    }


def collate_shared_pairs(batch: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Each pair as one row with its prompt once (`tensors.pack_shared_prefix`), margin (B,), weights (B, K)."""
    packed = pack_shared_prefix([(p.chosen_ids, p.rejected_ids) for p in batch], pad_id)
    packed.update(margin=torch.tensor([p.margin for p in batch], dtype=torch.float32),
                  weights=torch.tensor([p.weights for p in batch], dtype=torch.float32))
    return packed


def pair_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], weight_total: float, center_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward for both sides (shared-prompt rows or chosen rows then rejected rows); BT loss per head,
    weighted, normalised by the step's total weight."""
    if "first_last" in batch:
        shared = shared_prefix_pair_scores(model, batch)
        if shared is None:
            raise TypeError(f"{type(model).__name__}: shared-prompt rows need a causal decoder with a score head")
        chosen, rejected = shared[0].float(), shared[1].float()  # (B, K)
    else:
        both = sequence_scores(model, batch["input_ids"], batch["attention_mask"]).float()  # (2B, K)
        chosen, rejected = both[: both.shape[0] // 2], both[both.shape[0] // 2 :]  # (B, K)
    scores, n = torch.cat([chosen, rejected]), chosen.shape[0]
    heads = chosen.shape[1]
    loss = torch.zeros((), device=scores.device)
    for k in range(heads):
        head_loss, _ = bradley_terry(chosen[:, k], rejected[:, k], batch["margin"], batch["weights"][:, k])
        loss = loss + head_loss * batch["weights"][:, k].sum() / weight_total / heads
    _, stats = bradley_terry(chosen.mean(1), rejected.mean(1))
    if center_coef > 0:
        center, center_stats = reward_centering(scores, center_coef)
        loss = loss + center * n / max(1.0, weight_total)
        stats.update(center_stats)
    return loss, stats


@torch.no_grad()
def score_pairs(model: torch.nn.Module, pairs: list[TokenizedPair], pad_id: int, batch_size: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected for every pair: (N, K) each; `batch_size` sequences (half as many pairs)
    per forward, so evaluation never holds more activations than its setting says."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    per_forward = max(1, batch_size // 2)
    for start in range(0, len(pairs), per_forward):
        batch = collate_pairs(pairs[start : start + per_forward], pad_id)
        scores = sequence_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
        n = scores.shape[0] // 2
        chosen.append(scores[:n])
        rejected.append(scores[n:])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def accuracy_of(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs where the mean head scores chosen above rejected: (N, K), (N, K) -> float."""
    return float((chosen.mean(1) > rejected.mean(1)).float().mean())


def pair_accuracy(model: torch.nn.Module, pairs: list[TokenizedPair], pad_id: int, batch_size: int, device: Any) -> float:
    """`accuracy_of` the model's scores on `pairs`."""
    return accuracy_of(*score_pairs(model, pairs, pad_id, batch_size, device))


def reward_statistics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Mean and std of the (head-mean) reward over all responses of a reference set."""
    rewards = torch.cat([chosen.mean(1), rejected.mean(1)]).double()
    return {"mean": float(rewards.mean()), "std": float(rewards.std()), "count": int(rewards.numel())}


def _build_model(cfg: RewardConfig, models: Any) -> tuple[Any, Any]:
    if models is not None:
        return models
    if not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path: a reward model starts from a backbone folder or hub name (e.g. the SFT final/)")
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)  # the fresh head's init depends on the seed only
        model = load_sequence_classifier(cfg.model.name_or_path, cfg.model.dtype, cfg.ensemble_size, cfg.model.lora)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ----------------------------------------------------------------------------------------------


def train(cfg: RewardConfig, *, models: tuple[Any, Any] | None = None,
          on_step_end: Callable[[int], None] | None = None) -> RewardResult:
    """Train a reward model to completion (or resume it); save it with its reward statistics.

    `on_step_end(step)` is called after each optimizer step and its logging (the benchmarks time steps with it).
    """
    # 1. runtime, data (validated before anything is written), model
    if not cfg.batch.global_batch_size:
        cfg.resolve()
    runtime.seed_everything(cfg.run.seed, deterministic=cfg.run.deterministic)
    acc = runtime.setup_accelerator(mixed_precision=cfg.run.mixed_precision)
    train_pairs, eval_pairs = load_comparisons(cfg)
    model, tokenizer = _build_model(cfg, models)
    train_set, train_dropped = tokenize_pairs(train_pairs, tokenizer, cfg, cfg.run.seed)
    eval_set, eval_dropped = tokenize_pairs(eval_pairs, tokenizer, cfg, cfg.run.seed + 1)
    leaked = {p.prompt_key for p in train_set} & {p.prompt_key for p in eval_set}
    if leaked:
        raise ValueError(f"{len(leaked)} prompts are in both the training and held-out comparisons (e.g. {sorted(leaked)[0]})")
    steps_per_epoch, total_steps = cfg.batch.total_steps(len(train_set))
    run_dir, is_main = Path(cfg.run.output_dir), acc.is_main_process
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # 2. optimizer, schedule, resume
    model = model.to(acc.device)
    model.train()
    optimizer = runtime.make_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: runtime.lr_factor(s, total_steps, cfg.optim))
    guard, step = runtime.NonFiniteGuard(), 0
    resumed = checkpoint.resume(run_dir, cfg.run.resume, model=model, optimizer=optimizer, scheduler=scheduler)
    if resumed is not None:
        step = resumed["step"]
        guard.load_state_dict(resumed["guard"])
    wrapped, optimizer = acc.prepare(model, optimizer)
    # Shared-prompt rows call the backbone directly, which only an unwrapped (single-process) decoder allows.
    shared_rows = cfg.shared_prompt and wrapped is model and has_decoder_backbone(model)
    collate = collate_shared_pairs if shared_rows else collate_pairs
    metrics = runtime.MetricsLogger(run_dir, enabled=is_main, tensorboard=cfg.run.tensorboard,
                                    resume_step=step if resumed else None)
    if is_main and resumed is None:
        metrics.log(0, {"data/train_pairs": float(len(train_set)), "data/train_dropped": float(train_dropped),
                        "data/eval_pairs": float(len(eval_set)), "data/eval_dropped": float(eval_dropped)})
    bar = runtime.progress(total_steps, "reward", disable=not (is_main and cfg.run.progress_bar), initial=step)

    # 3. the loop: one global batch of pairs per optimizer step
    last: dict[str, float] = {}
    batches: list[list[int]] = []
    batches_epoch = -1
    stopped_early = False
    eval_scores: tuple[torch.Tensor, torch.Tensor] | None = None
    t0 = time.perf_counter()
    while step < total_steps:
        epoch, pos = runtime.data_position(step, steps_per_epoch)
        if epoch != batches_epoch:
            batches = _epoch_batches(train_set, cfg.batch.global_batch_size, cfg.run.seed, epoch)
            batches_epoch = epoch
        global_idx = batches[pos]
        weight_total = sum(sum(train_set[i].weights) for i in global_idx) / cfg.ensemble_size
        micro_batches = runtime.split_global_batch(global_idx, acc.process_index, acc.num_processes, cfg.batch.grad_accum_steps)
        step_stats: dict[str, float] = {}
        for micro, idx in enumerate(micro_batches):
            batch = {k: v.to(acc.device) for k, v in collate([train_set[i] for i in idx], tokenizer.pad_token_id).items()}
            sync = micro == len(micro_batches) - 1
            with (acc.no_sync(wrapped) if not sync else nullcontext()), acc.autocast():
                loss, stats = pair_loss(wrapped, batch, weight_total / acc.num_processes, cfg.center_coef)
                if runtime.test_hooks(step + 1, micro):
                    loss = loss * float("inf")
                acc.backward(loss)
            share = len(idx) / len(global_idx) * acc.num_processes
            for key, value in {"rm/loss": loss.detach() / acc.num_processes, **stats}.items():
                step_stats[key] = step_stats.get(key, 0.0) + float(value) * (1.0 if key == "rm/loss" else share / acc.num_processes)

        # 4. clip, guard, step
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(wrapped.parameters(), max_norm)
        lr = scheduler.get_last_lr()[0]
        if guard.check(grad_norm):
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        # 5. log, evaluate (with the overfitting stop), checkpoint
        if step % cfg.run.log_every == 0 or step == total_steps:
            last = {**step_stats, "train/grad_norm": float(grad_norm), "train/lr": lr,
                    "train/skipped_steps": float(guard.skipped_steps), "train/epoch": step / steps_per_epoch,
                    "perf/steps_per_s": step / max(1e-9, time.perf_counter() - t0)}
            metrics.log(step, last)
        if eval_set and ((cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == total_steps):
            unwrapped = acc.unwrap_model(wrapped)
            eval_scores = score_pairs(unwrapped, eval_set, tokenizer.pad_token_id, cfg.batch.eval_batch_size, acc.device)
            eval_acc = accuracy_of(*eval_scores)
            train_acc = pair_accuracy(unwrapped, train_set[: min(len(eval_set), 512)], tokenizer.pad_token_id, cfg.batch.eval_batch_size, acc.device)
            last.update({"eval/rm_accuracy": eval_acc, "eval/rm_train_accuracy": train_acc})
            metrics.log(step, {"eval/rm_accuracy": eval_acc, "eval/rm_train_accuracy": train_acc})
            if train_acc - eval_acc > cfg.max_overfit_gap:
                log.warning("stopping: train accuracy %.3f exceeds held-out %.3f by more than %.2f",
                            train_acc, eval_acc, cfg.max_overfit_gap)
                stopped_early = True
                break
        if cfg.run.save_every and step % cfg.run.save_every == 0 and step < total_steps:
            acc.wait_for_everyone()
            if is_main:
                checkpoint.save_checkpoint(run_dir, step, model=acc.unwrap_model(wrapped), optimizer=optimizer,
                                           scheduler=scheduler, state={"epoch": epoch, "guard": guard.state_dict()},
                                           keep_last=cfg.run.keep_checkpoints)
            acc.wait_for_everyone()
        runtime.test_hooks(step)
        if on_step_end is not None:
            on_step_end(step)

    # 6. reward statistics on held-out responses, final model, manifest
    bar.close()
    metrics.close()
    acc.wait_for_everyone()
    final_dir = run_dir / "final"
    if is_main:
        unwrapped = acc.unwrap_model(wrapped)
        if eval_scores is None:  # the last evaluation, when there was one, scored the final model
            reference = eval_set or train_set[: cfg.batch.eval_batch_size * 4]
            eval_scores = score_pairs(unwrapped, reference, tokenizer.pad_token_id, cfg.batch.eval_batch_size, acc.device)
        stats = reward_statistics(*eval_scores)  # the final model's held-out scores (computed once)
        save_pretrained(unwrapped, tokenizer, final_dir)
        files.atomic_write_json(final_dir / "reward_stats.json", {**stats, "ensemble_size": cfg.ensemble_size})
        runtime.write_run_manifest(run_dir, command="reward", config=to_dict(cfg),
                                   extra={"steps": step, "stopped_early": stopped_early, **last})
    acc.wait_for_everyone()
    return RewardResult(run_dir, final_dir, step, last, stopped_early)


def _epoch_batches(pairs: list[TokenizedPair], batch_size: int, seed: int, epoch: int,
                   window_batches: int = 50) -> list[list[int]]:
    """Global batches of pair indices for one epoch, deterministic in (seed, epoch).

    Prompts are shuffled, then sorted by their longest sequence within windows of `window_batches`
    batches, cut into batches (one prompt's pairs, e.g. a ranking's, stay adjacent) and the batch order
    shuffled: padding, the main cost of a batch, falls about twofold. The last partial batch is dropped.
    """
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_prompt.setdefault(p.prompt_key, []).append(i)
    units = list(by_prompt.values())
    longest = [max(max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)) for i in unit) for unit in units]
    rng = np.random.default_rng([seed, epoch])
    shuffled = rng.permutation(len(units)).tolist()
    per_window = max(1, len(units) * batch_size * window_batches // max(1, len(pairs)))
    order: list[int] = []
    for start in range(0, len(shuffled), per_window):
        window = sorted(shuffled[start : start + per_window], key=lambda u: longest[u])
        order.extend(i for u in window for i in units[u])
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def evaluate_against(
    model_dir: str | Path, cfg: RewardConfig, judge: Any = None, pairs_path: str = "",
    pairs: list[PreferencePair] | None = None,
) -> dict[str, float]:
    """`evaluate.reward_report` of a saved reward model on held-out comparisons (`pairs`, else the file
    `pairs_path`, else the config's eval_path or held-out split), against a gold `judge` when one is given."""
    from alignloop.evaluate import reward_report

    if pairs is None:
        pairs = load_records(pairs_path, "pair") if pairs_path else load_comparisons(cfg)[1]
    tokenizer = load_tokenizer(str(model_dir))
    model = load_sequence_classifier(str(model_dir)).eval()
    tokenized, dropped = tokenize_pairs(pairs, tokenizer, cfg, seed=0)
    kept = {t.id for t in tokenized}
    chosen, rejected = score_pairs(model, tokenized, tokenizer.pad_token_id, cfg.batch.eval_batch_size, torch.device("cpu"))
    report = reward_report([p for p in pairs if p.id in kept], chosen, rejected, judge)
    return {"pairs": float(len(tokenized)), "dropped": float(dropped), **report}


def load_reward_stats(model_dir: str | Path) -> dict[str, float]:
    """The reward statistics saved with a reward model (mean, std), for normalising its scores."""
    path = Path(model_dir) / "reward_stats.json"
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read reward statistics: {err}") from err
    if not math.isfinite(stats.get("std", float("nan"))):
        raise ValueError(f"{path}: field 'std' is missing or not finite")
    return stats
