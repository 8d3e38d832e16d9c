"""autopar.codegen: passes GraphModule -> GraphModule that turn a captured graph and a Plan into a
graph on local shards with the plan's collectives. Imports autopar's core only (never the solver).

Order: drop_asserts -> substitute_parallel_ops (needs the plain ops) -> insert_collectives (reads the
substituted nodes' tensor arguments) -> localize_shapes.
"""
from __future__ import annotations

from torch import fx

from autopar.capture import CapturedModel
from autopar.codegen.context import ShardingContext, copy_graph_module
from autopar.codegen.drop_asserts import drop_asserts
from autopar.codegen.insert_collectives import insert_collectives
from autopar.codegen.localize_shapes import localize_shapes
from autopar.codegen.substitute_parallel_ops import substitute_parallel_ops
from autopar.plan import Plan

PASSES = (drop_asserts, substitute_parallel_ops, insert_collectives, localize_shapes)


def build_parallel_graph(cap: CapturedModel, plan: Plan, *, defer_param_grads: bool = True
                         ) -> tuple[fx.GraphModule, ShardingContext]:
    """The rewritten graph (inputs: local params, buffers, user inputs; outputs replicated). With
    ``defer_param_grads=False`` data-parallel gradient sums happen inline (no bucketed reducer needed)."""
    ctx = ShardingContext.build(cap, plan)
    gm = copy_graph_module(cap.program.graph_module)
    for p in PASSES:
        gm = p(gm, ctx, defer_param_grads=defer_param_grads) if p is insert_collectives else p(gm, ctx)
    gm.mesh = None  # set by the runtime to the DeviceMesh
    return gm, ctx


__all__ = ["build_parallel_graph", "ShardingContext", "PASSES"]
