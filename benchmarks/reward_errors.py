"""Where a sandbox reward model is wrong: its held-out votes grouped by the gold judge's reasons.

    python benchmarks/reward_errors.py runs/quickstart/reward/final runs/quickstart/world

Scores `prefs_eval.jsonl` of the world folder (or `--pairs`) with the reward model and, for every vote
the gold judge decides, prints accuracy per "better's reasons > worse's reasons" group and per gold gap,
largest error count first: it tells fact errors (right vs wrong answer) from close calls (a right answer
vs the same with filler words). Benchmarks may know the sandbox; trainers never do.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from alignloop.data import load_records
from alignloop.models import load_sequence_classifier, load_tokenizer
from alignloop.sandbox import GoldJudge, load_world
from alignloop.train.reward import RewardConfig, score_pairs, tokenize_pairs


def error_groups(model_dir: str, pairs_path: str, world_dir: str) -> dict[str, tuple[int, int]]:
    """{group: (right, total)} over gold-decided votes; groups are 'ALL', 'gap=X' and reason pairs."""
    judge = GoldJudge(load_world(world_dir))
    pairs = load_records(pairs_path, "pair")
    tokenizer, model = load_tokenizer(model_dir), load_sequence_classifier(model_dir).eval()
    cfg = RewardConfig()
    cfg.resolve()
    tokenized, _ = tokenize_pairs(pairs, tokenizer, cfg, seed=0)
    chosen, rejected = score_pairs(model, tokenized, tokenizer.pad_token_id, 64, torch.device("cpu"))
    by_id = {p.id: p for p in pairs}
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t, rc, rr in zip(tokenized, chosen.mean(1).tolist(), rejected.mean(1).tolist(), strict=True):
        p = by_id[t.id]
        gc, gr = judge.score(p.prompt, p.chosen), judge.score(p.prompt, p.rejected)
        if gc.overall == gr.overall:
            continue
        better, worse = (gc, gr) if gc.overall > gr.overall else (gr, gc)
        right = int((rc > rr) == (gc.overall > gr.overall))
        for key in ("ALL", f"gap={abs(gc.overall - gr.overall):.1f}", f"{better.reason or 'ok'} > {worse.reason or 'ok'}"):
            groups[key][0] += right
            groups[key][1] += 1
    return {k: (v[0], v[1]) for k, v in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("world_dir", help="the sandbox world folder the votes came from")
    parser.add_argument("--pairs", help="votes to score (default: WORLD_DIR/prefs_eval.jsonl)")
    parser.add_argument("--min-count", type=int, default=8, help="hide groups with fewer votes")
    args = parser.parse_args()
    groups = error_groups(args.model_dir, args.pairs or str(Path(args.world_dir) / "prefs_eval.jsonl"), args.world_dir)
    total = groups["ALL"][1]
    print(f"{'group (better > worse)':72s} {'votes':>6s} {'RM right':>9s} {'errors':>7s} {'share':>6s}")
    for key, (right, n) in sorted(groups.items(), key=lambda kv: kv[1][0] - kv[1][1]):
        if n >= args.min_count:
            print(f"{key:72s} {n:6d} {right / n:9.3f} {n - right:7d} {(n - right) / total:6.3f}")


if __name__ == "__main__":
    main()
