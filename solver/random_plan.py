"""Seedable random feasible plans, for fuzzing codegen and the runtime against one device.

``random_plan(cap, mesh, profile, seed)`` draws one strategy uniformly per graph key (from the
strategies the planner itself would consider, so every choice divides evenly) and pins all of them
through ``plan_graph(..., force=...)``: the ILP then only places the reshards between the drawn
strategies, and the plan is written exactly as a solved one (same JSON, same ``apply``). The same
(capture, mesh, seed) always gives the same plan. Memory decisions are drawn too (``memory=True``):
every block of a repeated-block list gets keep / selective / full recompute uniformly, and activation
offload with probability 1/2; ZeRO-3 is among the strategies (parameters sharded on a dim).

This module imports autopar's core and the solver only; it never runs a plan.
"""
from __future__ import annotations

import dataclasses
import random

from autopar.cluster.profile import ClusterProfile
from autopar.core.capture import CapturedModel
from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.core.plan import Plan
from autopar.solver import ilp
from autopar.solver.planner import plan_graph
from autopar.solver.strategies import Strategy

__all__ = ["draw_memory", "draw_strategies", "random_plan"]


def draw_strategies(cap: CapturedModel, mesh: MeshSpec, profile: ClusterProfile, seed: int,
                    fix: dict[str, list[str]] | None = None) -> dict[str, Strategy]:
    """One strategy per graph key, drawn uniformly with ``random.Random(seed)`` in graph-key order.

    ``fix`` narrows keys first, as in ``autopar.plan`` (e.g. pin the inputs' placements)."""
    rng = random.Random(seed)
    keys = ilp.collect_keys(index_graph(cap), mesh, profile, fix)
    return {key: rng.choice(info.strategies) for key, info in keys.items()}


def draw_memory(cap: CapturedModel, seed: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(checkpoint, offload) entries for every block of the model's repeated-block lists, drawn with
    their own ``random.Random`` stream (the strategy draw does not shift them)."""
    rng = random.Random(f"{seed}/memory")
    gi = index_graph(cap)
    checkpoint, offload = [], []
    for lst in sorted(gi.shared_lists):
        for i in range(gi.layer_counts[lst]):
            mode = rng.choice(("keep", "selective", "full"))
            if mode != "keep":
                checkpoint.append(f"{gi.block_name(lst, i)}:{mode}")
            if rng.random() < 0.5:
                offload.append(gi.block_name(lst, i))
    return tuple(checkpoint), tuple(offload)


def random_plan(cap: CapturedModel, mesh: MeshSpec, profile: ClusterProfile, seed: int, *,
                fix: dict[str, list[str]] | None = None, backend: str = "auto", time_limit: float = 60.0,
                memory: bool = True) -> Plan:
    """A plan with a random strategy at every graph key (no memory budget: any draw is kept) and,
    with ``memory``, random recompute / offload per repeated block."""
    force = draw_strategies(cap, mesh, profile, seed, fix)
    plan = plan_graph(cap, mesh, profile, budget=None, fix=fix, backend=backend, time_limit=time_limit,
                      force=force)
    if not memory:
        return plan
    checkpoint, offload = draw_memory(cap, seed)
    return dataclasses.replace(plan, checkpoint=checkpoint, offload=offload)
