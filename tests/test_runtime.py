"""alignloop.runtime: seeding, RNG state, accelerate, metrics, checkpoints and exact resume, non-finite guard."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from alignloop.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from alignloop.files import atomic_write_json, atomic_write_text
from alignloop.runtime import (
    MetricsLogger,
    NonFiniteError,
    NonFiniteGuard,
    all_reduce_mean,
    capture_rng_state,
    is_main_process,
    progress,
    restore_rng_state,
    seed_everything,
    setup_accelerator,
    truncate_jsonl,
    write_run_manifest,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_global_rng():
    """Tests here reseed and restore global generators; leave them as they were for other tests."""
    saved = capture_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    restore_rng_state(saved)
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        torch.use_deterministic_algorithms(deterministic)


def _same(xs, ys) -> bool:
    """Bitwise equality of two sequences of tensors."""
    return all(torch.equal(x, y) for x, y in zip(list(xs), list(ys), strict=True))


def _draws() -> tuple[list[float], list[float], list[float]]:
    return ([random.random() for _ in range(3)] + [random.gauss(0, 1)],
            np.random.standard_normal(3).tolist(),
            torch.randn(3).tolist())


# ----------------------------------------------------------------------------- seeding and RNG


def test_rng_capture_restore_round_trip():
    seed_everything(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and in numpy's legacy state
    state = capture_rng_state()
    first = _draws()
    restore_rng_state(state)
    assert _draws() == first


def test_rng_state_survives_checkpoint_without_pickle(tmp_path):
    seed_everything(4)
    random.gauss(0, 1)
    model = nn.Linear(2, 2)
    ckpt = save_checkpoint(tmp_path, 1, model=model)
    first = _draws()
    seed_everything(999)
    load_checkpoint(ckpt, model=model)
    assert _draws() == first
    rng_json = json.loads((ckpt / "rng.json").read_text())
    assert rng_json["torch"] == {"__tensor__": "torch"}
    assert len(rng_json["python"]["internal"]) == 625 and len(rng_json["numpy"]["key"]) == 624


def test_T5_same_seed_gives_bitwise_equal_losses():
    def run() -> list[float]:
        seed_everything(11, deterministic=True)
        model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(100):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    assert run() == run()
    assert torch.are_deterministic_algorithms_enabled()
    seed_everything(11)
    assert not torch.are_deterministic_algorithms_enabled()


# ----------------------------------------------------------------------------- accelerate


def test_setup_accelerator_single_process():
    acc = setup_accelerator(cpu=True, gradient_accumulation_steps=2)
    assert acc.num_processes == 1 and acc.gradient_accumulation_steps == 2
    assert is_main_process(acc) and is_main_process(None)
    t = torch.tensor([1.0, 3.0])
    assert torch.equal(all_reduce_mean(t, acc), t)
    # A second stage in the same process may change precision (the loop runs stages one after another).
    acc = setup_accelerator(cpu=True, mixed_precision="bf16")
    assert acc.mixed_precision == "bf16"
    setup_accelerator(cpu=True)


_TORCHRUN_SCRIPT = """
import json, random, sys
import numpy as np, torch
from torch import nn
from alignloop.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignloop.runtime import all_reduce_mean, is_main_process, seed_everything, setup_accelerator

run_dir, out = sys.argv[1], sys.argv[2]
acc = setup_accelerator(cpu=True)
rank = acc.process_index
mean = all_reduce_mean(torch.tensor([float(rank)]), acc).item()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
model, opt = acc.prepare(model, opt)
seed_everything(100 + rank)  # per-rank streams, as for per-rank data augmentation or dropout
for _ in range(3):
    loss = model(torch.randn(2, 4)).sum()
    acc.backward(loss)
    opt.step()
    opt.zero_grad()
ckpt = save_checkpoint(run_dir, 3, model=model, optimizer=opt, accelerator=acc)
draws = [random.random(), float(np.random.rand()), torch.rand(1).item()]
params = [p.detach().clone() for p in model.parameters()]
seed_everything(7)
with torch.no_grad():
    for p in model.parameters():
        p.zero_()
state = load_checkpoint(latest_checkpoint(run_dir), model=model, optimizer=opt, accelerator=acc)
again = [random.random(), float(np.random.rand()), torch.rand(1).item()]
same = all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
json.dump({"rank": rank, "main": is_main_process(acc), "mean": mean, "draws": draws, "again": again,
           "same_params": same, "step": state["step"], "ckpt": str(ckpt)}, open(f"{out}.{rank}", "w"))
"""


def test_two_process_torchrun_gloo_per_rank_rng(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_TORCHRUN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "run"), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["mean"] == 0.5 and res["main"] == (r == 0) and res["step"] == 3
        assert res["draws"] == res["again"], "per-rank RNG streams must resume exactly"
        assert res["same_params"]
    assert results[0]["draws"] != results[1]["draws"]
    files = sorted(p.name for p in Path(results[0]["ckpt"]).iterdir())
    assert "rng-rank1.json" in files and "rng-rank1.safetensors" in files
    assert not any(n.startswith("rng-rank2") for n in files)


# ----------------------------------------------------------------------------- metrics


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_and_tensorboard_keep_nan(tmp_path):
    with MetricsLogger(tmp_path) as log:
        log.log(1, {"loss": 0.5, "count": 3, "t": torch.tensor(2.0), "n": np.float32(1.5)})
        log.log(2, {"loss": float("nan"), "grad_norm": float("inf")})
        # flushed at every call: a reader sees it before close
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 1, "loss": 0.5, "count": 3, "t": 2.0, "n": 1.5}
    assert rows[1]["step"] == 2 and math.isnan(rows[1]["loss"]) and rows[1]["grad_norm"] == math.inf
    assert "NaN" in (tmp_path / "metrics.jsonl").read_text()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="reserved"):
        MetricsLogger(tmp_path, tensorboard=False).log(3, {"step": 1})


def test_metrics_resume_truncates_later_steps(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 38):
            log.log(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 38, "lo')  # torn by a kill
    with MetricsLogger(tmp_path, resume_step=30) as log:
        for step in range(31, 41):
            log.log(step, {"loss": 1.0 / step})
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert all(r["loss"] == 1.0 / r["step"] for r in rows)


def test_truncate_jsonl(tmp_path):
    path = tmp_path / "sample_ids.jsonl"
    assert truncate_jsonl(path, max_step=3) == 0
    path.write_text("".join(json.dumps({"step": s, "ids": [s]}) + "\n" for s in range(1, 8)))
    assert truncate_jsonl(path, max_step=5) == 5
    assert [r["step"] for r in _read_jsonl(path)] == [1, 2, 3, 4, 5]
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')  # damage that is not a torn last line
    with pytest.raises(ValueError, match=r"sample_ids.jsonl:2"):
        truncate_jsonl(path, max_step=5)


def test_metrics_disabled_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "r", enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "r").exists()


def test_progress_bar_on_stderr(capsys):
    bar = progress(10, "train", initial=3)
    bar.update(2)
    assert bar.n == 5
    bar.close()
    assert "train" in capsys.readouterr().err
    assert progress(10, "x", disable=True).disable


# ----------------------------------------------------------------------------- run manifest and atomic files


def test_run_manifest_and_atomic_writes(tmp_path):
    path = write_run_manifest(tmp_path, command="alignloop sft x.yaml", config={"lr": 1e-3, "out": tmp_path},
                              extra={"note": "t"})
    info = json.loads(path.read_text())
    assert info["command"] == "alignloop sft x.yaml" and info["config"]["lr"] == 1e-3
    assert info["torch"] == torch.__version__ and info["cpu_capability"] and info["note"] == "t"
    assert {"alignloop_version", "git_commit", "transformers", "time"} <= set(info)
    atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2]})
    assert (tmp_path / "a" / "b.txt").read_text() == "hello"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert not [p for p in tmp_path.rglob(".tmp-*")]


# ----------------------------------------------------------------------------- checkpoints and exact resume


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _make(kind: str, init_seed: int = 0):
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.3), nn.GELU(), nn.Linear(12, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    if kind == "lambda":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_warmup_cosine, warmup=3, total=20))
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=1e-4)
    return model, opt, sched


def _train(model, opt, sched, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = model(torch.randn(5, 6)).pow(2).mean()  # data and dropout both draw from the global RNG
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["lambda", "cosine"])
def test_exact_optimizer_scheduler_resume(tmp_path, kind):
    seed_everything(0)
    base = _make(kind)
    base_losses = _train(*base, 20)

    seed_everything(0)
    first = _make(kind)
    losses = _train(*first, 10)
    save_checkpoint(tmp_path, 10, model=first[0], optimizer=first[1], scheduler=first[2])
    seed_everything(12345)
    model, opt, sched = _make(kind, init_seed=1)  # different weights: everything must come from the checkpoint
    state = load_checkpoint(latest_checkpoint(tmp_path), model=model, optimizer=opt, scheduler=sched)
    assert state == {"step": 10}
    losses += _train(model, opt, sched, 10)

    assert losses == base_losses
    assert _same(model.parameters(), base[0].parameters())
    assert sched.get_last_lr() == base[2].get_last_lr()
    for a, b in zip(opt.state.values(), base[1].state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)  # tuples come back as tuples


def test_resume_negative_controls(tmp_path):
    """The exact-resume test is sensitive: a fresh optimizer or unrestored RNG changes the result."""
    seed_everything(0)
    base = _make("lambda")
    base_losses = _train(*base, 20)
    seed_everything(0)
    first = _make("lambda")
    head = _train(*first, 10)
    ckpt = save_checkpoint(tmp_path, 10, model=first[0], optimizer=first[1], scheduler=first[2])

    seed_everything(5)
    model, opt, sched = _make("lambda", init_seed=1)
    load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, restore_rng=False)
    assert head + _train(model, opt, sched, 10) != base_losses

    model, opt, sched = _make("lambda", init_seed=1)
    load_checkpoint(ckpt, model=model, scheduler=sched)  # optimizer not restored
    assert head + _train(model, opt, sched, 10) != base_losses


def test_checkpoint_layout_state_and_tensors(tmp_path):
    model, opt, sched = _make("lambda")
    _train(model, opt, sched, 2)
    gen = torch.Generator().manual_seed(3)
    state = {"epoch": 1, "position": 17, "ids": [1, 2], "pair": (1, "a"), "sampler": gen.get_state(),
             "nested": {"kl": 0.1, 3: "int key"}}
    ckpt = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, state=state)
    assert ckpt == tmp_path / "checkpoints" / "step-00000002"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng.json",
                     "rng.safetensors", "scheduler.json", "trainer_state.json", "trainer_state.safetensors"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["format_version"] == 1 and set(manifest["files"]) == set(names) - {
        "manifest.json"}
    loaded = load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    assert torch.equal(loaded.pop("sampler"), gen.get_state())
    assert loaded == {**{k: v for k, v in state.items() if k != "sampler"}, "step": 2}
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, 3, model=model, state={"step": 4})
    with pytest.raises(TypeError, match="without pickle"):
        save_checkpoint(tmp_path, 3, model=model, state={"obj": object()})
    assert latest_checkpoint(tmp_path) == ckpt  # the failed saves left nothing behind
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_tied_weights_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    a, b = Tied(), Tied()
    ckpt = save_checkpoint(tmp_path, 1, model=a)
    load_checkpoint(ckpt, model=b, restore_rng=False)
    assert torch.equal(a.embed.weight, b.embed.weight) and b.head.weight is b.embed.weight


def test_load_is_strict_about_the_model(tmp_path):
    ckpt = save_checkpoint(tmp_path, 1, model=nn.Linear(3, 2))
    for wrong in (nn.Linear(3, 3), nn.Linear(3, 2, bias=False), nn.Linear(3, 2).double()):
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_checkpoint(ckpt, model=wrong, restore_rng=False)
    with pytest.raises(CheckpointError, match="optimizer.json: missing"):
        model = nn.Linear(3, 2)
        load_checkpoint(ckpt, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_keep_last_and_overwrite(tmp_path):
    model = nn.Linear(2, 2)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path) == root / "step-00000005"
    save_checkpoint(tmp_path, 5, model=model, keep_last=2)  # same step again replaces it
    save_checkpoint(tmp_path, 6, model=model, keep_last=None)
    save_checkpoint(tmp_path, 7, model=model, keep_last=None)
    assert len(list(root.iterdir())) == 4
    save_checkpoint(tmp_path, 8, model=model, keep_last=1)
    assert [p.name for p in root.iterdir()] == ["step-00000008"]
    assert latest_checkpoint(tmp_path / "nothing") is None
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 9, model=model, keep_last=0)


def test_ddp_style_wrapped_model_saves_plain_names(tmp_path):
    class Wrapper(nn.Module):  # torch.compile-style wrapper
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    inner = nn.Linear(2, 2)
    ckpt = save_checkpoint(tmp_path, 1, model=Wrapper(inner))
    fresh = nn.Linear(2, 2)
    load_checkpoint(ckpt, model=fresh, restore_rng=False)
    assert torch.equal(fresh.weight, inner.weight)


# ----------------------------------------------------------------------------- non-finite guard (T3, T3b)


def _guarded_run(steps: int, bad_steps: set[int], guard: NonFiniteGuard, run_dir: Path | None = None,
                 start: int = 0, objs=None, log: MetricsLogger | None = None):
    model, opt, sched = objs or _make("lambda")
    current = {"step": 0}

    def inject(grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, math.inf if current["step"] == 4 else math.nan) \
            if current["step"] in bad_steps else grad

    handle = model[0].weight.register_hook(inject)
    snapshots = {}
    for step in range(start + 1, start + steps + 1):
        current["step"] = step
        snapshots[step - 1] = ([p.detach().clone() for p in model.parameters()], sched.last_epoch,
                               sched.get_last_lr())
        loss = model(torch.randn(5, 6)).pow(2).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if log is not None:
            log.log(step, {"loss": loss.item(), "grad_norm": grad_norm.item()})
        if guard.check(grad_norm):
            opt.step()
            sched.step()
            if run_dir is not None:
                save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched,
                                state={"guard": guard.state_dict()})
        opt.zero_grad()
    handle.remove()
    snapshots[start + steps] = ([p.detach().clone() for p in model.parameters()], sched.last_epoch,
                                sched.get_last_lr())
    return (model, opt, sched), snapshots


def test_T3_inf_grad_skips_step_and_resumes_exactly(tmp_path):
    seed_everything(0)
    guard = NonFiniteGuard()
    with MetricsLogger(tmp_path / "log", tensorboard=False) as log:
        (model, _, _), snaps = _guarded_run(8, {4}, guard, log=log)
    before, after = snaps[3], snaps[4]
    assert _same(before[0], after[0]), "params changed on the skipped step"
    assert before[1] == after[1] and before[2] == after[2], "scheduler advanced on the skipped step"
    assert not _same(snaps[4][0], snaps[5][0])
    assert guard.skipped_steps == 1 and guard.consecutive == 0
    rows = _read_jsonl(tmp_path / "log" / "metrics.jsonl")
    assert rows[3]["step"] == 4 and rows[3]["grad_norm"] == math.inf  # the raw value stays visible

    # resume after the skip == uninterrupted (atol 0)
    seed_everything(0)
    guard2 = NonFiniteGuard()
    _guarded_run(5, {4}, guard2, run_dir=tmp_path / "run")
    seed_everything(77)
    objs = _make("lambda", init_seed=9)
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"), model=objs[0], optimizer=objs[1],
                            scheduler=objs[2])
    guard3 = NonFiniteGuard()
    guard3.load_state_dict(state["guard"])
    assert state["step"] == 5 and guard3.skipped_steps == 1
    (resumed, _, _), _ = _guarded_run(3, set(), guard3, start=5, objs=objs)
    assert _same(resumed.parameters(), model.parameters())


def test_T3b_persistent_nan_raises_after_k_and_last_checkpoint_intact(tmp_path):
    seed_everything(0)
    guard = NonFiniteGuard(max_consecutive=5)
    objs = _make("lambda")
    with pytest.raises(NonFiniteError, match="5 consecutive"):
        _guarded_run(20, set(range(4, 21)), guard, run_dir=tmp_path, objs=objs)
    assert guard.skipped_steps == 5 and guard.consecutive == 5
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-00000003"
    fresh = _make("lambda", init_seed=4)
    load_checkpoint(ckpt, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2])
    assert _same(fresh[0].parameters(), objs[0].parameters())


def test_nonfinite_guard_counting():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(torch.tensor(1.0))
    assert not guard.check(torch.tensor(math.nan))
    assert not guard.check(torch.tensor([1.0, math.inf]))
    assert guard.check(torch.tensor(2.0)) and guard.consecutive == 0 and guard.skipped_steps == 2
    assert not guard.check(torch.tensor(-math.inf)) and not guard.check(torch.tensor(math.nan))
    with pytest.raises(NonFiniteError):
        guard.check(torch.tensor(math.nan))
    with pytest.raises(ValueError):
        NonFiniteGuard(0)


def test_latest_checkpoint_ignores_tmp_and_refuses_manifestless_newest(tmp_path):
    model = nn.Linear(2, 2)
    save_checkpoint(tmp_path, 1, model=model)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000002-abcd").mkdir()
    (root / ".tmp-step-00000002-abcd" / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == root / "step-00000001"
    assert not list(root.glob(".tmp-*"))
    (root / "step-00000002").mkdir()
    with pytest.raises(CheckpointError, match="step-00000002/manifest.json: missing manifest"):
        latest_checkpoint(tmp_path)



def test_optimizer_is_fused_adamw_matching_the_reference_update():
    """The fused kernel must give the textbook AdamW update (decoupled decay on matrices only)."""
    from alignloop.config import OptimConfig
    from alignloop.runtime import make_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    twin = copy.deepcopy(model)
    cfg = OptimConfig(lr=0.1, weight_decay=0.3, beta1=0.8, beta2=0.9, eps=1e-6)
    optimizer = make_optimizer(model, cfg)
    assert all(group["fused"] for group in optimizer.param_groups)
    reference = torch.optim.AdamW([{"params": [twin[0].weight], "weight_decay": 0.3},
                                   {"params": [twin[0].bias, *twin[1].parameters()], "weight_decay": 0.0}],
                                  lr=0.1, betas=(0.8, 0.9), eps=1e-6, foreach=False)
    x = torch.randn(5, 4)
    for _ in range(3):
        for m, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    # fp32 kernels round differently by CPU (2.1e-6 seen on AVX2, < 1e-6 on AVX-512); a wrong decay or
    # bias correction moves these parameters by ~1e-2, so 1e-5 still catches any wrong update rule
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
