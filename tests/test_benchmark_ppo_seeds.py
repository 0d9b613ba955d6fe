"""The PPO-over-seeds benchmark's summary: mean and range per column, and the table it prints."""

from __future__ import annotations

from benchmark_modules import load_benchmark


def test_summary_and_table_over_seeds():
    bench = load_benchmark("ppo_seeds")
    row = {"overall": 60.0, "helpful": 50.0, "honest": 70.0, "harmless": 90.0, "greedy_overall": 80.0, "well_formed": 99.0}
    runs = {0: {**row, "kl": 0.25}, 1: {**row, "overall": 66.0, "kl": 0.35}, 2: {**row, "overall": 69.0, "kl": 0.3}}
    mean = bench.summary(list(runs.values()))
    assert mean["overall"] == "65.0 (60.0-69.0)" and mean["kl"] == "0.30 (0.25-0.35)" and mean["harmless"] == "90.0 (90.0-90.0)"
    lines = bench.table({**row, "overall": 40.0}, runs).splitlines()
    assert lines[0] == "| policy | overall | helpful | honest | harmless | greedy_overall | kl |"
    assert lines[2] == "| SFT (start) | 40.0 | 50.0 | 70.0 | 90.0 | 80.0 | - |"
    assert lines[4] == "| PPO seed 1 | 66.0 | 50.0 | 70.0 | 90.0 | 80.0 | 0.35 |"
    assert lines[-1].startswith("| **mean (min-max)** | 65.0 (60.0-69.0) |") and len(lines) == 7
