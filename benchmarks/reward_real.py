"""A reward model on real human preference data from ../shared/data: hh-rlhf (harmless test split,
multi-turn), PandaLM (majority of three annotators; ties dropped) and LLMBar (natural and adversarial
subsets, reported per subset). Prints pairwise accuracy, calibration and length correlation per set.

    python benchmarks/reward_real.py runs/reward/final [--shared ../shared/data] [--max-length 512]

A tiny sandbox reward model scores near chance here (it never saw English); the point is that the
same loaders and evaluation run on real data, for any Hugging Face reward model folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from alignloop.config import load_config
from alignloop.data import PreferencePair, load_records
from alignloop.preferences import load_llmbar, load_pandalm, pandalm_majority_pairs
from alignloop.train.reward import RewardConfig, evaluate_against


def real_sets(root: Path) -> dict[str, list[PreferencePair]]:
    """The three data sets as preference pairs, `meta['kind']` naming the LLMBar subset."""
    pandalm, _ = pandalm_majority_pairs(load_pandalm(root / "pandalm" / "testset-v1.json"))
    llmbar = [dataclasses.replace(p, meta={**p.meta, "kind": p.meta["subset"]}) for p in load_llmbar(root / "llmbar")]
    return {"hh-rlhf": load_records(root / "hh-rlhf" / "pairs-harmless-test.jsonl", "pair"), "pandalm": pandalm, "llmbar": llmbar}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="reward model folder")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()
    cfg = load_config(RewardConfig, None, ["--data.max_length", str(args.max_length), "--data.truncation", "truncate_prompt"])
    results = {}
    for name, pairs in real_sets(args.shared).items():
        report = evaluate_against(args.model, cfg, pairs=pairs)
        results[name] = report
        by_kind = {k.split("/")[-1]: round(v, 3) for k, v in report.items() if k.startswith("rm/accuracy/")}
        print(f"{name:8s} pairs {int(report['pairs']):5d} dropped {int(report['dropped']):3d} accuracy {report['rm/accuracy']:.3f} "
              f"ECE {report['rm/ece']:.3f} length corr {report['rm/length_corr']:+.2f} {by_kind or ''}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
