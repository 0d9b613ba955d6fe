"""Supervised fine-tuning on demonstrations (the first RLHF stage).

Choices:
- Loss: NLL on assistant tokens only (prompt masking; the EOS closing each response is a target).
  The sum is divided by the number of loss tokens in the whole optimizer step (all micro-batches,
  all ranks), so micro-batch x accumulation and data-parallel splits of one global batch give the
  same gradient. (Averaging per micro-batch, as many trainers do, weights short examples more.)
- Batches: length-bucketed global batches, deterministic from (seed, epoch); the last partial
  global batch of an epoch is dropped so every optimizer step sees the same number of examples.
- Schedule: linear warmup, then cosine or linear decay to `min_lr_ratio * lr`.
- A step whose gradient norm is not finite is skipped (optimizer and scheduler untouched) and
  counted; too many in a row stop the run with a named error.
- Exact resume: model, optimizer, scheduler, RNG states and the data position come back from the
  newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from alignloop import checkpoint, runtime
from alignloop.config import (
    BatchConfig,
    ConfigError,
    ModelConfig,
    OptimConfig,
    RunConfig,
    save_config,
    to_dict,
)
from alignloop.data import SFTExample, load_records
from alignloop.losses import sft_nll
from alignloop.models import accepts_logits_to_keep, build_policy, load_tokenizer, save_pretrained
from alignloop.tensors import logprobs_of
from alignloop.tokenization import TokenizedExample, collate_sft, length_bucketed_batches, tokenize_sft

log = logging.getLogger(__name__)


@dataclass
class SFTDataConfig:
    """Where the demonstrations come from and how they are cut."""

    train_path: str = ""
    """SFT records: a JSONL/JSON/CSV/Parquet file, a `datasets` folder, or a hub name."""
    eval_path: str = ""
    """Held-out SFT records for the eval loss (empty: no eval)."""
    max_length: int = 128
    """Longest tokenised conversation (prompt + response)."""
    truncation: Literal["drop", "truncate_prompt", "error"] = "drop"
    """What to do with a longer one: drop it, cut the prompt from the left, or stop with an error."""
    max_eval_examples: int = 512
    """Evaluate on at most this many held-out examples."""


@dataclass
class SFTConfig:
    """Everything an SFT run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train."""
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    """Demonstrations."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory, logging, checkpoints."""
    batch: BatchConfig = field(default_factory=lambda: BatchConfig(micro_batch_size=64, epochs=4.0))
    """Batch sizes and training length."""

    def resolve(self) -> None:
        """Compute derived sizes once."""
        self.batch.resolve()


@dataclass
class SFTResult:
    """What a finished run hands to the next stage."""

    run_dir: Path
    final_dir: Path
    steps: int
    final_eval_loss: float | None
    metrics: dict[str, float]


# ----------------------------------------------------------------------------------------------
# Phase helpers


def load_demonstrations(cfg: SFTConfig) -> tuple[list[SFTExample], list[SFTExample]]:
    """Load and validate train and eval records before anything is written (bad input leaves no output)."""
    train_records = load_records(cfg.data.train_path, "sft")
    eval_records = load_records(cfg.data.eval_path, "sft")[: cfg.data.max_eval_examples] if cfg.data.eval_path else []
    return train_records, eval_records


def tokenize_demonstrations(
    cfg: SFTConfig, records: tuple[list[SFTExample], list[SFTExample]], tokenizer: Any
) -> tuple[list[TokenizedExample], list[TokenizedExample], dict[str, int]]:
    """Tokenise with prompt masking and the length policy; report kept/truncated/dropped."""
    train, report = tokenize_sft(records[0], tokenizer, cfg.data.max_length, cfg.data.truncation)
    counts = {"data/train_kept": report.kept, "data/train_truncated": report.truncated, "data/train_dropped": report.dropped}
    evals: list[TokenizedExample] = []
    if records[1]:
        evals, eval_report = tokenize_sft(records[1], tokenizer, cfg.data.max_length, cfg.data.truncation)
        counts.update({"data/eval_kept": eval_report.kept, "data/eval_dropped": eval_report.dropped})
    if not train:
        raise ValueError(f"{cfg.data.train_path}: no training example left after tokenisation")
    return train, evals, counts


def micro_batch_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], num_loss_tokens: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one micro-batch and return the step-normalised masked NLL.

    The LM head runs only from the batch's first loss position on (`logits_to_keep`): prompt positions carry
    no loss, and the head is a large share of a small model's compute.
    """
    width = batch["input_ids"].shape[1]
    first = max(1, int((batch["labels"] != -100).any(dim=0).long().argmax()))  # first column with a target
    keep = width - first + 1 if accepts_logits_to_keep(model) else width
    extra = {"logits_to_keep": keep} if keep < width else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits  # (B, K, V)
    labels = batch["labels"][:, width - keep + 1 :]  # (B, K-1): the token each kept position but the last predicts
    mask = labels != -100
    logp = logprobs_of(logits[:, :-1], labels.clamp(min=0))  # (B, K-1)
    return sft_nll(logp, mask, num_loss_tokens)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, examples: list[TokenizedExample], pad_id: int, batch_size: int, acc: Any) -> float:
    """Token-weighted mean NLL over `examples`, sharded over ranks and summed."""
    model.eval()
    shard = examples[acc.process_index :: acc.num_processes]
    totals = torch.zeros(2, dtype=torch.float64, device=acc.device)
    for start in range(0, len(shard), batch_size):
        batch = {k: v.to(acc.device) for k, v in collate_sft(shard[start : start + batch_size], pad_id).items()}
        with acc.autocast():
            _, stats = micro_batch_loss(model, batch, 1.0)
        totals += torch.stack([stats["sft/nll_sum"].double(), stats["sft/tokens"].double()])
    totals = acc.reduce(totals, reduction="sum")
    model.train()
    return float(totals[0] / totals[1].clamp(min=1))


def _setup_tokenizer_and_model(
    cfg: SFTConfig, run_dir: Path, models: Any, train_records: list[SFTExample], acc: Any
) -> tuple[Any, Any]:
    """Injected models win; a tiny model's tokenizer is trained once and kept in the run directory."""
    if models is not None:
        return models
    saved = run_dir / "tokenizer"
    if not cfg.model.name_or_path and not cfg.model.tokenizer and saved.is_dir():
        cfg.model.tokenizer = str(saved)
    corpus = None
    if not cfg.model.name_or_path and not cfg.model.tokenizer:
        corpus = [m["content"] for r in train_records for m in r.messages]
    model, tokenizer = build_policy(cfg.model, corpus=corpus, seed=cfg.run.seed)
    if corpus is not None:
        if acc.is_main_process:  # one writer; every rank then reads the same files
            tokenizer.save_pretrained(saved)
        acc.wait_for_everyone()
        cfg.model.tokenizer = str(saved)
        tokenizer = load_tokenizer(str(saved))
    return model, tokenizer


# ----------------------------------------------------------------------------------------------


def train(cfg: SFTConfig, *, models: tuple[Any, Any] | None = None,
          on_step_end: Callable[[int], None] | None = None) -> SFTResult:
    """Run SFT to completion (or resume it) and save the final policy in Hugging Face format.

    `on_step_end(step)` is called after each optimizer step and its logging (the benchmarks time steps with it).
    """
    # 1. runtime: seed, processes, run directory
    if not cfg.batch.global_batch_size:
        cfg.resolve()
    runtime.seed_everything(cfg.run.seed, deterministic=cfg.run.deterministic)
    acc = runtime.setup_accelerator(mixed_precision=cfg.run.mixed_precision)
    if acc.num_processes != cfg.batch.world_size:
        raise ConfigError(f"batch.world_size: config resolved {cfg.batch.world_size}, launcher has {acc.num_processes}")
    records = load_demonstrations(cfg)
    run_dir = Path(cfg.run.output_dir)
    is_main = acc.is_main_process
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()

    # 2. model, tokenizer and data
    model, tokenizer = _setup_tokenizer_and_model(cfg, run_dir, models, records[0], acc)
    train_set, eval_set, data_counts = tokenize_demonstrations(cfg, records, tokenizer)
    lengths = [len(ex.input_ids) for ex in train_set]
    steps_per_epoch, total_steps = cfg.batch.total_steps(len(train_set))
    if is_main:
        save_config(cfg, run_dir / "config.yaml")

    # 3. optimizer, schedule, resume
    model = model.to(acc.device)
    model.train()
    optimizer = runtime.make_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: runtime.lr_factor(s, total_steps, cfg.optim))
    guard = runtime.NonFiniteGuard()
    step, tokens_seen = 0, 0
    resumed = checkpoint.resume(run_dir, cfg.run.resume, model=model, optimizer=optimizer, scheduler=scheduler)
    if resumed is not None:
        step, tokens_seen = resumed["step"], resumed["tokens_seen"]
        guard.load_state_dict(resumed["guard"])
        if is_main and cfg.run.record_sample_ids:
            runtime.truncate_jsonl(run_dir / "sample_ids.jsonl", max_step=step)
    wrapped, optimizer = acc.prepare(model, optimizer)
    metrics = runtime.MetricsLogger(
        run_dir, enabled=is_main, tensorboard=cfg.run.tensorboard, resume_step=step if resumed else None
    )
    if is_main and resumed is None:
        metrics.log(0, {k: float(v) for k, v in data_counts.items()})
    bar = runtime.progress(total_steps, "sft", disable=not (is_main and cfg.run.progress_bar), initial=step)

    # 4. the loop: one global batch per optimizer step
    last: dict[str, float] = {}
    batches: list[list[int]] = []
    epoch_of_batches = -1
    t0 = time.perf_counter()
    while step < total_steps:
        epoch, pos = runtime.data_position(step, steps_per_epoch)
        if epoch != epoch_of_batches:
            batches = length_bucketed_batches(lengths, cfg.batch.global_batch_size, seed=cfg.run.seed, epoch=epoch, drop_last=True)
            epoch_of_batches = epoch
        global_idx = batches[pos]
        num_tokens = sum(sum(train_set[i].loss_mask) for i in global_idx)
        micro_batches = runtime.split_global_batch(global_idx, acc.process_index, acc.num_processes, cfg.batch.grad_accum_steps)
        loss_sum, pad_share = torch.zeros((), dtype=torch.float64, device=acc.device), 0.0  # float64: the logged sum adds no rounding of its own
        for micro, idx in enumerate(micro_batches):
            batch = {k: v.to(acc.device) for k, v in collate_sft([train_set[i] for i in idx], tokenizer.pad_token_id).items()}
            pad_share += 1 - batch["attention_mask"].float().mean().item()
            sync = micro == len(micro_batches) - 1
            with (acc.no_sync(wrapped) if not sync else nullcontext()), acc.autocast():
                # DDP averages gradients over ranks; scale so the result is the global-token mean.
                loss, _ = micro_batch_loss(wrapped, batch, num_tokens / acc.num_processes)
                if runtime.test_hooks(step + 1, micro):
                    loss = loss * float("inf")
                acc.backward(loss)
            loss_sum += loss.detach().double() / acc.num_processes

        # 5. clip, guard against non-finite gradients, step
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(wrapped.parameters(), max_norm)
        lr = scheduler.get_last_lr()[0]
        if guard.check(grad_norm):
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += num_tokens
        bar.update(1)
        if cfg.run.record_sample_ids and is_main:
            with open(run_dir / "sample_ids.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "ids": [train_set[i].id for i in global_idx]}) + "\n")

        # 6. log, evaluate, checkpoint
        if step % cfg.run.log_every == 0 or step == total_steps:
            train_loss = float(acc.reduce(loss_sum, reduction="sum"))
            last = {
                "train/loss": train_loss,
                "train/grad_norm": float(grad_norm),
                "train/lr": lr,
                "train/epoch": step / steps_per_epoch,
                "train/tokens_seen": float(tokens_seen),
                "train/padding_share": pad_share / len(micro_batches),
                "train/skipped_steps": float(guard.skipped_steps),
                "perf/steps_per_s": step / max(1e-9, time.perf_counter() - t0),
            }
            metrics.log(step, last)
            bar.set_postfix(loss=f"{train_loss:.3f}")
        if eval_set and ((cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == total_steps):
            last["eval/loss"] = evaluate_loss(wrapped, eval_set, tokenizer.pad_token_id, cfg.batch.eval_batch_size, acc)
            metrics.log(step, {"eval/loss": last["eval/loss"]})
        if cfg.run.save_every and (step % cfg.run.save_every == 0) and step < total_steps:
            acc.wait_for_everyone()
            if is_main:
                state = {"step": step, "epoch": epoch, "tokens_seen": tokens_seen, "guard": guard.state_dict()}
                checkpoint.save_checkpoint(
                    run_dir, step, model=acc.unwrap_model(wrapped), optimizer=optimizer, scheduler=scheduler,
                    state=state, keep_last=cfg.run.keep_checkpoints,
                )
            acc.wait_for_everyone()
        runtime.test_hooks(step)
        if on_step_end is not None:
            on_step_end(step)

    # 7. final model in Hugging Face format, run manifest
    bar.close()
    metrics.close()
    acc.wait_for_everyone()
    final_dir = run_dir / "final"
    if is_main:
        save_pretrained(acc.unwrap_model(wrapped), tokenizer, final_dir)
        runtime.write_run_manifest(run_dir, command="sft", config=to_dict(cfg), extra={"steps": step, **last})
    acc.wait_for_everyone()
    return SFTResult(run_dir, final_dir, step, last.get("eval/loss"), last)

