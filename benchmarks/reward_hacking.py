"""Reward hacking, reproduced and shown: PPO against a reward model trained on length-biased
annotators, once without a KL penalty and once with the sandbox's default penalty. The proxy
(reward-model) score and the gold judge's score of the same held-out samples are plotted per step.

    python benchmarks/reward_hacking.py --quickstart runs/quickstart --out runs/bench-hacking [--steps 40]

Needs a finished quickstart run (its world, SFT model) and matplotlib (the `bench` extra). Writes
OUT/reward_hacking.png, OUT/results.json and prints the first and last held-out scores of each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from alignloop.config import load_config
from alignloop.quickstart import SANDBOX_PPO
from alignloop.sandbox import load_world
from alignloop.sandbox.annotators import write_preference_files
from alignloop.train import ppo, reward

RUNS = {"no KL penalty": ["--kl.init_coef", "0", "--kl.adaptive", "false"],
        "KL coefficient 0.3": ["--kl.init_coef", "0.3"], "default KL penalty": []}


def eval_curve(run_dir: Path) -> list[dict[str, float]]:
    """The held-out evaluations of a PPO run, in step order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/gold_score" in r]


def plot(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["eval/score"] for r in rows], marker="o", label=name)
        axes[1].plot(steps, [r["eval/gold_score"] for r in rows], marker="o", label=name)
    axes[0].set(title="proxy: reward model (length-biased annotators)", xlabel="PPO step", ylabel="normalised score")
    axes[1].set(title="gold judge (never trained on)", xlabel="PPO step", ylabel="gold overall")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", type=Path, required=True, help="a finished quickstart run directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--length-bias", type=float, default=0.1)
    args = parser.parse_args()
    world_dir, sft_dir = args.quickstart / "world", args.quickstart / "sft" / "final"

    world = load_world(world_dir)
    panel = dataclasses.replace(world.config.panel, base=dataclasses.replace(world.config.panel.base, length_bias=args.length_bias))
    data = write_preference_files(world, args.out / "data", 3, panel)
    rm_cfg = load_config(reward.RewardConfig, None, [
        "--model.name_or_path", str(sft_dir), "--data.train_path", str(data["prefs_train"]),
        "--data.eval_path", str(data["prefs_eval"]), "--run.output_dir", str(args.out / "reward"), "--run.progress_bar", "false"])
    rm_final = args.out / "reward" / "final"
    if not (rm_final / "reward_stats.json").exists():  # a finished reward model is reused on a rerun
        rm_final = reward.train(rm_cfg).final_dir

    curves = {}
    for name, extra in RUNS.items():
        run_dir = args.out / name.replace(" ", "_")
        cfg = load_config(ppo.PPOConfig, None, [
            *SANDBOX_PPO, "--total_steps", str(args.steps), "--run.eval_every", "5", "--run.progress_bar", "false",
            "--policy.name_or_path", str(sft_dir), "--reward.source", str(rm_final), "--critic_path", str(rm_final),
            "--data.train_path", str(world_dir / "prompts_train.jsonl"), "--data.eval_path", str(world_dir / "prompts_eval.jsonl"),
            "--reward.eval_sources", json.dumps([f"gold=sandbox:{world_dir}"]), "--run.output_dir", str(run_dir), *extra])
        if not (run_dir / "final").exists():  # a finished run is reused on a rerun
            ppo.train(cfg)
        curves[name] = eval_curve(run_dir)
        first, last = curves[name][0], curves[name][-1]
        print(f"{name}: proxy {first['eval/score']:+.2f} -> {last['eval/score']:+.2f}, gold {first['eval/gold_score']:.3f} -> "
              f"{last['eval/gold_score']:.3f}, response length {first['eval/response_length']:.1f} -> {last['eval/response_length']:.1f}")
    (args.out / "results.json").write_text(json.dumps(curves, indent=2))
    plot(curves, args.out / "reward_hacking.png")
    print(f"plot: {args.out / 'reward_hacking.png'}")


if __name__ == "__main__":
    main()
