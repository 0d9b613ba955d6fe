"""Checkpoint safety: kills inside save (T2), integrity errors (T2b), planted pickles (T6), header fuzz (T6e)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from alignloop.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from alignloop.runtime import capture_rng_state, restore_rng_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_global_rng():
    saved = capture_rng_state()
    yield
    restore_rng_state(saved)


def _make() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    return model, opt, sched


def _checkpoint(run_dir: Path, steps: int = 2) -> Path:
    model, opt, sched = _make()
    for _ in range(steps):
        model(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return save_checkpoint(run_dir, steps, model=model, optimizer=opt, scheduler=sched, state={"epoch": 0})


def _load(ckpt: Path, restore_rng: bool = False) -> dict:
    model, opt, sched = _make()
    return load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, restore_rng=restore_rng)


def _forge_manifest(ckpt: Path, extra: tuple[str, ...] = ()) -> None:
    """Recompute sizes and hashes as an attacker (or a buggy tool) would, so the parsers face the bytes."""
    import hashlib

    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in [*manifest["files"], *extra]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- T2: SIGKILL inside save_checkpoint

# A zygote imports torch once and forks a training child per command, so each kill costs milliseconds
# instead of a 1.5 s interpreter start. It runs no torch op itself, which keeps fork safe.
_ZYGOTE = r"""
import os, sys, traceback
import torch
from torch import nn
from alignloop.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignloop.runtime import seed_everything


def train(run_dir, total):
    seed_everything(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
    start = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        start = load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)["step"]
    for step in range(start + 1, total + 1):
        loss = model(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched,
                        state={"loss": loss.item()}, keep_last=2)


# Pay one-time lazy imports (AdamW pulls in torch._dynamo, about 1 s) here, not in every child.
seed_everything(0)
torch.optim.AdamW([nn.Parameter(torch.zeros(1))])

for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "fork":
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.environ["ALIGNLOOP_TEST_SAVE_DELAY"] = cmd[3]
                torch.set_num_threads(1)
                train(cmd[1], int(cmd[2]))
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        sys.stdout.write(f"{pid}\n")
    elif cmd[0] == "wait":
        _, status = os.waitpid(int(cmd[1]), 0)
        sys.stdout.write(f"{status}\n")
    sys.stdout.flush()
"""


class _Zygote:
    def __init__(self, tmp: Path) -> None:
        script = tmp / "zygote.py"
        script.write_text(_ZYGOTE)
        self.stderr = open(tmp / "zygote.err", "w+")
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env)

    def ask(self, line: str, timeout: float = 60.0) -> int:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"zygote did not answer {line!r}: {self._err()}"
        answer = self.proc.stdout.readline()
        assert answer.strip(), f"zygote died: {self._err()}"
        return int(answer)

    def run(self, run_dir: Path, total: int, delay: float = 0.0) -> int:
        """Run a training child to the end; return its wait status."""
        return self.ask(f"wait {self.ask(f'fork {run_dir} {total} {delay}')}")

    def run_and_kill(self, run_dir: Path, delay: float, saves: int, after: float) -> int:
        """Run a training child and SIGKILL it `after` seconds into its `saves`-th save_checkpoint.

        Saves are seen as new `.tmp-step-*` directories, so the kill lands inside a save however slow fsync
        is on this disk; `after` spreads the kills over the phases of the save (the test hook sleeps `delay`
        between them).
        """
        pid, root, seen = self.ask(f"fork {run_dir} {10**9} {delay}"), run_dir / "checkpoints", set()
        deadline = time.monotonic() + 60
        while len(seen) < saves:
            assert time.monotonic() < deadline, f"no save_checkpoint seen: {self._err()}"
            with contextlib.suppress(FileNotFoundError):
                seen |= {e.name for e in os.scandir(root) if e.name.startswith(".tmp-step-")}
            time.sleep(0.0005)
        time.sleep(after)
        os.kill(pid, signal.SIGKILL)
        return self.ask(f"wait {pid}")

    def _err(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.stderr.close()


def test_T2_sigkill_inside_save_checkpoint(tmp_path):
    """Up to 50 kills (at least 20, within about 30 s) inside save_checkpoint, then resume to the end."""
    delay, budget_s = 0.004, 30.0
    zygote = _Zygote(tmp_path)
    try:
        run_dir, root = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
        rng, kills, inside_save, last_step, started = random.Random(0), 0, 0, 0, time.monotonic()
        while kills < 50 and (kills < 20 or time.monotonic() - started < budget_s):
            status = zygote.run_and_kill(run_dir, delay, saves=rng.randint(1, 3), after=rng.uniform(0, 6 * delay))
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, zygote._err()
            kills += 1
            inside_save += bool(list(root.glob(".tmp-*")))
            ckpt = latest_checkpoint(run_dir)  # never an incomplete one; stale .tmp-* removed
            assert not list(root.glob(".tmp-*"))
            if ckpt is None:
                continue
            state = _load(ckpt)  # verifies every hash and loads model, optimizer and scheduler
            assert state["step"] == int(ckpt.name.split("-")[1]) >= last_step
            last_step = state["step"]
        assert inside_save >= kills // 2, f"only {inside_save}/{kills} kills left a partial save behind"
        assert last_step > 0

        total = last_step + 3  # resume to the end without a kill, and the same steps uninterrupted
        assert zygote.run(run_dir, total) == 0, zygote._err()
        baseline = tmp_path / "baseline"
        assert zygote.run(baseline, total) == 0, zygote._err()
    finally:
        zygote.close()
    assert not list(root.glob(".tmp-*"))
    final, expected = latest_checkpoint(run_dir), latest_checkpoint(baseline)
    assert final.name == expected.name == f"step-{total:08d}"
    # Model, optimizer, scheduler, RNG and the last loss are byte-identical to the uninterrupted run.
    assert verify_checkpoint(final)["files"] == verify_checkpoint(expected)["files"]


# ----------------------------------------------------------------------------- T2b: integrity errors


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda c: (c / "optimizer.safetensors").unlink(), r"optimizer\.safetensors: missing"),
        (lambda c: (c / "scheduler.json").unlink(), r"scheduler\.json: missing"),
        (lambda c: _flip_byte(c / "model.safetensors", -5), r"model\.safetensors: sha256 mismatch"),
        (lambda c: _flip_byte(c / "rng.json", 40), r"rng\.json: sha256 mismatch"),
        (lambda c: _truncate(c / "optimizer.safetensors", 0.5), r"optimizer\.safetensors: size \d+ != \d+"),
        (lambda c: _truncate(c / "trainer_state.json", 0.0), r"trainer_state\.json: size 0 != \d+"),
        (lambda c: (c / "manifest.json").unlink(), r"manifest\.json: missing manifest"),
        (lambda c: (c / "manifest.json").write_text('{"files": '), r"manifest\.json: not a valid manifest"),
        (lambda c: (c / "notes.txt").write_text("hi"), r"notes\.txt: unexpected file"),
    ],
    ids=["missing-opt", "missing-sched", "flipped-model", "flipped-rng", "truncated-opt", "empty-state",
         "no-manifest", "torn-manifest", "extra-file"],
)
def test_T2b_damaged_checkpoint_raises_named_error(tmp_path, damage, match):
    ckpt = _checkpoint(tmp_path)
    model, opt, sched = _make()
    before = [p.detach().clone() for p in model.parameters()]
    damage(ckpt)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    # verification happens before anything is loaded: never a half-restored or silently fresh state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not opt.state


def test_T2b_newest_without_manifest_is_an_error_not_a_fallback(tmp_path):
    _checkpoint(tmp_path, steps=1)
    newest = _checkpoint(tmp_path, steps=2)
    (newest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000002/manifest\.json: missing manifest"):
        latest_checkpoint(tmp_path)


def _flip_byte(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# ----------------------------------------------------------------------------- T6: planted pickles


class _Sentinel:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _payload(sentinel: Path) -> bytes:
    data = pickle.dumps(_Sentinel(sentinel))
    pickle.loads(data).close()  # positive control: this payload really runs code
    assert sentinel.exists()
    sentinel.unlink()
    return data


@pytest.mark.parametrize("plant", ["model.pt", "optimizer.safetensors", "optimizer.safetensors+manifest",
                                   "model.safetensors+manifest", "model.pt+manifest", "torch.save+manifest"])
def test_T6_planted_pickle_is_refused(tmp_path, plant):
    ckpt = _checkpoint(tmp_path)
    sentinel = tmp_path / "pwned"
    payload = _payload(sentinel)
    name, _, forge = plant.partition("+")
    if name == "torch.save":  # a real torch zip checkpoint under our file name
        name = "model.safetensors"
        torch.save({"x": _Sentinel(sentinel)}, ckpt / name)
    else:
        (ckpt / name).write_bytes(payload)
    if forge:
        _forge_manifest(ckpt, extra=(name,) if name == "model.pt" else ())
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        _load(ckpt, restore_rng=True)
    assert not sentinel.exists(), "a pickle was executed"


def test_T6_checkpoint_holds_only_safetensors_and_json(tmp_path):
    ckpt = _checkpoint(tmp_path)
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}
    for path in ckpt.glob("*.safetensors"):
        header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
        json.loads(path.read_bytes()[8: 8 + header_len])  # a plain safetensors header, no pickle opcodes


# ----------------------------------------------------------------------------- T6e: header fuzz


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption, aimed mostly at the safetensors header (first 8 + header-length bytes)."""
    b = bytearray(data)
    header_end = min(len(b), 8 + struct.unpack("<Q", data[:8])[0]) if len(data) >= 8 else len(b)
    kind = rng.randrange(8)
    if kind == 0:
        i = rng.randrange(header_end)
        b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(header_end)] = rng.randrange(256)
    elif kind == 2:
        del b[rng.randrange(len(b)):]
    elif kind == 3:
        value = rng.choice([0, 1, 7, header_end - 9, header_end - 7, len(b), 2**31, 2**63 + 5, rng.getrandbits(64)])
        b[:8] = struct.pack("<Q", value % 2**64)
    elif kind == 4:
        text = bytes(b[8:header_end])
        swaps = [(b'"F32"', rng.choice([b'"F64"', b'"BF16"', b'"I64"', b'"U8"', b'"XX"', b'""'])),
                 (b'"U8"', b'"F32"'), (b"[", b"[9999999,"), (b"0,", b"1,"), (b'"dtype"', b'"dtyp"'),
                 (b'"shape":[', b'"shape":[-1,'), (b'"data_offsets":[', b'"data_offsets":[1000000000,')]
        old, new = rng.choice(swaps)
        if old in text:
            start = [i for i in range(len(text)) if text.startswith(old, i)]
            i = rng.choice(start)
            text = text[:i] + new + text[i + len(old):]
            b = bytearray(struct.pack("<Q", len(text))) + text + b[header_end:]
    elif kind == 5:
        i = rng.randrange(header_end)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 6:
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def test_T6e_header_fuzz_gives_only_checkpoint_errors(tmp_path):
    ckpt = _checkpoint(tmp_path)
    targets = ["model.safetensors"] * 4 + ["optimizer.safetensors"] * 3 + ["rng.safetensors"] * 2 + [
        "optimizer.json", "scheduler.json", "rng.json", "trainer_state.json", "manifest.json"]
    originals = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    model, opt, sched = _make()
    rng, outcomes, started = random.Random(1234), {"error": 0, "loaded": 0}, time.monotonic()
    for i in range(1000):
        name = rng.choice(targets)
        (ckpt / name).write_bytes(_mutate(originals[name], rng))
        if name != "manifest.json" and rng.random() < 0.9:
            _forge_manifest(ckpt)  # so most mutations reach the parsers, not just the hash check
        try:
            load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
            outcomes["loaded"] += 1  # a mutation the formats cannot detect (e.g. in tensor data)
        except CheckpointError as e:
            outcomes["error"] += 1
            assert str(ckpt) in str(e), f"iteration {i}: error does not name the file: {e}"
        # any other exception type fails the test right here
        for n in {name, "manifest.json"}:
            (ckpt / n).write_bytes(originals[n])
    assert time.monotonic() - started < 60
    assert outcomes["error"] > 800, outcomes
    _load(ckpt)  # the restored original still loads

