"""autopar.codegen: passes GraphModule -> GraphModule that turn a captured graph and a Plan into a
graph on local shards with the plan's collectives. Imports autopar's core only (never the solver).

Order: drop_asserts -> substitute_parallel_ops (needs the plain ops) -> insert_collectives (reads the
substituted nodes' tensor arguments) -> localize_shapes -> fuse_kernels (optional, so a pattern
only matches where no reshard sits between its ops) -> MEMORY_PASSES: checkpoint_regions ->
offload_activations (last: they outline finished nodes into submodules; no-ops for an empty plan list).
"""
from __future__ import annotations

import torch
from torch import fx

from autopar.codegen.checkpoint_regions import checkpoint_regions
from autopar.codegen.context import ShardingContext, copy_graph_module
from autopar.codegen.drop_asserts import drop_asserts
from autopar.codegen.fuse_kernels import fuse_kernels
from autopar.codegen.insert_collectives import insert_collectives
from autopar.codegen.localize_shapes import localize_shapes
from autopar.codegen.offload_activations import offload_activations
from autopar.codegen.substitute_parallel_ops import substitute_parallel_ops
from autopar.core.capture import CapturedModel
from autopar.core.plan import Plan

PASSES = (drop_asserts, substitute_parallel_ops, insert_collectives, localize_shapes)
MEMORY_PASSES = (checkpoint_regions, offload_activations)


def build_parallel_graph(cap: CapturedModel, plan: Plan, *, defer_param_grads: bool = True,
                         fuse: bool | None = None, output_shardings: list[list[str]] | None = None
                         ) -> tuple[fx.GraphModule, ShardingContext]:
    """The rewritten graph (inputs: local params, buffers, user inputs; outputs replicated). With
    ``defer_param_grads=False`` data-parallel gradient sums happen inline (no bucketed reducer needed).
    ``fuse``: substitute runtime_kernels' fused ops (None: when CUDA is available, where they run as
    Triton kernels; on the CPU they run their torch references). ``output_shardings``: per flattened output,
    the placements to return it in (a pipeline stage's send placements) instead of replicated."""
    ctx = ShardingContext.build(cap, plan)
    if output_shardings is not None:
        ctx.output_targets = tuple(" ".join(sh) for sh in output_shardings)
    gm = copy_graph_module(cap.program.graph_module)
    for p in PASSES:
        gm = p(gm, ctx, defer_param_grads=defer_param_grads) if p is insert_collectives else p(gm, ctx)
    if fuse is None:
        fuse = torch.cuda.is_available()  # the kernels' home; on the CPU they would run their references
    if fuse:
        gm = fuse_kernels(gm, ctx)
    for p in MEMORY_PASSES:
        gm = p(gm, ctx)
    gm.mesh = None  # set by the runtime to the DeviceMesh
    return gm, ctx


__all__ = ["build_parallel_graph", "ShardingContext", "PASSES", "MEMORY_PASSES", "fuse_kernels"]
