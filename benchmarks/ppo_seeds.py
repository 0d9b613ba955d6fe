"""PPO over seeds on the sandbox: the main job's PPO stage repeated with several seeds from one SFT model
and one reward model, each final policy scored by the gold judge on the held-out prompts (greedy and T=1).

    python benchmarks/ppo_seeds.py --quickstart runs/quickstart --out runs/bench-ppo-seeds [--seeds 0,1,2]

Needs a quickstart run with at least `--stages reward` (its world, SFT model and reward model). PPO uses
the main job's settings (`quickstart.SANDBOX_PPO`: 60 steps, fixed KL coefficient 1.0) plus any extra
`--ppo.KEY VALUE` overrides after `--`. Prints a markdown table (SFT start, each seed, mean and range)
and writes OUT/results.json. A finished seed's run is reused on a rerun.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alignloop.config import load_config
from alignloop.evaluate import PolicyEval
from alignloop.quickstart import SANDBOX_PPO, QuickstartConfig, evaluate_folder
from alignloop.sandbox import GoldJudge, load_world
from alignloop.train import ppo

AXES = ("overall", "helpful", "honest", "harmless")


def scores(greedy: PolicyEval, sampled: PolicyEval) -> dict[str, float]:
    """Gold means in % at T=1 per axis, greedy overall, and the well-formed share at T=1."""
    row = {axis: 100 * sampled.means[axis] for axis in AXES}
    row.update(greedy_overall=100 * greedy.means["overall"], well_formed=100 * sampled.means["well_formed"])
    return row


def summary(rows: list[dict[str, float]]) -> dict[str, str]:
    """'mean (min-max)' per column over the seeds."""
    def fmt(k: str, x: float) -> str:
        return f"{x:.2f}" if k == "kl" else f"{x:.1f}"

    return {k: f"{fmt(k, sum(r[k] for r in rows) / len(rows))} ({fmt(k, min(r[k] for r in rows))}-{fmt(k, max(r[k] for r in rows))})"
            for k in rows[0] if isinstance(rows[0][k], float)}


def table(start: dict[str, float], runs: dict[int, dict[str, float]]) -> str:
    """Markdown: the SFT start, one row per seed (kl: mean `ppo/kl` of the last 5 rollouts, nats per response),
    and the mean (min-max) over seeds."""
    cols = [*AXES, "greedy_overall", "kl"]
    lines = ["| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines.append("| SFT (start) | " + " | ".join(f"{start[c]:.1f}" if c in start else "-" for c in cols) + " |")
    for seed, row in runs.items():
        lines.append(f"| PPO seed {seed} | " + " | ".join(f"{row[c]:.2f}" if c == "kl" else f"{row[c]:.1f}" for c in cols) + " |")
    mean = summary(list(runs.values()))
    lines.append("| **mean (min-max)** | " + " | ".join(mean[c] for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", type=Path, required=True, help="a quickstart run directory (SFT and reward model done)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("ppo_overrides", nargs="*", help="extra PPO overrides, e.g. -- --total_steps 80")
    args = parser.parse_args()
    qs = load_config(QuickstartConfig, None, ["--out_dir", str(args.quickstart)])
    qs.resolve()
    world_dir = args.quickstart / "world"
    judge = GoldJudge(load_world(world_dir))
    prompts = list(judge.world.prompts_eval)[: qs.eval_prompts]
    start = scores(*evaluate_folder(args.quickstart / "sft" / "final", prompts, judge, qs))
    runs: dict[int, dict[str, float]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_dir = args.out / f"seed{seed}"
        cfg = load_config(ppo.PPOConfig, None, [
            *SANDBOX_PPO, "--policy.name_or_path", str(args.quickstart / "sft" / "final"),
            "--reward.source", str(args.quickstart / "reward" / "final"), "--critic_path", str(args.quickstart / "reward" / "final"),
            "--data.train_path", str(world_dir / "prompts_train.jsonl"), "--data.eval_path", str(world_dir / "prompts_eval.jsonl"),
            "--reward.eval_sources", json.dumps([f"gold=sandbox:{world_dir}"]), "--run.output_dir", str(run_dir),
            "--run.seed", str(seed), "--run.progress_bar", "false", *args.ppo_overrides])
        t0 = time.perf_counter()
        if not (run_dir / "final").exists():  # a finished run is reused on a rerun
            ppo.train(cfg)
        seconds = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last_rollouts = [m["ppo/kl"] for m in metrics if "ppo/kl" in m][-5:]
        row = scores(*evaluate_folder(run_dir / "final", prompts, judge, qs))
        row.update(kl=sum(last_rollouts) / len(last_rollouts), seconds=seconds)
        runs[seed] = row
        print(f"seed {seed}: {json.dumps({k: round(v, 2) for k, v in row.items()})}", flush=True)
    (args.out / "results.json").write_text(json.dumps({"sft": start, "seeds": runs, "summary": summary(list(runs.values()))}, indent=2))
    print(table(start, runs))


if __name__ == "__main__":
    main()
