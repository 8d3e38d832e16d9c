"""The one place a solver runs: which backend, its time limit, the fallback to CBC, how a result is read.

Policy: ``backend="auto"`` takes HiGHS (highspy) when it is installed, else CBC; ``"highs"`` without
highspy is a ShardingError; every run has a time limit (CBC's in whole seconds, at least 1). A caller
that can tell a wrong HiGHS answer (``distrust``: it returns the reason, or None) gets the problem solved
again with CBC. Reading a result: ``has_plan`` is PuLP's status "Optimal" (a feasible solution is
loaded), ``optimal`` its ``sol_status`` (CBC reports status "Optimal" after its time limit with an
incumbent; only sol_status says whether that incumbent was proved optimal), ``timed_out`` status
"Not Solved" (the time limit ran out before any solution). Imports autopar's core only.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import pulp

from autopar.core.errors import ShardingError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SolveResult:
    backend: str          # "highs" or "cbc": the backend that gave this result
    status: str           # PuLP's status string ("Optimal", "Infeasible", "Not Solved", ...)
    has_plan: bool        # a feasible solution is loaded into the problem's variables
    optimal: bool         # ... and proved optimal (sol_status), not an incumbent at the time limit
    timed_out: bool       # the time limit ran out before any solution
    seconds: float        # wall time of every run, fallback included


def make_solver(backend: str, time_limit: float, cutoff: float | None = None):
    """(PuLP solver, its name) for ``backend`` ("auto", "highs" or "cbc"). ``cutoff`` (HiGHS only: its
    ``objective_bound``): only solutions below it count; none is "Infeasible"."""
    if backend in ("auto", "highs"):
        opts = {} if cutoff is None else {"objective_bound": float(cutoff)}
        s = pulp.HiGHS(msg=False, timeLimit=time_limit, **opts)
        if s.available():
            return s, "highs"
        if backend == "highs":
            raise ShardingError("backend 'highs' needs highspy: pip install highspy (or use backend='cbc')")
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(time_limit))), "cbc"


def cutoff_supported(backend: str) -> bool:
    """Whether ``backend`` ("auto", "highs", "cbc") runs with a ``cutoff`` (HiGHS, when installed)."""
    return backend in ("auto", "highs") and pulp.HiGHS(msg=False).available()


def solve_problem(prob: pulp.LpProblem, *, backend: str = "auto", time_limit: float = 60.0,
                  distrust: Callable[[SolveResult], str | None] | None = None,
                  cutoff: float | None = None) -> SolveResult:
    """Solve ``prob`` under the module's policy. ``distrust(result)`` (after a HiGHS run): the reason to
    solve again with CBC, or None to keep the result. ``cutoff``: see make_solver (needs
    cutoff_supported; an "Infeasible" answer then means no solution below it)."""
    t0 = time.perf_counter()
    if cutoff is not None and not cutoff_supported(backend):
        raise ShardingError(f"a cutoff needs HiGHS (backend {backend!r})")
    solver, name = make_solver(backend, time_limit) if cutoff is None else make_solver(backend, time_limit, cutoff)
    result = _run(prob, solver, name, t0)
    if name == "highs" and distrust is not None:
        reason = distrust(result)
        if reason:
            log.warning("%s; solving with CBC", reason)
            solver, name = make_solver("cbc", time_limit)
            result = _run(prob, solver, name, t0)
    return result


def _run(prob: pulp.LpProblem, solver, name: str, t0: float) -> SolveResult:
    with _native_stdout_to_stderr():
        prob.solve(solver)
    return SolveResult(backend=name, status=pulp.LpStatus[prob.status], has_plan=prob.status == pulp.LpStatusOptimal,
                       optimal=getattr(prob, "sol_status", pulp.LpSolutionOptimal) == pulp.LpSolutionOptimal,
                       timed_out=prob.status == pulp.LpStatusNotSolved, seconds=time.perf_counter() - t0)


@contextlib.contextmanager
def _native_stdout_to_stderr():
    """HiGHS prints a banner from C++ on file descriptor 1 however msg is set: keep stdout for results (the
    banner goes to stderr, beside the progress lines)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable fd 1 (embedded interpreters): leave it
        yield
        return
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
