"""Speed against TRL on the workloads of the TRL CPU benchmark, spec v1 (`../shared/bench/trl/SPEC.md`).

alignloop's trainers run the spec's per-step work on the spec's assets (tokenizer, tiny/small Llama
checkpoints and data, checked by sha256) with the spec's rules: 2 threads, one fresh process per run,
2 warm-up steps then 20 measured (10 PPO updates), median step time, tokens counted by a forward pre-hook
on each model's decoder backbone, FLOPs = 6N per trained token + 2N per forward-only token, peak RSS of
the process. The token meter and the matmul ceiling are the spec runner's own (`run_bench.TokenMeter`,
`run_bench.run_matmul`), imported, so both sides count alike.

When the TRL environments of `../shared/bench/trl/setup.sh` exist (`--trl-envs DIR` holding venv/ and
venv-ppo/), `all` runs TRL's side of each workload right after ours, in the same run, and `report` prints
alignloop/TRL ratios of samples/s and peak RSS with each side's fraction of the matmul ceiling.

    python benchmarks/speed.py all --assets-dir $ANCHORS --trl-envs $ANCHORS --out $ANCHORS/work/speed.json
    python benchmarks/speed.py one --workload ppo --model tiny --assets-dir $ANCHORS --json-out /tmp/ppo.json
    python benchmarks/speed.py report --results $ANCHORS/work/speed.json [--reference ../shared/bench/trl/results/results.json]

Our side of each workload (what differs from TRL's is our trainers' design, not the per-step work):
  generate  alignloop.generation.generate: 16 prompts, 64 new tokens, T=1, no top-k/top-p
  sft       alignloop.train.sft: 16 sequences per step (length-bucketed), loss on completion tokens, lr 2e-5
  rm        alignloop.train.reward: 16 pairs (32 sequences in one forward), Bradley-Terry, lr 1e-4
  ppo       alignloop.train.ppo: rollout of 16 prompts x 64 tokens, reference/value/reward forwards, GAE,
            4 epochs x 2 minibatches of 8, fixed k1 KL coefficient 0.05, vf_coef 0.1, lr 3e-6
All use AdamW (0.9, 0.999, eps 1e-8, no weight decay), linear decay to 0 without warm-up, grad-norm clip 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SPEC_DIR = Path(__file__).resolve().parents[2] / "shared" / "bench" / "trl"
THREADS = 2
WARMUP, MEASURED, MEASURED_PPO, BATCH = 2, 20, 10, 16
WORKLOADS = ["generate", "sft", "rm", "ppo"]
SPEC_SHA256 = {  # SPEC.md section 2.3
    "models/tok/tokenizer.json": "d6d933ac84bad5152ed3b962139f5df3d67fb5950731b6c9fe1378e63cdb1b00",
    "data/sft.jsonl": "95415993b6972f1df73d959946fd6d20dd319ba6e405e46cd845082f236a7aa7",
    "data/prefs.jsonl": "f63d567af533d71f498e84f8e8270b20e1a2bdc0c09802399f71154ce3733a34",
    "data/rl_prompts.jsonl": "0094a8f090f6acf6d54c8322186dee34885c4a3ea9dca14ea25329ad2c783682",
    "models/tiny-policy/model.safetensors": "4f1ceb7e868c67f34d2bef394899657dc15fd62c4662470ea0cde8e06a9ce798",
    "models/tiny-rm/model.safetensors": "f94545b1d956f468684995fb0cd2cee1cb8e007be4dd64d05f83f88e4af9757b",
    "models/small-policy/model.safetensors": "9a85cfcc049921470acafed5bb6a87061551c4e3d32d54315dbea903970af2e6",
    "models/small-rm/model.safetensors": "6c08de807e83daf4f21ae2fedd8793f5456ddeb6cb561f0f33f4defe8ff53c78",
}


def set_env(tmp: str | None = None) -> None:
    """The spec's process environment; must run before torch is imported."""
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[key] = str(THREADS)
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"})
    if tmp:
        os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "hf_datasets_cache")


def spec_runner() -> Any:
    """The spec's own runner module (its token meter, matmul ceiling and machine description)."""
    if not (SPEC_DIR / "run_bench.py").exists():
        raise SystemExit(f"{SPEC_DIR}/run_bench.py not found: this benchmark needs ../shared/bench/trl beside the repo")
    sys.path.insert(0, str(SPEC_DIR))
    import run_bench

    return run_bench


def check_assets(assets: Path) -> dict[str, str]:
    """Every spec file present with its spec v1 sha256; the first mismatch is an error naming the file."""
    for rel, want in SPEC_SHA256.items():
        path = assets / rel
        if not path.exists():
            raise SystemExit(f"{path}: missing; build the assets with {SPEC_DIR}/make_assets.py --assets-dir {assets}")
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != want:
            raise SystemExit(f"{path}: sha256 {got} differs from spec v1 ({want}); use the spec's exact files")
    return dict(SPEC_SHA256)


def model_dir_with_tokenizer(assets: Path, model: str, kind: str, tmp: Path) -> Path:
    """A folder holding the spec checkpoint and the spec tokenizer side by side (our loaders read both from one
    folder); files are symlinked, nothing is copied."""
    out = tmp / f"{model}-{kind}"
    out.mkdir(parents=True, exist_ok=True)
    for src in [*(assets / "models" / f"{model}-{kind}").iterdir(), *(assets / "models" / "tok").iterdir()]:
        if not (out / src.name).exists():
            (out / src.name).symlink_to(src)
    return out


# ----------------------------------------------------------------------------------------------------- our side


def count_shared_prompt_rows(reward: Any, meter: Any, flop_params: int) -> None:
    """Our reward trainer feeds each pair as one row with its prompt once and a (B, 1, T, T) mask, for which the
    spec meter counts every position, padding included; replace the step's count by the real tokens of the rows
    (`real`), and count sequences as pairs x 2, so tokens, FLOPs and samples mean what they mean for TRL."""
    collate = reward.collate_shared_pairs

    def counted(batch: Any, pad_id: int) -> Any:
        packed = collate(batch, pad_id)
        meter.pending_real = int(packed["real"].sum())
        return packed

    def fix_counts() -> Any:
        rec = pop()
        real = getattr(meter, "pending_real", None)
        grad = rec["per_role"].get("policy")
        if real is not None and grad is not None:
            grad.update(grad_tokens=real, grad_seqs=2 * grad["grad_seqs"])
            rec["model_flops"] = 6.0 * flop_params * real
        meter.pending_real = None
        return rec

    pop = meter.pop
    reward.collate_shared_pairs, meter.pop = counted, fix_counts


def count_fast_decoder_tokens() -> None:
    """Our Llama decode forward (`alignloop.llama_decode`) runs the backbone's layers itself, so the spec meter's
    pre-hook on the backbone never fires; fire the backbone's pre-hooks with what each call processes (prefill:
    the prompts and their mask; a step: one token per row, as `generate` counts it), so both sides count alike."""
    from alignloop import llama_decode

    prefill, step = llama_decode.LlamaDecoder.prefill, llama_decode.LlamaDecoder.step

    def fire(decoder: Any, ids: Any, mask: Any) -> None:
        for hook in list(decoder.inner._forward_pre_hooks.values()):
            hook(decoder.inner, (), {"input_ids": ids, "attention_mask": mask})

    def counted_prefill(self: Any, ids: Any, mask: Any) -> Any:
        fire(self, ids, mask)
        return prefill(self, ids, mask)

    def counted_step(self: Any, tokens: Any) -> Any:
        import torch

        fire(self, tokens[:, None], torch.ones_like(tokens[:, None]))
        return step(self, tokens)

    llama_decode.LlamaDecoder.prefill, llama_decode.LlamaDecoder.step = counted_prefill, counted_step


class StepTimer:
    """Wall time between consecutive step ends (the first interval starts at `start()`), with the meter's counts."""

    def __init__(self, meter: Any) -> None:
        self.meter, self.steps, self.t = meter, [], 0.0

    def start(self) -> None:
        self.rss_before_train = self.rss()
        self.meter.pop()
        self.t = time.perf_counter()

    def __call__(self, step: int) -> None:
        now = time.perf_counter()
        if not self.steps and not self.t:  # train() began before start(): count from its first step
            self.t = now
        rec = self.meter.pop()
        rec["dt"], self.t = now - self.t, now
        rec["rss_mib"] = self.rss()
        self.steps.append(rec)

    @staticmethod
    def rss() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def optim_overrides(lr: float, section: str = "optim") -> list[str]:
    return [f"--{section}.lr", str(lr), f"--{section}.beta2", "0.999", f"--{section}.eps", "1e-8",
            f"--{section}.weight_decay", "0", f"--{section}.warmup_steps", "0", f"--{section}.schedule", "linear",
            f"--{section}.min_lr_ratio", "0", f"--{section}.max_grad_norm", "1.0"]


def run_overrides(out: Path, precision: str) -> list[str]:
    return ["--run.output_dir", str(out), "--run.log_every", "1", "--run.eval_every", "0", "--run.save_every", "0",
            "--run.tensorboard", "false", "--run.progress_bar", "false", "--run.seed", "0",
            "--run.mixed_precision", "bf16" if precision == "bf16" else "no"]


def ours_trainer(workload: str, model: str, precision: str, assets: Path, tmp: Path, rb: Any) -> dict[str, Any]:
    """One of our trainers on the spec workload; returns per-step records and what was trained."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignloop.config import load_config
    from alignloop.models import load_tokenizer

    n_pol, n_rm = rb.flop_params(str(assets), model)
    data = assets / "data"
    tokenizer = load_tokenizer(str(assets / "models" / "tok"))
    policy_dir = assets / "models" / f"{model}-policy"
    meter = rb.TokenMeter()
    timer = StepTimer(meter)
    common = run_overrides(tmp / "run", precision)
    measured = MEASURED_PPO if workload == "ppo" else MEASURED
    torch.manual_seed(0)
    if workload == "sft":
        from alignloop.train import sft

        cfg = load_config(sft.SFTConfig, None, [
            "--data.train_path", str(data / "sft.jsonl"), "--data.max_length", "128",
            "--batch.micro_batch_size", str(BATCH), "--batch.max_steps", str(WARMUP + measured),
            *optim_overrides(2e-5), *common])
        policy = AutoModelForCausalLM.from_pretrained(policy_dir)
        meter.attach(policy, "policy", n_pol)
        timer.start()
        sft.train(cfg, models=(policy, tokenizer), on_step_end=timer)
    elif workload == "rm":
        from alignloop.train import reward

        cfg = load_config(reward.RewardConfig, None, [
            "--data.train_path", str(data / "prefs.jsonl"), "--data.eval_share", "0", "--data.max_length", "128",
            "--data.use_margin", "false", "--batch.micro_batch_size", str(BATCH), "--batch.eval_batch_size", str(2 * BATCH),
            "--batch.max_steps", str(WARMUP + measured), *optim_overrides(1e-4), *common])
        rm = AutoModelForSequenceClassification.from_pretrained(assets / "models" / f"{model}-rm", num_labels=1)
        rm.config.pad_token_id = tokenizer.pad_token_id
        meter.attach(rm, "policy", n_rm)
        count_shared_prompt_rows(reward, meter, n_rm)
        timer.start()
        reward.train(cfg, models=(rm, tokenizer), on_step_end=timer)
    elif workload == "ppo":
        from alignloop.rewards import RewardModelSource
        from alignloop.train import ppo

        rm_dir = model_dir_with_tokenizer(assets, model, "rm", tmp)
        cfg = load_config(ppo.PPOConfig, None, [
            "--reward.source", str(rm_dir), "--data.train_path", str(data / "rl_prompts.jsonl"),
            "--gen.max_new_tokens", "64", "--kl.init_coef", "0.05", "--kl.adaptive", "false", "--kl.estimator", "k1",
            "--total_steps", str(WARMUP + measured), "--rollout_prompts", str(BATCH), "--minibatch_size", "8",
            "--ppo_epochs", "4", "--vf_coef", "0.1", "--clip_range", "0.2", "--clip_range_value", "0.2",
            "--gamma", "1", "--lam", "0.95", *optim_overrides(3e-6), *optim_overrides(3e-6, "critic_optim"), *common])
        policy = AutoModelForCausalLM.from_pretrained(policy_dir)
        reference = AutoModelForCausalLM.from_pretrained(policy_dir)
        critic = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)
        critic.config.pad_token_id = tokenizer.pad_token_id
        score = RewardModelSource(rm_dir)
        for m, role, n in [(policy, "policy", n_pol), (reference, "ref", n_pol), (critic, "value", n_rm),
                           (score.model, "reward", n_rm)]:
            meter.attach(m, role, n)
        timer.start()
        ppo.train(cfg, models=ppo.PPOModels(policy, critic, tokenizer, reference), reward_fn=score, on_step_end=timer)
    else:
        raise ValueError(workload)
    return {"steps": timer.steps, "measured": measured, "pairwise": workload == "rm", "ppo_epochs": 4,
            "rss_before_train_mib": timer.rss_before_train}


def ours_generate(model: str, precision: str, assets: Path, rb: Any) -> dict[str, Any]:
    """Our sampler on the spec's generate workload: the first 16 RL prompts, exactly 64 new tokens each."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignloop.config import GenConfig
    from alignloop.data import load_records
    from alignloop.generation import generate
    from alignloop.models import load_tokenizer
    from alignloop.tokenization import encode_prompt

    n_pol, _ = rb.flop_params(str(assets), model)
    tokenizer = load_tokenizer(str(assets / "models" / "tok"))
    policy = AutoModelForCausalLM.from_pretrained(assets / "models" / f"{model}-policy").eval()
    prompts = [encode_prompt(p.messages, tokenizer) for p in load_records(assets / "data" / "rl_prompts.jsonl", "prompt")[:BATCH]]
    cfg = GenConfig(max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0, batch_size=BATCH)
    meter = rb.TokenMeter()
    meter.attach(policy, "policy", n_pol)
    steps = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    for i in range(WARMUP + MEASURED):
        meter.pop()
        t = time.perf_counter()
        with autocast:
            rollout = generate(policy, tokenizer, prompts, cfg, seed=i)
        dt = time.perf_counter() - t
        if rollout.response_ids.shape[1] != 64:
            raise RuntimeError(f"call {i}: every row ended before 64 tokens ({rollout.response_ids.shape[1]})")
        rec = meter.pop()
        rec["dt"] = dt
        steps.append(rec)
    return {"steps": steps, "measured": MEASURED, "new_tokens_per_step": BATCH * 64}


def summarise(workload: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The spec's figures from per-step records (section 4)."""
    steps = raw["steps"]
    if len(steps) < WARMUP + raw["measured"]:
        raise RuntimeError(f"only {len(steps)} steps recorded")
    meas = steps[WARMUP:]
    dts = [s["dt"] for s in meas]
    total = sum(dts)

    def role_sum(key: str, role: str = "policy") -> float:
        return sum(s["per_role"].get(role, {}).get(key, 0) for s in meas)

    flops = sum(s["model_flops"] for s in meas)
    out: dict[str, Any] = {"step_times_s": dts, "warmup_step_times_s": [s["dt"] for s in steps[:WARMUP]],
                           "measured_steps": len(meas), "median_step_s": statistics.median(dts),
                           "mean_step_s": total / len(dts), "model_flops_per_step": flops / len(meas),
                           "achieved_gflops": flops / total / 1e9, "per_role_tokens_last_step": meas[-1]["per_role"],
                           "rss_before_train_mib": raw.get("rss_before_train_mib"),
                           "rss_per_step_mib": [s.get("rss_mib") for s in steps]}
    if workload == "generate":
        new = raw["new_tokens_per_step"]
        out.update(samples_per_s=BATCH * len(meas) / total, tokens_per_s=new * len(meas) / total,
                   new_tokens_per_step=new)
        return out
    tokens, padded = role_sum("grad_tokens"), role_sum("grad_padded_tokens")
    if workload == "ppo":  # each rollout is trained on ppo_epochs times: unique tokens per update
        tokens, padded = tokens / raw["ppo_epochs"], padded / raw["ppo_epochs"]
        samples = BATCH * len(meas)
    else:
        samples = role_sum("grad_seqs") / (2 if raw["pairwise"] else 1)
    out.update(samples_per_s=samples / total, tokens_per_s=tokens / total, train_tokens_per_step=tokens / len(meas),
               train_padded_tokens_per_step=padded / len(meas),
               policy_nograd_tokens_per_step=role_sum("nograd_tokens") / len(meas) if workload == "ppo" else 0)
    return out


def cmd_one(a: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"alignloop-{a.workload}-{a.model}-", dir=a.workdir))
    set_env(str(tmp))
    rb = spec_runner()
    import torch

    import alignloop

    torch.set_num_threads(THREADS)
    assets = Path(a.assets_dir).resolve()
    check_assets(assets)
    t0 = time.perf_counter()
    if a.workload == "matmul":
        res = rb.run_matmul()
    else:
        count_fast_decoder_tokens()
        raw = (ours_generate(a.model, a.precision, assets, rb) if a.workload == "generate"
               else ours_trainer(a.workload, a.model, a.precision, assets, tmp, rb))
        res = {"workload": a.workload, "model": a.model, "precision": a.precision, **summarise(a.workload, raw)}
    res.update(framework="alignloop", torch_threads=torch.get_num_threads(), wall_s=time.perf_counter() - t0,
               peak_rss_mib=rb.peak_rss_mib(), scipy_loaded="scipy" in sys.modules, status="ok",
               versions={"alignloop": alignloop.__version__, "torch": torch.__version__},
               cpu_capability=torch.backends.cpu.get_cpu_capability())
    Path(a.json_out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (list, dict))}, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- orchestration


def run_child(cmd: list[str], log_path: Path, json_out: Path, timeout: int) -> dict[str, Any]:
    """One run in a fresh process (peak RSS is per process); failures keep the log's tail."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), OPENBLAS_NUM_THREADS=str(THREADS))
    json_out.unlink(missing_ok=True)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            rc: int | str = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc == 0 and json_out.exists():
        res = json.loads(json_out.read_text())
    else:
        res = {"status": "timeout" if rc == "timeout" else "failed", "returncode": rc,
               "error_tail": log_path.read_text()[-3000:]}
    res["elapsed_s"] = time.perf_counter() - t
    return res


def cmd_all(a: argparse.Namespace) -> None:
    rb = spec_runner()
    assets, work = Path(a.assets_dir).resolve(), Path(a.workdir).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    check_assets(assets)
    trl_py = {"main": Path(a.trl_envs) / "venv/bin/python", "ppo": Path(a.trl_envs) / "venv-ppo/bin/python"} if a.trl_envs else {}
    if trl_py and not all(p.exists() for p in trl_py.values()):
        raise SystemExit(f"--trl-envs {a.trl_envs}: expected venv/bin/python and venv-ppo/bin/python (bench/trl/setup.sh)")
    if a.ours_python and not os.access(a.ours_python, os.X_OK):
        raise SystemExit(f"--ours-python {a.ours_python}: not an executable interpreter")
    out = Path(a.out)
    results: dict[str, Any] = {"spec": "v1", "machine": rb.machine_info(), "command": " ".join(sys.argv), "runs": []}
    if a.resume and out.exists():
        results = json.loads(out.read_text())
    done = {(r["framework"], r["workload"], r["model"], r["precision"]) for r in results["runs"] if r.get("status") == "ok"}
    me = [a.ours_python or sys.executable, str(Path(__file__).resolve()), "one", "--assets-dir", str(assets), "--workdir", str(work)]
    prefixes = [(str(assets), "$ASSETS"), (str(work), "$WORKDIR"), (str(SPEC_DIR), "bench/trl"),
                (str(Path(__file__).resolve().parents[1]), "$REPO")] + ([(str(Path(a.trl_envs).resolve()), "$TRL_ENVS")] if a.trl_envs else [])
    plan = [("alignloop", "matmul", "-", "fp32")]
    for precision in a.precisions.split(","):
        for model in a.models.split(","):
            for workload in [w for w in WORKLOADS if w in a.only.split(",")]:
                plan += [("alignloop", workload, model, precision)] + ([("trl", workload, model, precision)] if trl_py else [])
    for framework, workload, model, precision in plan:
        if (framework, workload, model, precision) in done:
            continue
        tag = f"{framework}-{workload}-{model}-{precision}"
        json_out = work / f"{tag}.json"
        args = ["--workload", workload, "--precision", precision, "--json-out", str(json_out)]
        args += ["--model", model] if workload != "matmul" else []
        if framework == "alignloop":
            cmd = me + args
        else:
            cmd = [str(trl_py["ppo" if workload == "ppo" else "main"]), str(SPEC_DIR / "run_bench.py"), "one",
                   "--assets-dir", str(assets), "--workdir", str(work), *args]
        print(f"[{time.strftime('%H:%M:%S')}] {tag}", flush=True)
        res = run_child(cmd, work / "logs" / f"{tag}.log", json_out, a.timeout)
        res.update(framework=framework, workload=workload, model=model, precision=precision)
        results["runs"] = [r for r in results["runs"] if (r["framework"], r["workload"], r["model"], r["precision"])
                           != (framework, workload, model, precision)] + [res]
        out.write_text(json.dumps(rb.sanitize(results, prefixes), indent=1))  # no paths of this machine
        print(f"    -> {res['status']} in {res['elapsed_s']:.0f} s"
              + (f", median step {res['median_step_s']:.3f} s" if "median_step_s" in res else ""), flush=True)
    print(render(results, a.reference))


# --------------------------------------------------------------------------------------------------- report


def ceilings(results: dict[str, Any]) -> dict[str, float]:
    mm = next((r for r in results["runs"] if r["workload"] == "matmul" and r.get("status") == "ok"), None)
    return {"fp32": mm["fp32"]["gflops_max"], "bf16": mm["bf16"]["gflops_max"]} if mm else {}


def _cell(run: dict[str, Any] | None, key: str, fmt: str) -> str:
    return fmt.format(run[key]) if run and key in run else "-"


def _frac(run: dict[str, Any] | None, ceiling: float | None) -> str:
    """Percent of the matmul ceiling the run's model FLOP rate reaches."""
    return f"{100 * run['achieved_gflops'] / ceiling:.1f}" if run and ceiling else "-"


def render(results: dict[str, Any], reference: str | None = None) -> str:
    """Markdown: the ratio table (alignloop / TRL, same run) and, with a reference, TRL now vs TRL then."""
    ceil = ceilings(results)
    runs = {(r["framework"], r["workload"], r["model"], r["precision"]): r for r in results["runs"] if r.get("status") == "ok"}
    lines = []
    if ceil:
        lines += [f"Matmul ceiling (spec `run_matmul`): fp32 {ceil['fp32']:.1f} GFLOP/s, bf16 {ceil['bf16']:.1f} GFLOP/s", ""]
    lines += ["| workload | model | prec | alignloop samples/s | TRL samples/s | **speed ratio** | median-step ratio | "
              "alignloop RSS MiB | TRL RSS MiB | **RSS ratio** | alignloop % ceiling | TRL % ceiling |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({k[1:] for k in runs if k[1] != "matmul"},
                  key=lambda k: (k[2] != "fp32", k[1] != "tiny", WORKLOADS.index(k[0])))
    for workload, model, precision in keys:
        ours, trl = runs.get(("alignloop", workload, model, precision)), runs.get(("trl", workload, model, precision))
        c = ceil.get(precision)
        speed = f"**{ours['samples_per_s'] / trl['samples_per_s']:.2f}x**" if ours and trl else "-"
        rss = f"**{ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}**" if ours and trl else "-"
        median = f"{trl['median_step_s'] / ours['median_step_s']:.2f}x" if ours and trl else "-"
        lines.append(f"| {workload} | {model} | {precision} | {_cell(ours, 'samples_per_s', '{:.2f}')} | "
                     f"{_cell(trl, 'samples_per_s', '{:.2f}')} | {speed} | {median} | {_cell(ours, 'peak_rss_mib', '{:.0f}')} | "
                     f"{_cell(trl, 'peak_rss_mib', '{:.0f}')} | {rss} | {_frac(ours, c)} | {_frac(trl, c)} |")
    if reference:
        ref = json.loads(Path(reference).read_text())
        ref_runs = {(r["workload"], r["model"], r["precision"]): r for r in ref["runs"] if r.get("status") == "ok"}
        lines += ["", "TRL in this run against the spec's reference results (samples/s):", "",
                  "| workload | model | prec | TRL now | reference | now / reference |", "|---|---|---|---:|---:|---:|"]
        for workload, model, precision in keys:
            now, then = runs.get(("trl", workload, model, precision)), ref_runs.get((workload, model, precision))
            if now and then:
                lines.append(f"| {workload} | {model} | {precision} | {now['samples_per_s']:.2f} | "
                             f"{then['samples_per_s']:.2f} | {now['samples_per_s'] / then['samples_per_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one", help="one workload of ours in this process")
    one.add_argument("--workload", required=True, choices=["matmul", *WORKLOADS])
    one.add_argument("--model", default="tiny", choices=["tiny", "small"])
    one.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    one.add_argument("--assets-dir", required=True)
    one.add_argument("--json-out", required=True)
    one.add_argument("--workdir", default=None)
    al = sub.add_parser("all", help="the matrix, ours and (with --trl-envs) TRL's, one fresh process per run")
    al.add_argument("--assets-dir", required=True)
    al.add_argument("--out", required=True)
    al.add_argument("--trl-envs", default=None, help="folder holding venv/ and venv-ppo/ from bench/trl/setup.sh")
    al.add_argument("--ours-python", default=None,
                    help="interpreter for our side (default: this one); give one of a venv with alignloop's runtime "
                         "dependencies only, as TRL's side has its own: a dev venv holds scipy (for statsmodels), which "
                         "transformers then imports at model load, about 50 MiB of peak RSS that neither side needs")
    al.add_argument("--models", default="tiny,small")
    al.add_argument("--precisions", default="fp32")
    al.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    al.add_argument("--timeout", type=int, default=1800)
    al.add_argument("--workdir", default=tempfile.gettempdir())
    al.add_argument("--resume", action="store_true", help="keep the ok runs already in --out")
    al.add_argument("--reference", default=str(SPEC_DIR / "results" / "results.json"))
    rp = sub.add_parser("report", help="markdown tables from a results file")
    rp.add_argument("--results", required=True)
    rp.add_argument("--reference", default=str(SPEC_DIR / "results" / "results.json"))
    a = ap.parse_args()
    if a.cmd == "one":
        cmd_one(a)
    elif a.cmd == "all":
        cmd_all(a)
    else:
        print(render(json.loads(Path(a.results).read_text()), a.reference))


if __name__ == "__main__":
    main()
