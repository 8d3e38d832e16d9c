"""The same model and options give the same plan in separate processes (DESIGN.md: "deterministic: the same
model and options give byte-identical plans in any process"), whatever PYTHONHASHSEED is: set and dict
iteration order must not reach variable creation order or tie breaking.

Each case plans in two subprocesses with different hash seeds and compares
``autopar.runtime.faults.plan_digest``. The cases are ones whose ILP is solved to proven optimality well
inside its time limit: a plan found at the time limit depends on the machine's speed, not on the model
(see the note at the end of this file)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow   # plans in several subprocesses (about a minute)

SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
import torch
import autopar
from autopar.runtime.faults import plan_digest

case = {case!r}
torch.manual_seed(0)
if case.startswith("gpt-tiny"):
    from autopar.models import build_model
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="meta")
    mesh, names = (2, 2), ("dp", "tp")
else:
    from zoo.models import build
    model, inputs = build("llama", "kwargs")
    mesh, names = (2, 2), ("dp", "tp")
kw = dict(mesh_shape=mesh, mesh_dim_names=names, cluster="cpu-gloo")
if case.endswith("budget"):
    free = autopar.plan(model, inputs, **kw)
    kw["memory_budget"] = int((0.4 if case.startswith("llama") else 0.6) * free.predicted.peak_memory_bytes)
if case.startswith("llama") and case.endswith("budget"):
    kw["time_limit"] = 30   # stage one proves its plan (~5 s on 2 idle cores); nothing below it comes in 30 s
p = autopar.plan(model, inputs, **kw)
print("RESULT " + json.dumps({{"digest": plan_digest(p), "optimal": p.solver.optimal,
                              "objective": p.solver.objective}}))
"""


def _plan_in_subprocess(case: str, seed: int) -> dict:
    env = dict(os.environ, PYTHONHASHSEED=str(seed))
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(TESTS), case=case)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("case", ["gpt-tiny", "gpt-tiny-budget", "llama-kwargs", "llama-kwargs-budget"])
def test_same_plan_across_hash_seeds(case):
    a = _plan_in_subprocess(case, 0)
    b = _plan_in_subprocess(case, 12345)
    if case != "llama-kwargs-budget":   # that one stops at its time limit: stage one's plan (solver.ilp)
        assert a["optimal"] and b["optimal"], (a, b)
    assert a["objective"] == pytest.approx(b["objective"], rel=1e-9)
    assert a["digest"] == b["digest"], f"{case}: different plans under PYTHONHASHSEED 0 and 12345"


# The llama zoo model (kwargs) on (2, 2) at 0.4 of its unconstrained peak does not reach proven optimality
# within its time limit on 2 cores; before the staged solve (solver.ilp: no recompute first, then the full
# model below that plan) the incumbent HiGHS held at the limit depended on how far it got, so two processes
# could differ. Now the plan at the limit is stage one's, unless the full model finds a faster one, which
# it did not within 60 s on 2 cores; where it does on a faster machine, that plan depends on the timing.
