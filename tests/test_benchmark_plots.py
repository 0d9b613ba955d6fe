"""The reward-hacking benchmark's plot is a real PNG of both curves (matplotlib from the dev extras)."""

from __future__ import annotations

import json

from benchmark_modules import load_benchmark


def test_reward_hacking_curves_and_plot(tmp_path):
    bench = load_benchmark("reward_hacking")
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "eval/score": -0.5, "eval/gold_score": 0.5}, {"step": 3, "ppo/score": 1.0},
            {"step": 5, "eval/score": 2.0, "eval/gold_score": 0.1, "eval/response_length": 40.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = bench.eval_curve(run)
    assert [r["step"] for r in curve] == [0, 5]
    out = tmp_path / "plot.png"
    bench.plot({"no KL penalty": curve, "default": curve[:1]}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
