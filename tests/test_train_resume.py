"""``autopar train`` killed with SIGKILL mid-run and started again with the same command resumes from its newest
checkpoint (model, optimizer, RNG, data position) and ends with the losses of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch import REPO, describe, run_command, torchrun

JOB = """
[model]
source = "llama-tiny"
[data]
seq_len = 64
num_sequences = 256
[training]
steps = 40
global_batch = 16
grad_accum = 2
[optimizer]
lr = 2e-3
[schedule]
warmup_steps = 3
[checkpoint]
dir = "ck"
interval = 3
keep_last = 2
[logging]
progress = false
"""


def _cmd(job, ranks: int, async_save: bool = False) -> list[str]:
    cli = ["-m", "autopar.tools.cli", "train", "--config", str(job)]
    if async_save:
        cli += ["--set", "checkpoint.async_save=true"]
    if ranks == 1:
        return [sys.executable, *cli]
    return [*torchrun(), "--standalone", "--nproc-per-node", str(ranks), *cli, "--set", f"parallel.mesh=[{ranks}]"]


def _descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (torchrun starts its workers in sessions of their own, so
    killing its process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL the launched command and every process under it, all at once (a crash of the whole job)."""
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _losses(ck) -> dict[int, float]:
    recs = [json.loads(x) for x in (ck / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"one record per step: {steps}"
    return {r["step"]: r["loss"] for r in recs}


@pytest.mark.slow
@pytest.mark.parametrize("ranks, async_save", [(1, False), (2, False), (2, True)],
                         ids=["one-process", "torchrun-2-gloo", "torchrun-2-gloo-async-save"])
def test_sigkill_then_same_command_resumes_identically(tmp_path, ranks, async_save):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    for d in (ref_dir, run_dir):
        d.mkdir()
        (d / "job.toml").write_text(JOB)
    res = run_command(_cmd(ref_dir / "job.toml", ranks, async_save), tmpdir=tmp_path, timeout=300)
    assert res.returncode == 0, describe(res)
    ref = _losses(ref_dir / "ck")
    assert sorted(ref) == list(range(1, 41))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(_cmd(run_dir / "job.toml", ranks, async_save), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    metrics = run_dir / "ck" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if len(lines) >= 10 and (run_dir / "ck" / "latest").is_file():
            _kill_tree(proc.pid)
            killed_at = len(lines)
            break
        time.sleep(0.005)
    proc.communicate(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run was killed mid-way"
    assert killed_at < 40
    saved = (run_dir / "ck" / "latest").read_text()
    res = run_command(_cmd(run_dir / "job.toml", ranks, async_save), tmpdir=tmp_path, timeout=300)
    assert res.returncode == 0, describe(res)
    resumed_from = int(saved.removeprefix("step_"))
    assert resumed_from < 40 and f"trained steps {resumed_from + 1}..40 of 40" in res.stderr, describe(res)
    got = _losses(run_dir / "ck")
    assert got == ref, "the killed-and-resumed run has the uninterrupted run's losses, bit for bit"
