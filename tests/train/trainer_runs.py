"""Running trainers as real processes (for SIGKILL, torchrun and CLI tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def run_subprocess(
    args: list[str], env_extra: dict[str, str] | None = None, nproc: int = 1, cmd: str = "sft"
) -> subprocess.CompletedProcess:
    """Run `alignloop <cmd> ARGS` (under torchrun when nproc > 1) and return the finished process."""
    env = {**os.environ, **(env_extra or {})}
    if nproc == 1:
        command = [sys.executable, "-m", "alignloop.cli", cmd, *args]
    else:
        env["OMP_NUM_THREADS"] = "1"  # one thread per rank on a 2-core machine
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "alignloop.cli", cmd, *args]
    # A new session, so that on a timeout the launcher and every worker it started are killed together.
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out: {' '.join(command)}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)
