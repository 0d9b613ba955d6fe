"""Shared services for every trainer: seeding, accelerate, metrics, atomic files, run manifest,
non-finite guard. Checkpoints live in `checkpoint.py`."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alignloop.files import atomic_write_text

if TYPE_CHECKING:
    from alignloop.config import OptimConfig

logger = logging.getLogger(__name__)

class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm (RELIABILITY T3b)."""


# ----------------------------------------------------------------------------- seeding and RNG state


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and CUDA); `deterministic` turns on deterministic kernels (T1-GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != deterministic:  # the call costs a 1 s import
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def capture_rng_state() -> dict[str, Any]:
    """Every global generator's state: JSON-able values plus uint8 tensors ("torch", "cuda") for safetensors."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {"bit_generator": name, "key": np.asarray(key).tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored for the devices that exist."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["bit_generator"], np.asarray(npy["key"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and not torch.cuda.is_available():
        logger.warning("checkpoint has CUDA generator states but CUDA is not available: not restored")
    elif cuda:
        if len(cuda) != torch.cuda.device_count():
            logger.warning("checkpoint has %d CUDA generator states, this machine %d devices",
                           len(cuda), torch.cuda.device_count())
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------- accelerate


def setup_accelerator(*, mixed_precision: str = "no", gradient_accumulation_steps: int = 1,
                      cpu: bool | None = None) -> Any:
    """An `accelerate.Accelerator`, the same code single-process and under `torchrun` (gloo on CPU)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Accelerate keeps process-wide settings; reset them (not the process group) so that stages run one
    # after another in one process (the loop) may use different precision or accumulation.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if cpu is None:
        cpu = not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps,
                       cpu=cpu)


def is_main_process(accelerator: Any | None) -> bool:
    """True on rank 0, or when there is no accelerator."""
    return accelerator is None or bool(accelerator.is_main_process)


def all_reduce_mean(tensor: torch.Tensor, accelerator: Any | None) -> torch.Tensor:
    """Element-wise mean of `tensor` over all processes (itself when single-process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    return accelerator.reduce(tensor.to(accelerator.device), reduction="mean")


# ----------------------------------------------------------------------------- metrics and progress


class MetricsLogger:
    """Rank-0 metrics: one JSON line per call in `run_dir/metrics.jsonl` and TensorBoard in `run_dir/tb`.

    Values are written as they are: NaN and inf stay visible (RELIABILITY T3). With `resume_step`, lines with a
    larger step (written after the checkpoint that is resumed) are dropped first, so the file reads like an
    uninterrupted run.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file: Any = None
        self._tb: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, max_step=resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge, flush_secs=10)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append `{"step": step, **metrics}`; tensors and numpy scalars become python numbers."""
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("'step' is reserved in metrics")
        row: dict[str, Any] = {"step": int(step)}
        for name, value in metrics.items():
            row[name] = _scalar(value)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in row.items():
                if name != "step":
                    self._tb.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _scalar(value: Any) -> int | float:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, int)):
        return int(value)
    return float(value)


def truncate_jsonl(path: str | os.PathLike, *, max_step: int) -> int:
    """Atomically drop the lines of a `{"step": ...}` JSONL file with step > `max_step`; return lines kept.

    A torn last line (a kill mid-write) is dropped; a malformed line elsewhere raises ValueError.
    """
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").split("\n")
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: torn by a kill
                logger.warning("%s: dropping a torn last line", path)
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON line") from None
        if int(row["step"]) <= max_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
    return len(kept)


def progress(total: int | None, desc: str, *, disable: bool = False, initial: int = 0) -> Any:
    """A tqdm progress bar on stderr (pass `disable=not is_main_process(acc)`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, initial=initial, file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------- atomic files


def file_digest(path: Path, *, sync: bool = False) -> dict[str, Any]:
    """sha256 and size of `path`; with `sync`, fsync it too (fsync works on a read-only descriptor)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        if sync:
            os.fsync(f.fileno())
        return {"sha256": digest.hexdigest(), "size": f.tell()}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- run manifest


def write_run_manifest(run_dir: str | os.PathLike, *, command: str, config: dict[str, Any],
                       extra: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/manifest.json`: what produced the run (versions, git commit, CPU, command, config)."""
    info: dict[str, Any] = {
        "alignloop_version": _package_version("alignloop"),
        "git_commit": _git(["rev-parse", "HEAD"]),
        "git_dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _package_version("transformers"),
        "accelerate": _package_version("accelerate"),
        "cuda": torch.version.cuda,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": command,
        "time": utc_now(),
        "config": config,
        **(extra or {}),
    }
    path = Path(run_dir) / "manifest.json"
    atomic_write_text(path, json.dumps(info, indent=2, default=str) + "\n")
    return path


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return getattr(sys.modules.get(name), "__version__", None)


def _git(args: list[str]) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


# ----------------------------------------------------------------------------- optimisation and data position


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    params = decay + no_decay
    # The fused kernel updates every tensor in one pass instead of a dozen elementwise ops per tensor; it needs
    # floating-point parameters on a device it supports.
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): warmup, then decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def split_global_batch(indices: list[int], rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: a contiguous shard, cut into `grad_accum` near-equal
    consecutive pieces (equal when sizes divide; losses are normalised by the global count either way)."""
    local = indices[rank * len(indices) // world_size : (rank + 1) * len(indices) // world_size]
    return [local[i * len(local) // grad_accum : (i + 1) * len(local) // grad_accum] for i in range(grad_accum)]


def data_position(step: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, batch index in epoch) of optimizer step `step`: the whole data state, since batch order
    is a pure function of (seed, epoch)."""
    return divmod(step, steps_per_epoch)


def test_hooks(step: int, micro: int | str | None = None) -> bool:
    """Fault injection for the reliability tests, driven by environment variables.

    ALIGNLOOP_TEST_KILL_AT=<step>[:<micro>] SIGKILLs the process after that optimizer step (or
    micro-batch, or a named point inside a step such as PPO's "rollout"); ALIGNLOOP_TEST_NONFINITE_AT=<step>
    returns True so the caller poisons that step's loss.
    """
    target = os.environ.get("ALIGNLOOP_TEST_KILL_AT")
    if target:
        want_step, _, want_micro = target.partition(":")
        if int(want_step) == step and (want_micro == "" if micro is None else want_micro == str(micro)):
            os.kill(os.getpid(), signal.SIGKILL)
    poison = os.environ.get("ALIGNLOOP_TEST_NONFINITE_AT")
    return bool(poison) and micro == 0 and int(poison) == step



# ----------------------------------------------------------------------------- non-finite guard


class NonFiniteGuard:
    """Skip optimizer steps whose loss or clipped grad norm is not finite (RELIABILITY T3, T3b).

    Usage: `if guard.check(grad_norm): optimizer.step(); scheduler.step()`, then `optimizer.zero_grad()` either
    way. Raises NonFiniteError when `max_consecutive` checks in a row fail. Save `state_dict()` in the
    trainer state so that a resumed run counts on.
    """

    def __init__(self, max_consecutive: int = 100) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped_steps = 0
        self.consecutive = 0

    def check(self, loss_or_grad_norm: torch.Tensor) -> bool:
        """True if the step may be taken; False (and counted) if it must be skipped."""
        if bool(torch.isfinite(torch.as_tensor(loss_or_grad_norm)).all()):
            self.consecutive = 0
            return True
        self.skipped_steps += 1
        self.consecutive += 1
        logger.warning("non-finite value %s: skipping the optimizer step (%d in a row, %d in all)",
                       loss_or_grad_norm, self.consecutive, self.skipped_steps)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(f"{self.consecutive} consecutive non-finite steps "
                                 f"(max_consecutive={self.max_consecutive}); the last checkpoint is intact")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive = int(state["consecutive"])
