"""Reward models on the sandbox against the gold judge, one run per annotator panel.

Variants (same world seed, so the same prompts and facts; only the panel differs):
  clean      the default panel
  noisy20    20% of annotators noisy (Bradley-Terry temperature 0.5 instead of 0.1)
  length     every annotator adds 0.1 utility per word beyond the reference answer
  ensemble   the clean panel, 4 reward heads on bootstrap resamples

For each: training seconds, held-out gold agreement (overall, close pairs, clear pairs), accuracy by
prompt kind, calibration, the reward's length correlation against the gold judge's, and the
ensemble's uncertainty on close vs clear pairs. Results go to OUT/results.json and a markdown table.

    python benchmarks/reward_sandbox.py --sft runs/quickstart/sft/final --out runs/bench-reward
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from alignloop.config import load_config
from alignloop.sandbox import GoldJudge, SandboxConfig, build_world
from alignloop.sandbox.annotators import write_preference_files
from alignloop.train import reward

VARIANTS: dict[str, tuple[list[str], list[str]]] = {  # name: (sandbox overrides, reward overrides)
    "clean": ([], []),
    "noisy20": (["--panel.noisy_share", "0.2"], []),
    "length": (["--panel.base.length_bias", "0.1"], []),
    "ensemble": ([], ["--ensemble_size", "4"]),
}


def run_variant(name: str, sft_dir: str, out: Path, per_prompt: int, world_seed: int, extra: list[str]) -> dict[str, float]:
    """Build the variant's preferences, train a reward model on them, report it against the gold judge."""
    sandbox_overrides, reward_overrides = VARIANTS[name]
    world = build_world(load_config(SandboxConfig, None, ["--seed", str(world_seed), *sandbox_overrides]))
    data_dir = out / name / "data"
    paths = write_preference_files(world, data_dir, per_prompt)
    cfg = load_config(reward.RewardConfig, None, [
        "--model.name_or_path", sft_dir, "--data.train_path", str(paths["prefs_train"]),
        "--data.eval_path", str(paths["prefs_eval"]), "--run.output_dir", str(out / name / "rm"),
        "--run.progress_bar", "false", *reward_overrides, *extra,
    ])
    t0 = time.perf_counter()
    result = reward.train(cfg)
    seconds = time.perf_counter() - t0

    report = reward.evaluate_against(result.final_dir, cfg, GoldJudge(world).score)
    return {"train_seconds": seconds, "steps": float(result.steps), **report}


def markdown(results: dict[str, dict[str, float]]) -> str:
    cols = [("train_seconds", "train s", "{:.0f}"), ("gold/agreement", "gold agree", "{:.1%}"),
            ("gold/agreement_close", "close", "{:.1%}"), ("gold/agreement_clear", "clear", "{:.1%}"),
            ("rm/accuracy/helpful", "helpful", "{:.1%}"), ("rm/accuracy/honest", "honest", "{:.1%}"),
            ("rm/accuracy/harmless", "harmless", "{:.1%}"), ("rm/ece", "ECE", "{:.3f}"),
            ("rm/length_corr", "len corr RM", "{:+.2f}"), ("gold/length_corr", "len corr gold", "{:+.2f}"),
            ("gold/uncertainty_close", "unc close", "{:.3f}"), ("gold/uncertainty_clear", "unc clear", "{:.3f}")]
    lines = ["| variant | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(row[key]) if key in row else "-" for key, _, fmt in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", required=True, help="SFT final folder (backbone and tokenizer) trained on the same world seed")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--prefs-per-prompt", type=int, default=3)
    parser.add_argument("--world-seed", type=int, default=0)
    args, extra = parser.parse_known_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    results: dict[str, dict[str, float]] = {}
    results_path = args.out / "results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
    for name in args.variants.split(","):
        results[name] = run_variant(name, args.sft, args.out, args.prefs_per_prompt, args.world_seed, extra)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2))
        print(markdown({name: results[name]}), flush=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
