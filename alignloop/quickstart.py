"""The main job on the embedded default: build the sandbox world, train its tokenizer and a tiny
model from scratch with SFT, and compare greedy responses before and after on held-out prompts."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignloop.config import GenConfig, save_config
from alignloop.data import Prompt
from alignloop.evaluate import PolicyEval, evaluate_policy
from alignloop.models import build_policy, load_causal_lm, load_tokenizer, train_tokenizer
from alignloop.sandbox import GoldJudge, SandboxConfig, build_world, write_world
from alignloop.train import sft

log = logging.getLogger(__name__)


@dataclass
class QuickstartConfig:
    """The embedded default end to end."""

    out_dir: str = "runs/quickstart"
    """Everything goes under here: world/, tokenizer/, sft/."""
    world: SandboxConfig = field(default_factory=SandboxConfig)
    """The sandbox world (seeded)."""
    sft: sft.SFTConfig = field(default_factory=sft.SFTConfig)
    """SFT settings; data paths and output_dir are filled in from out_dir."""
    eval_prompts: int = 300
    """Held-out prompts scored before and after (greedy)."""
    gen: GenConfig = field(default_factory=lambda: GenConfig(temperature=0.0, max_new_tokens=48))
    """Greedy decoding: shows the model's most likely behaviour (and whether its output is well formed)."""
    sample_gen: GenConfig = field(default_factory=lambda: GenConfig(temperature=1.0, max_new_tokens=48))
    """Sampling at temperature 1: shows the learned distribution, whose gold score should track the
    share of good demonstrations (SFT imitates its data, good and bad alike)."""

    def resolve(self) -> None:
        """Point SFT at the world's files and the run directory."""
        root = Path(self.out_dir)
        self.sft.data.train_path = str(root / "world" / "sft_train.jsonl")
        self.sft.data.eval_path = str(root / "world" / "sft_eval.jsonl")
        self.sft.run.output_dir = str(root / "sft")
        self.sft.resolve()


@dataclass
class QuickstartResult:
    """Scores before and after SFT, and timings."""

    before: PolicyEval
    after: PolicyEval
    after_sampled: PolicyEval
    good_demo_share: float
    sft_seconds: float
    sft: sft.SFTResult


def run(cfg: QuickstartConfig) -> QuickstartResult:
    """Build the world, train the tokenizer, SFT the tiny model, and score before/after with the gold judge."""
    cfg.resolve()
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")

    # 1. the world and its judge
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

    # 3. SFT (resumes if a checkpoint of an interrupted run exists)
    t0 = time.perf_counter()
    result = sft.train(cfg.sft)
    seconds = time.perf_counter() - t0

    # 4. the trained model, loaded back from its Hugging Face folder
    trained, tokenizer = load_causal_lm(str(result.final_dir)), load_tokenizer(str(result.final_dir))
    after = evaluate_policy(trained, tokenizer, prompts, judge.score, cfg.gen, seed=cfg.sft.run.seed)
    sampled = evaluate_policy(trained, tokenizer, prompts, judge.score, cfg.sample_gen, seed=cfg.sft.run.seed)
    return QuickstartResult(before, after, sampled, good_share, seconds, result)
