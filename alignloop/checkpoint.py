"""Atomic, exact, pickle-free checkpoints.

A checkpoint is `run_dir/checkpoints/step-{step:08d}/`. It is written into `.tmp-step-{step:08d}-<random>/`,
every file and the directory are fsynced, then it is renamed into place and the parent fsynced (RELIABILITY
T2, T2c). Nothing is ever unpickled (T6): tensors live in safetensors, everything else in JSON.

    model.safetensors                    model.state_dict(), tied weights stored once
    optimizer.safetensors + .json        optimizer.state_dict(): tensors keyed by path ("state.0.exp_avg")
    scheduler.json (+ .safetensors)      scheduler.state_dict()
    rng.safetensors + rng.json           python, numpy, torch CPU and CUDA generators of rank 0
    rng-rank{r}.safetensors + .json      the same for rank r > 0 (saved with an `accelerator`)
    trainer_state.json (+ .safetensors)  the caller's `state`, plus "step"
    manifest.json                        written last: sha256 and size of every file, format version, step, time

A trainer with several models (PPO: policy and critic) passes `{name: object}` mappings for `model`,
`optimizer` and `scheduler`; each entry is stored as `model-{name}.safetensors`, `optimizer-{name}.json`, ...
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model

from alignloop import runtime
from alignloop.files import fsync_dir

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "alignloop-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_CKPT_FILE = re.compile(r"^(model(-[a-z][a-z0-9_]*)?\.safetensors|((optimizer|scheduler)(-[a-z][a-z0-9_]*)?|trainer_state"
                        r"|rng(-rank\d+)?)\.(json|safetensors))$")
_PART_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
# Test hook (T2): seconds to sleep between the phases of save_checkpoint, so kills land inside it.
_SAVE_DELAY_ENV = "ALIGNLOOP_TEST_SAVE_DELAY"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, unsafe or does not fit the objects it is loaded into."""



# ----------------------------------------------------------------------------- pickle-free state trees


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of `obj` with every tensor moved to `tensors` under its dotted path."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        if key in tensors:
            raise ValueError(f"two tensors map to the key {key!r}")
        tensors[key] = obj.detach().cpu()
        return {_TENSOR: key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}.{i}".lstrip("."), tensors) for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}".lstrip("."), tensors) for k, v in obj.items()}
        if not all(k is None or isinstance(k, (bool, int, float, str)) for k in obj):
            raise TypeError(f"dict keys at {path!r} must be str, int, float, bool or None")
        return {_ITEMS: [[k, _encode(v, f"{path}.{k}".lstrip("."), tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {_TENSOR}:
        return tensors[obj[_TENSOR]]
    if set(obj) == {_TUPLE}:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if set(obj) == {_ITEMS}:
        return {k: _decode(v, tensors) for k, v in obj[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that own their storage, as safetensors requires."""
    out, seen = {}, set()
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.numel() * t.element_size() != t.untyped_storage().nbytes():
            t = t.contiguous().clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t.contiguous()
    return out


def _write_tree(directory: Path, name: str, obj: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(obj, "", tensors)
    if tensors:
        save_file(_unshared(tensors), str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(encoded) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn any failure inside into a CheckpointError that names the file."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: {what}: {type(e).__name__}: {e}") from e


def _read_tree(ckpt: Path, name: str, files: dict[str, Any]) -> Any:
    tensors: dict[str, torch.Tensor] = {}
    if f"{name}.safetensors" in files:
        with _reading(ckpt / f"{name}.safetensors", "not a valid safetensors file"):
            tensors = load_file(ckpt / f"{name}.safetensors")
    jpath = ckpt / f"{name}.json"
    with _reading(jpath, "not a valid state file"):
        return _decode(json.loads(jpath.read_text(encoding="utf-8")), tensors)


# ----------------------------------------------------------------------------- checkpoints


def _parts(obj: Any, what: str) -> dict[str, Any]:
    """File stem -> object: a single object is `what` itself, a mapping {name: obj} gives `what-name` each."""
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        return {what: obj}
    bad = [name for name in obj if not isinstance(name, str) or not _PART_NAME.match(name)]
    if bad:
        raise ValueError(f"{what} names must match {_PART_NAME.pattern}, got {bad}")
    return {f"{what}-{name}": part for name, part in obj.items() if part is not None}


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: torch.nn.Module | Mapping[str, torch.nn.Module],
                    optimizer: Any = None, scheduler: Any = None, state: dict[str, Any] | None = None,
                    keep_last: int | None = 2, is_main: bool = True, accelerator: Any = None) -> Path:
    """Atomically write `run_dir/checkpoints/step-{step:08d}` and keep the newest `keep_last` (None: all).

    `model`, `optimizer` and `scheduler` are single objects or `{name: object}` mappings (several models).
    Only the main process writes. With `accelerator`, every rank must call this: rank states of the RNGs are
    gathered to rank 0 and all ranks wait until the checkpoint is in place.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    state = dict(state or {})
    if state.setdefault("step", step) != step:
        raise ValueError(f"state['step'] = {state['step']} but step = {step}")
    models = _parts(model, "model")
    if not models:
        raise ValueError("save_checkpoint needs a model")
    rngs = {"rng": runtime.capture_rng_state()}
    if accelerator is not None:
        is_main = accelerator.is_main_process
        models = {k: accelerator.unwrap_model(m) for k, m in models.items()}
        if accelerator.num_processes > 1:
            rngs = _gather_rng_states(accelerator)
    final = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    if is_main:
        trees = {**_parts(optimizer, "optimizer"), **_parts(scheduler, "scheduler")}
        _write_checkpoint(final, {k: _unwrap(m) for k, m in models.items()}, trees, state, rngs)
        _prune(final.parent, keep_last)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


def _write_checkpoint(final: Path, models: dict[str, torch.nn.Module], stateful: dict[str, Any],
                      state: dict[str, Any], rngs: dict[str, Any]) -> None:
    root = final.parent
    if not root.is_dir():
        root.mkdir(parents=True)
        fsync_dir(root.parent)
    _remove_stale_tmp(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        for stem, model in models.items():
            save_model(model, str(tmp / f"{stem}.safetensors"))
        _test_pause()
        for stem, obj in stateful.items():  # optimizers, then schedulers
            _write_tree(tmp, stem, obj.state_dict())
            if stem.startswith("optimizer"):
                _test_pause()
        for name, rng in rngs.items():
            _write_tree(tmp, name, rng)
        _write_tree(tmp, "trainer_state", state)
        _test_pause()
        files = {p.name: runtime.file_digest(p, sync=True) for p in sorted(tmp.iterdir())}
        manifest = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
                    "step": state["step"], "time": runtime.utc_now(), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        runtime.file_digest(tmp / MANIFEST, sync=True)
        fsync_dir(tmp)
        _test_pause()
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _test_pause()


def _test_pause() -> None:
    delay = os.environ.get(_SAVE_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) if isinstance(
            model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def _discard(path: Path) -> None:
    """Rename `path` to a `.tmp-*` name first, so a kill during deletion never leaves a half checkpoint."""
    doomed = path.parent / f".tmp-discard-{path.name}-{os.urandom(4).hex()}"
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_tmp(root: Path) -> None:
    for p in root.glob(".tmp-*"):
        logger.info("removing stale %s", p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _prune(root: Path, keep_last: int | None) -> None:
    if keep_last is None:
        return
    for _, path in _step_dirs(root)[:-keep_last]:
        _discard(path)


def latest_checkpoint(run_dir: str | os.PathLike, *, cleanup: bool = True) -> Path | None:
    """The newest `step-*` checkpoint of `run_dir` (None if there is none); removes stale `.tmp-*` dirs.

    Raises CheckpointError when the newest one has no manifest: our saves never produce that, so it is
    damage, and falling back silently to an older one would hide it.
    """
    root = Path(run_dir) / "checkpoints"
    if cleanup and root.is_dir():
        _remove_stale_tmp(root)
    dirs = _step_dirs(root)
    if not dirs:
        return None
    newest = dirs[-1][1]
    if not (newest / MANIFEST).is_file():
        raise CheckpointError(f"{newest / MANIFEST}: missing manifest, the checkpoint is incomplete or damaged "
                              "(delete the directory to resume from an older one)")
    return newest


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check the manifest, the file names, sizes and sha256 sums; return the manifest or raise CheckpointError."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing manifest, the checkpoint is incomplete or damaged")
    with _reading(mpath, "not a valid manifest"):
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest["format"] != CHECKPOINT_FORMAT or manifest["format_version"] != CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(f"{mpath}: unknown format {manifest['format']!r} v{manifest['format_version']}")
        expected = {name: (int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()}
    for name in sorted(set(expected) | {p.name for p in path.iterdir()} - {MANIFEST}):
        if not _CKPT_FILE.match(name) or name not in expected:
            raise CheckpointError(f"{path / name}: unexpected file in checkpoint (only our safetensors and "
                                  "JSON files are allowed; nothing is unpickled)")
        if not (path / name).is_file() or (path / name).is_symlink():
            raise CheckpointError(f"{path / name}: missing (listed in {MANIFEST})")
        actual = runtime.file_digest(path / name)
        if actual["size"] != expected[name][0]:
            raise CheckpointError(f"{path / name}: size {actual['size']} != {expected[name][0]} in {MANIFEST} "
                                  "(truncated or corrupt)")
        if actual["sha256"] != expected[name][1]:
            raise CheckpointError(f"{path / name}: sha256 mismatch with {MANIFEST} (corrupt)")
    if not any(name.startswith("model") for name in expected) or "trainer_state.json" not in expected:
        raise CheckpointError(f"{mpath}: lists no model safetensors file or no trainer_state.json")
    return manifest


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module | Mapping[str, torch.nn.Module],
                    optimizer: Any = None, scheduler: Any = None, restore_rng: bool = True,
                    accelerator: Any = None) -> dict[str, Any]:
    """Verify and load a checkpoint into `model` (strict), `optimizer`, `scheduler` and the RNGs.

    Each of `model`, `optimizer`, `scheduler` is a single object or the `{name: object}` mapping it was saved
    with. Returns the trainer state (with "step"). Any problem raises CheckpointError naming the file; an
    optimizer or scheduler asked for but absent is an error too, never a silent fresh start (RELIABILITY T2b).
    """
    path = Path(path)
    files = verify_checkpoint(path)["files"]
    models = _parts(model, "model")
    wanted = {**_parts(optimizer, "optimizer"), **_parts(scheduler, "scheduler")}
    for stem in models:
        if f"{stem}.safetensors" not in files:
            raise CheckpointError(f"{path / (stem + '.safetensors')}: missing, but a model was given to restore")
    trees = {}
    for name in wanted:
        if f"{name}.json" not in files:
            raise CheckpointError(f"{path / (name + '.json')}: missing, but a {name.split('-')[0]} was given to restore")
        trees[name] = _read_tree(path, name, files)
    rng_name = _rng_name(accelerator.process_index if accelerator is not None else 0)
    if restore_rng:
        if f"{rng_name}.json" not in files:
            logger.warning("%s has no %s.json (different world size?): restoring rank 0's RNG", path, rng_name)
            rng_name = "rng"
        rng_tree = _read_tree(path, rng_name, files)
    state = _read_tree(path, "trainer_state", files)
    for stem, target in models.items():
        if accelerator is not None:
            target = accelerator.unwrap_model(target)
        _load_model(_unwrap(target), path / f"{stem}.safetensors")
    for name, target in wanted.items():
        with _reading(path / f"{name}.json", f"does not fit the {name.split('-')[0]}"):
            target.load_state_dict(trees[name])
    if restore_rng:
        with _reading(path / f"{rng_name}.json", "not a valid RNG state"):
            runtime.restore_rng_state(rng_tree)
    return state


def _load_model(model: torch.nn.Module, path: Path) -> None:
    """Strict load; names, shapes and dtypes are checked before any parameter is touched."""
    with _reading(path, "not a valid safetensors file"):
        loaded = load_file(path)
    target = model.state_dict()
    problems = [f"{k}: {t.dtype}{list(t.shape)} in file, {target[k].dtype}{list(target[k].shape)} in model"
                for k, t in loaded.items() if k in target and (t.dtype, t.shape) != (target[k].dtype, target[k].shape)]
    problems += [f"unexpected key {k}" for k in sorted(set(loaded) - set(target))]
    # Tied weights are stored once (save_model): a missing name is fine if it shares memory with a loaded one.
    loaded_ptrs = {(target[k].device, target[k].data_ptr()) for k in loaded if k in target}
    problems += [f"missing key {k}" for k in sorted(set(target) - set(loaded))
                 if target[k].numel() == 0 or (target[k].device, target[k].data_ptr()) not in loaded_ptrs]
    if problems:
        raise CheckpointError(f"{path}: does not fit {type(model).__name__}: " + "; ".join(problems[:10]))
    with _reading(path, "does not fit the model"):
        model.load_state_dict(loaded, strict=False)


def _rng_name(rank: int) -> str:
    return "rng" if rank == 0 else f"rng-rank{rank}"


def _gather_rng_states(accelerator: Any) -> dict[str, Any]:
    """Every rank's `runtime.capture_rng_state()` on every rank, sent as padded uint8 tensors of JSON (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(runtime.capture_rng_state(), "", tensors)
    if any(t.dtype != torch.uint8 for t in tensors.values()):
        raise TypeError("RNG states are expected to be uint8 tensors")
    doc = {"tree": tree, "tensors": {k: base64.b64encode(t.numpy().tobytes()).decode() for k, t in tensors.items()}}
    payload = torch.frombuffer(bytearray(json.dumps(doc).encode()), dtype=torch.uint8)
    sizes = accelerator.gather(torch.tensor([payload.numel()], device=accelerator.device)).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[: payload.numel()] = payload
    gathered = accelerator.gather(padded.to(accelerator.device)).view(len(sizes), -1).cpu()
    out = {}
    for rank, size in enumerate(sizes):
        doc = json.loads(gathered[rank, :size].numpy().tobytes())
        rank_tensors = {k: torch.frombuffer(bytearray(base64.b64decode(v)), dtype=torch.uint8)
                        for k, v in doc["tensors"].items()}
        out[_rng_name(rank)] = _decode(doc["tree"], rank_tensors)
    return out




def resume(run_dir: str | os.PathLike, mode: str, *, model: torch.nn.Module | Mapping[str, torch.nn.Module],
           optimizer: Any = None, scheduler: Any = None) -> dict[str, Any] | None:
    """Apply `run.resume`: "auto" loads the newest complete checkpoint if there is one, "must" fails
    without one, "never" starts fresh. Returns the trainer state, or None for a fresh start. A damaged
    newest checkpoint is a CheckpointError in every mode but "never", never a silent fresh start."""
    ckpt = None if mode == "never" else latest_checkpoint(run_dir)
    if mode == "must" and ckpt is None:
        raise CheckpointError(f"{run_dir}: run.resume=must but no complete checkpoint exists")
    if ckpt is None:
        return None
    state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
    logger.info("resumed from %s at step %d", ckpt, state["step"])
    return state
