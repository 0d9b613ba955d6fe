"""SFT trainer: smoke run, exact resume after SIGKILL (T1, T1-var), determinism (T5), micro-batch x
accumulation and data-parallel equivalence (T5b), non-finite steps (T3), partial checkpoints (T2b),
and parameters that actually train (T7j)."""

from __future__ import annotations

import json
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainer_runs import run_subprocess

from alignloop import checkpoint, runtime
from alignloop.config import load_config
from alignloop.models import train_tokenizer
from alignloop.train import sft

WORDS = "alpha beta gamma delta river stone cloud bright quiet lamp north seven blue green".split()


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> dict[str, str]:
    """200 train / 40 eval conversations of varied length, and a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("sft_data")
    rng = random.Random(0)

    def conv(i: int) -> dict:
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
        return {"id": f"ex{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    rows = [conv(i) for i in range(240)]
    for name, part in (("train.jsonl", rows[:200]), ("eval.jsonl", rows[200:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    texts = [m["content"] for r in rows for m in r["messages"]]
    train_tokenizer(texts, vocab_size=400).save_pretrained(root / "tok")
    return {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "tok": str(root / "tok")}


def overrides(data: dict[str, str], out: Path, **extra: object) -> list[str]:
    base = {
        "data.train_path": data["train"],
        "data.eval_path": data["eval"],
        "model.tokenizer": data["tok"],
        "model.tiny.hidden_size": 32,
        "model.tiny.intermediate_size": 64,
        "model.tiny.num_layers": 2,
        "model.tiny.num_heads": 2,
        "model.tiny.max_position_embeddings": 64,
        "data.max_length": 64,
        "batch.micro_batch_size": 4,
        "batch.grad_accum_steps": 2,
        "batch.max_steps": 50,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 5,
        "run.output_dir": str(out),
        "run.log_every": 1,
        "run.eval_every": 25,
        "run.save_every": 10,
        "run.progress_bar": False,
        "run.tensorboard": False,
        "run.record_sample_ids": True,
    }
    batch_keys = {"micro_batch_size", "grad_accum_steps", "max_steps"}
    base.update({f"batch.{k}" if k in batch_keys else k: v for k, v in extra.items()})
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def run_inprocess(args: list[str]) -> sft.SFTResult:
    return sft.train(load_config(sft.SFTConfig, None, args))


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def sample_ids(run_dir: Path) -> list[tuple[int, list[str]]]:
    return [(r["step"], r["ids"]) for r in map(json.loads, (run_dir / "sample_ids.jsonl").read_text().splitlines())]


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 51))
    diff = max(abs(la[s] - lb[s]) for s in la)
    assert diff == 0.0, f"max |loss diff| {diff}"
    assert sample_ids(a) == sample_ids(b)
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def baseline(sft_data, tmp_path_factory) -> Path:
    """The uninterrupted reference run (attention dropout on, so RNG state matters on resume)."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    proc = run_subprocess(overrides(sft_data, out, **{"model.tiny.attention_dropout": 0.1}))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_smoke_run_directory_complete_and_params_train(sft_data, tmp_path, baseline):
    """T7j: every trainable parameter changed; run directory is complete and loadable."""
    out = baseline
    for name in ("config.yaml", "metrics.jsonl", "manifest.json", "final/model.safetensors", "final/tokenizer.json"):
        assert (out / name).exists(), name
    cfg = load_config(sft.SFTConfig, None, overrides(sft_data, tmp_path / "x", **{"model.tiny.attention_dropout": 0.1}))
    from alignloop.models import build_policy

    init, _ = build_policy(cfg.model, seed=cfg.run.seed)
    trained = final_params(out)
    for name, p in init.state_dict().items():
        if name in trained:
            assert not torch.equal(p, trained[name]), f"{name} did not change"
    ls = losses(out)
    assert all(torch.isfinite(torch.tensor(v)) for v in ls.values())
    assert ls[50] < ls[1]


def test_T1_sigkill_at_37_resumes_exactly(sft_data, tmp_path, baseline):
    out = tmp_path / "run"
    args = overrides(sft_data, out, **{"model.tiny.attention_dropout": 0.1})
    killed = run_subprocess(args, {"ALIGNLOOP_TEST_KILL_AT": "37"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert checkpoint.latest_checkpoint(out).name.endswith("30")
    assert max(losses(out)) == 37
    resumed = run_subprocess(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(baseline, out)


@pytest.mark.parametrize("kill_at", ["37:0", "25"], ids=["mid-GA-window", "epoch-boundary"])
def test_T1_var_kill_points(sft_data, tmp_path, baseline, kill_at):
    out = tmp_path / "run"
    args = overrides(sft_data, out, **{"model.tiny.attention_dropout": 0.1})
    killed = run_subprocess(args, {"ALIGNLOOP_TEST_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert run_subprocess(args).returncode == 0
    assert_same_run(baseline, out)


def _resume_with(monkeypatch, sft_data, baseline, tmp_path, patch) -> Path:
    """Copy the baseline's step-30 state, break one part of the restore, and resume in-process."""
    out = tmp_path / "run"
    args = overrides(sft_data, out, **{"model.tiny.attention_dropout": 0.1})
    killed = run_subprocess(args, {"ALIGNLOOP_TEST_KILL_AT": "37"})
    assert killed.returncode == -signal.SIGKILL
    patch(monkeypatch)
    run_inprocess(args)
    return out


def test_T1_negative_control_without_rng_restore_differs(monkeypatch, sft_data, baseline, tmp_path):
    out = _resume_with(monkeypatch, sft_data, baseline, tmp_path,
                       lambda mp: mp.setattr(runtime, "restore_rng_state", lambda state: None))
    la, lb = losses(baseline), losses(out)
    assert any(la[s] != lb[s] for s in range(31, 51)), "resume without RNG restore should change losses"


def test_T1_negative_control_without_data_position_differs(monkeypatch, sft_data, baseline, tmp_path):
    out = _resume_with(monkeypatch, sft_data, baseline, tmp_path,
                       lambda mp: mp.setattr(runtime, "data_position", lambda step, n: divmod(step - 30, n)))
    assert sample_ids(baseline) != sample_ids(out)
    la, lb = losses(baseline), losses(out)
    assert any(la[s] != lb[s] for s in range(31, 51))


def test_T3_T1_var_resume_after_a_skipped_step(sft_data, tmp_path):
    """A non-finite step at 33 is skipped (counted, LR not advanced); a kill at 37 resumes exactly."""
    env = {"ALIGNLOOP_TEST_NONFINITE_AT": "33"}
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run_subprocess(overrides(sft_data, ref), env).returncode == 0
    rows = {r["step"]: r for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r}
    assert rows[32]["train/skipped_steps"] == 0 and rows[33]["train/skipped_steps"] == 1
    assert rows[34]["train/lr"] == rows[33]["train/lr"], "scheduler must not advance on a skipped step"
    assert not torch.isfinite(torch.tensor(rows[33]["train/loss"])), "the raw non-finite loss stays visible"
    killed = run_subprocess(overrides(sft_data, out), {**env, "ALIGNLOOP_TEST_KILL_AT": "37"})
    assert killed.returncode == -signal.SIGKILL
    assert run_subprocess(overrides(sft_data, out), env).returncode == 0
    la, lb = losses(ref), losses(out)
    assert all(la[s] == lb[s] or (la[s] != la[s] and lb[s] != lb[s]) for s in la)
    pa, pb = final_params(ref), final_params(out)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_T5_same_seed_twice_bitwise_equal(sft_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_inprocess(overrides(sft_data, a, max_steps=100, **{"run.save_every": 0}))
    run_inprocess(overrides(sft_data, b, max_steps=100, **{"run.save_every": 0}))
    la, lb = losses(a), losses(b)
    assert len(la) == 100 and la == lb


def _assert_close_trajectories(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys()
    diffs = torch.tensor([a[s] - b[s] for s in a], dtype=torch.float64)
    assert diffs.abs().max() <= 1e-5, f"max |Δ| {diffs.abs().max():.2e}"
    assert diffs.mean().abs() <= 1e-7, f"|mean Δ| {diffs.mean().abs():.2e}"


def test_T5b_micro_batch_times_accumulation_equivalence(sft_data, tmp_path):
    runs = {}
    for micro, accum in ((8, 1), (4, 2), (2, 4)):
        out = tmp_path / f"mb{micro}"
        run_inprocess(overrides(sft_data, out, micro_batch_size=micro, grad_accum_steps=accum, max_steps=30,
                                **{"run.save_every": 0}))
        runs[(micro, accum)] = losses(out)
    _assert_close_trajectories(runs[(8, 1)], runs[(4, 2)])
    _assert_close_trajectories(runs[(8, 1)], runs[(2, 4)])


def test_T5b_data_parallel_2_ranks_matches_1_process(sft_data, tmp_path):
    """Acceptance 3: torchrun --nproc-per-node 2 (gloo) with the same global batch, within 1e-5."""
    one, two = tmp_path / "dp1", tmp_path / "dp2"
    run_inprocess(overrides(sft_data, one, micro_batch_size=4, grad_accum_steps=2, max_steps=30, **{"run.save_every": 0}))
    proc = run_subprocess(overrides(sft_data, two, micro_batch_size=4, grad_accum_steps=1, max_steps=30,
                                    **{"run.save_every": 0}), nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_close_trajectories(losses(one), losses(two))
    pa, pb = final_params(one), final_params(two)
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) < 1e-4


def test_T2b_corrupt_checkpoint_is_a_named_error_not_a_fresh_start(sft_data, tmp_path):
    out = tmp_path / "run"
    args = overrides(sft_data, out)
    assert run_subprocess(args, {"ALIGNLOOP_TEST_KILL_AT": "25"}).returncode == -signal.SIGKILL
    newest = checkpoint.latest_checkpoint(out)
    victim = newest / "optimizer.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = run_subprocess(args)
    assert proc.returncode != 0
    assert "optimizer.safetensors" in proc.stderr and "CheckpointError" in proc.stderr
    assert max(losses(out)) == 25, "nothing may be trained or logged from a fresh optimizer"


def test_resume_must_without_checkpoint_fails(sft_data, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="resume=must"):
        run_inprocess(overrides(sft_data, tmp_path / "r", **{"run.resume": "must"}))


def test_T7b_over_long_examples_dropped_with_counts(sft_data, tmp_path):
    out = tmp_path / "run"
    run_inprocess(overrides(sft_data, out, max_steps=2, **{"data.max_length": 16, "run.save_every": 0}))
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data/train_dropped"] > 0 and first["data/train_kept"] > 0
    assert first["data/train_kept"] + first["data/train_dropped"] + first["data/train_truncated"] == 200
    assert all(v == v for v in losses(out).values())
    shutil.rmtree(out)


def test_every_logged_metric_is_documented(baseline):
    doc = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    names = {k for line in (baseline / "metrics.jsonl").read_text().splitlines() for k in json.loads(line) if k != "step"}
    assert names, "the run logged nothing"
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"metrics logged but not in docs/metrics.md: {missing}"


@pytest.mark.parametrize("bad_line, code", [
    ('{"id": "x", "messages": [{"role": "user", "content": "hi"}]}', "D106"),
    ('{"id": "x", "messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]}', "D104"),
    ("{not json", "D101"),
])
def test_malformed_data_is_a_named_error_and_writes_nothing(sft_data, tmp_path, bad_line, code):
    """D1 through the CLI: the error names file, line and code; no run directory is created."""
    bad = tmp_path / "bad.jsonl"
    good = Path(sft_data["train"]).read_text().splitlines()
    bad.write_text("\n".join([*good[:5], bad_line, *good[5:10]]) + "\n")
    out = tmp_path / "run"
    args = overrides(sft_data, out, **{"data.train_path": str(bad)})
    proc = run_subprocess(args)
    assert proc.returncode == 2
    assert f"{bad}:6" in proc.stderr and code in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_tiny_model_without_tokenizer_trains_one_and_keeps_it(sft_data, tmp_path):
    out = tmp_path / "run"
    args = [a for a in overrides(sft_data, out, max_steps=3, **{"run.save_every": 0}) if a != sft_data["tok"]]
    args = [a for i, a in enumerate(args) if not (a == "--model.tokenizer")]
    result = run_inprocess(args)
    assert (out / "tokenizer" / "tokenizer.json").exists()
    assert (result.final_dir / "tokenizer.json").read_text() == (out / "tokenizer" / "tokenizer.json").read_text()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["tokenizer"] == str(out / "tokenizer")


def test_loss_with_the_lm_head_on_loss_positions_only_equals_the_full_head():
    """`logits_to_keep` from the first target column on changes no loss value or gradient."""
    from alignloop.config import TinyModelConfig
    from alignloop.models import tiny_model

    tok = train_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 5, vocab_size=120)
    model = tiny_model(TinyModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, max_position_embeddings=32), tok, seed=0)
    ids = torch.randint(5, 100, (3, 9))
    labels = ids.clone()
    labels[0, :6], labels[1, :4], labels[2, :7] = -100, -100, -100  # prompts of 6, 4 and 7 tokens
    labels[1, 8:] = -100  # right padding
    batch = {"input_ids": ids, "attention_mask": (labels != -100).long() | 1, "labels": labels}

    class NoKeep(torch.nn.Module):  # the same model without `logits_to_keep` in its signature
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    kept, _ = sft.micro_batch_loss(model, batch, 7.0)
    grads = torch.autograd.grad(kept, list(model.parameters()))
    full, _ = sft.micro_batch_loss(NoKeep(model), batch, 7.0)
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    assert torch.allclose(kept, full, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, full_grads, strict=True))
