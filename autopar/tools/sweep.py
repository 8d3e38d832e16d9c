"""The time-memory trade-off of one model: plans solved at a series of memory budgets (``autopar plan
--sweep-memory``).

From the plan at the top budget (the device capacity or ``--memory``; with memory to spare, the
fastest plan) down to the smallest feasible budget (which InfeasiblePlanError names), ``points``
budgets evenly spaced in between are solved on one capture. Every point records the budget, the
predicted step time and peak, and the memory decisions (recompute, offload, optimizer on host). The
Pareto frontier is the points that no other point beats on both time and peak. ``plot`` writes it as
a PNG with matplotlib (the optional ``plot`` extra). Front end: calls the solver, imports no codegen.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autopar.cluster.profile import ClusterProfile
from autopar.core.capture import CapturedModel
from autopar.core.errors import ConfigError, InfeasiblePlanError
from autopar.core.mesh import MeshSpec
from autopar.core.options import PlanOptions
from autopar.core.plan import Plan
from autopar.frontend.planning import solve_captured
from autopar.tools.report import _table, fmt_bytes, fmt_time, memory_decisions


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    budget_bytes: int
    step_time_s: float
    peak_bytes: int
    decisions: str          # report.memory_decisions: "recompute full blocks.0..3; optimizer on host" or "none"
    time_breakdown: dict[str, float]   # the plan's compute_s / comm_s / recompute_s / offload_s / bubble_s
    on_frontier: bool = False


def sweep_memory(cap: CapturedModel, mesh: MeshSpec, profile: ClusterProfile, *, top_budget: int, points: int = 6,
                 progress: Callable[[str], None] | None = None, options: PlanOptions | None = None
                 ) -> list[SweepPoint]:
    """Plans of ``cap`` at ``points`` budgets from ``top_budget`` down to the smallest feasible one (budget
    descending), each solved as ``autopar.plan`` solves a captured model under ``options`` (their
    ``memory_budget`` is replaced by each point's; pipeline stages are not swept)."""
    options = options or PlanOptions()
    if options.pipeline not in (None, False):
        raise ConfigError("a memory sweep plans without pipeline stages; pass pipeline=False (CLI: --no-pipeline)")
    if not isinstance(points, int) or points < 2:
        raise ConfigError(f"a memory sweep needs at least 2 points (the top budget and the smallest feasible one), "
                          f"got {points!r}")

    def solve(budget: int) -> Plan:
        if progress:
            progress(f"budget {fmt_bytes(budget)}")
        return solve_captured(cap, mesh, profile, options, budget=budget)

    top = solve(top_budget)   # an infeasible top budget raises here, naming the smallest feasible one
    try:
        floor = solve(1).predicted.peak_memory_bytes   # only a model that holds no bytes fits one byte
    except InfeasiblePlanError as e:
        floor = int(e.min_feasible_bytes * 1.001) + 1   # just above it: the rows are solved in MiB
    floor = min(floor, top.predicted.peak_memory_bytes)
    upper = min(top_budget, top.predicted.peak_memory_bytes)
    budgets = [int(upper - (upper - floor) * i / (points - 1)) for i in range(1, points)]
    plans = [(top_budget, top)] + [(b, solve(b)) for b in budgets]
    out = [SweepPoint(budget_bytes=b, step_time_s=p.predicted.step_time_s, peak_bytes=p.predicted.peak_memory_bytes,
                      decisions=memory_decisions(p), time_breakdown=dict(p.predicted.time_breakdown))
           for b, p in plans]
    return pareto(out)


def pareto(points: list[SweepPoint], rel: float = 1e-6) -> list[SweepPoint]:
    """Mark the points no other point beats on both step time and peak. Times within ``rel`` of each
    other count as equal (the solver's tolerance); of equal points the first counts."""
    def le(a: float, b: float) -> bool:
        return a <= b * (1 + rel)

    def lt(a: float, b: float) -> bool:
        return a < b * (1 - rel)

    marked = []
    for i, p in enumerate(points):
        beaten = any(le(q.step_time_s, p.step_time_s) and q.peak_bytes <= p.peak_bytes and
                     (lt(q.step_time_s, p.step_time_s) or q.peak_bytes < p.peak_bytes or j < i)
                     for j, q in enumerate(points) if j != i)
        marked.append(dataclasses.replace(p, on_frontier=not beaten))
    return marked


def render_sweep(points: list[SweepPoint]) -> str:
    """The sweep as a table (budget descending); ``*`` marks the Pareto frontier."""

    rows = [[fmt_bytes(p.budget_bytes), fmt_time(p.step_time_s), fmt_bytes(p.peak_bytes),
             fmt_time(p.time_breakdown.get("comm_s", 0.0)), fmt_time(p.time_breakdown.get("recompute_s", 0.0)),
             fmt_time(p.time_breakdown.get("offload_s", 0.0)), "*" if p.on_frontier else ""] for p in points]
    table = _table(["budget", "step time", "peak", "comm", "recompute", "offload", "pareto"], rows).splitlines()
    lines = [table[0] + "  memory decisions", table[1] + "  " + "-" * 16]
    return "\n".join(lines + [f"{row}  {p.decisions}" for row, p in zip(table[2:], points)])


def plot(points: list[SweepPoint], path: str | Path, title: str = "") -> Path:
    """The frontier as a PNG: predicted peak memory per device (x) against predicted step time (y)."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--sweep-out needs matplotlib: pip install 'autopar[plot]' (or matplotlib>=3.7)") from None
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--sweep-out writes a PNG; give a path ending in .png, got {str(path)!r}")
    gib = 1 << 30
    unit, scale = ("GiB", gib) if max(p.peak_bytes for p in points) >= gib else ("MiB", 1 << 20)
    front = sorted((p for p in points if p.on_frontier), key=lambda p: p.peak_bytes)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.plot([p.peak_bytes / scale for p in points], [p.step_time_s * 1e3 for p in points], "o", color="0.7",
            label="solved budgets")
    ax.step([p.peak_bytes / scale for p in front], [p.step_time_s * 1e3 for p in front], "o-", where="post",
            color="tab:blue", label="Pareto frontier")
    for k, p in enumerate(front):
        if k + 1 < len(front) and front[k + 1].decisions == p.decisions:
            continue   # one label per run of equal decisions (the largest peak of the run)
        ax.annotate(p.decisions if p.decisions != "none" else "no memory decisions",
                    (p.peak_bytes / scale, p.step_time_s * 1e3), fontsize=6, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel(f"predicted peak memory per device ({unit})")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(title or "time-memory trade-off")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
