"""The speed runner's arithmetic (spec v1 section 4) and its refusals, on hand-made step records."""

from __future__ import annotations

import pytest
from benchmark_modules import load_benchmark


def _speed():
    return load_benchmark("speed")


def step(dt: float, grad_tokens: int, seqs: int, nograd: int = 0, flops: float = 1e9) -> dict:
    return {"dt": dt, "model_flops": flops, "rss_mib": 1.0,
            "per_role": {"policy": {"grad_tokens": grad_tokens, "grad_padded_tokens": grad_tokens + 10,
                                    "grad_seqs": seqs, "nograd_tokens": nograd}}}


def test_summary_discards_warmup_and_follows_the_spec_rules():
    speed = _speed()
    speed.MEASURED = 3
    steps = [step(9.0, 1, 16), step(9.0, 1, 16), step(1.0, 100, 32), step(2.0, 200, 32), step(1.0, 300, 32)]
    out = speed.summarise("rm", {"steps": steps, "measured": 3, "pairwise": True, "ppo_epochs": 4})
    assert out["median_step_s"] == 1.0 and out["measured_steps"] == 3
    assert out["samples_per_s"] == pytest.approx(16 * 3 / 4.0)  # pairs = sequences / 2, over the sum of times
    assert out["tokens_per_s"] == pytest.approx(600 / 4.0) and out["train_tokens_per_step"] == pytest.approx(200)
    assert out["achieved_gflops"] == pytest.approx(3e9 / 4.0 / 1e9)
    ppo = speed.summarise("ppo", {"steps": steps, "measured": 3, "pairwise": False, "ppo_epochs": 4})
    assert ppo["train_tokens_per_step"] == pytest.approx(200 / 4)  # unique tokens: divided by the epochs
    assert ppo["samples_per_s"] == pytest.approx(16 * 3 / 4.0)
    with pytest.raises(RuntimeError, match="only 2 steps"):
        speed.summarise("sft", {"steps": steps[:2], "measured": 3, "pairwise": False})


def test_report_ratios_are_alignloop_over_trl_in_one_run():
    speed = _speed()

    def run(framework, workload, sps, rss, median, gflops):
        return {"framework": framework, "workload": workload, "model": "tiny", "precision": "fp32", "status": "ok",
                "samples_per_s": sps, "peak_rss_mib": rss, "median_step_s": median, "achieved_gflops": gflops}

    results = {"runs": [
        {"framework": "alignloop", "workload": "matmul", "model": "-", "precision": "fp32", "status": "ok",
         "fp32": {"gflops_max": 200.0}, "bf16": {"gflops_max": 400.0}},
        run("alignloop", "sft", 30.0, 800.0, 0.5, 100.0), run("trl", "sft", 20.0, 1000.0, 0.8, 50.0),
    ]}
    table = speed.render(results)
    row = next(line for line in table.splitlines() if line.startswith("| sft"))
    assert "**1.50x**" in row and "1.60x" in row and "**0.80**" in row and "| 50.0 | 25.0 |" in row


def test_assets_are_checked_by_sha256_naming_the_file(tmp_path):
    speed = _speed()
    with pytest.raises(SystemExit, match="tokenizer.json: missing"):
        speed.check_assets(tmp_path)
    for rel in speed.SPEC_SHA256:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("not the spec's file")
    with pytest.raises(SystemExit, match="tokenizer.json: sha256 .* differs from spec v1"):
        speed.check_assets(tmp_path)
