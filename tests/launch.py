"""Run a command line (a launcher such as torchrun, or ``python -m autopar.tools.demo``) as a test subprocess.

``run_command`` never hangs: on its timeout it kills the command's whole process group (the
command and every worker it started) and fails the test with what the command had printed.
Children get a private ``TMPDIR`` (torchrun leaves ``torchelastic_*`` behind) and
``OMP_NUM_THREADS=1`` (several ranks share 2 cores).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def torchrun() -> list[str]:
    """torchrun of this interpreter, or ``python -m torch.distributed.run`` where there is none."""
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def run_command(cmd: list[str], *, tmpdir: Path, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a timeout kills the workers too
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout:.0f}s; killed.\n"
                    f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def describe(res: subprocess.CompletedProcess) -> str:
    """A failure message: the command, its exit code and the tail of its output."""
    return (f"{' '.join(res.args)} exited {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n"
            f"--- stderr\n{res.stderr[-4000:]}")
