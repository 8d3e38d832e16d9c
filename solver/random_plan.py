"""Seedable random feasible plans, for fuzzing codegen and the runtime against one device.

``random_plan(cap, mesh, profile, seed)`` draws one strategy uniformly per graph key (from the
strategies the planner itself would consider, so every choice divides evenly) and pins all of them
through ``plan_graph(..., force=...)``: the ILP then only places the reshards between the drawn
strategies, and the plan is written exactly as a solved one (same JSON, same ``apply``). The same
(capture, mesh, seed) always gives the same plan. Memory decisions (recompute, offload, ZeRO) are
not drawn: the planner has none yet.

This module imports autopar's core and the solver only; it never runs a plan.
"""
from __future__ import annotations

import random

from autopar.capture import CapturedModel
from autopar.graph import index_graph
from autopar.mesh import MeshSpec
from autopar.plan import Plan
from autopar.profile import ClusterProfile
from autopar.solver import ilp
from autopar.solver.planner import plan_graph
from autopar.solver.strategies import Strategy

__all__ = ["draw_strategies", "random_plan"]


def draw_strategies(cap: CapturedModel, mesh: MeshSpec, profile: ClusterProfile, seed: int,
                    fix: dict[str, list[str]] | None = None) -> dict[str, Strategy]:
    """One strategy per graph key, drawn uniformly with ``random.Random(seed)`` in graph-key order.

    ``fix`` narrows keys first, as in ``autopar.plan`` (e.g. pin the inputs' placements)."""
    rng = random.Random(seed)
    keys = ilp.collect_keys(index_graph(cap), mesh, profile, fix)
    return {key: rng.choice(info.strategies) for key, info in keys.items()}


def random_plan(cap: CapturedModel, mesh: MeshSpec, profile: ClusterProfile, seed: int, *,
                fix: dict[str, list[str]] | None = None, backend: str = "auto", time_limit: float = 60.0) -> Plan:
    """A plan with a random strategy at every graph key (no memory budget: any draw is kept)."""
    force = draw_strategies(cap, mesh, profile, seed, fix)
    return plan_graph(cap, mesh, profile, budget=None, fix=fix, backend=backend, time_limit=time_limit,
                      force=force)
