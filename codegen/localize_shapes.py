"""Pass: rewrite shape arguments (view/reshape/expand/factories) from global to local shapes.

The local shape of a node's output is its global shape with every sharded dim divided by the mesh
sizes that shard it (shards are even: the planner never chooses an uneven split).
"""
from __future__ import annotations

import torch
from torch import fx

from autopar.codegen.context import ShardingContext
from autopar.ops.parallel_ops import local_shape

aten = torch.ops.aten
# op -> index of its size argument
SIZE_ARG = {aten.view.default: 1, aten._unsafe_view.default: 1, aten.reshape.default: 1, aten.expand.default: 1,
            aten.new_zeros.default: 1, aten.new_ones.default: 1, aten.new_empty.default: 1, aten.new_full.default: 1,
            aten.zeros.default: 0, aten.ones.default: 0, aten.full.default: 0, aten.empty.memory_format: 0}


def localize_shapes(gm: fx.GraphModule, ctx: ShardingContext) -> fx.GraphModule:
    """Requires: ctx placements. Ensures: every size argument equals the local shape of the node's output."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.name not in ctx.shardings:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        sharding = ctx.output_sharding(node.name)
        local = local_shape(tuple(int(s) for s in val.shape), sharding, ctx.mesh_shape)
        if node.target in SIZE_ARG:
            i = SIZE_ARG[node.target]
            args = list(node.args)
            args[i] = local
            node.args = tuple(args)
        elif node.target == aten.unflatten.int:
            dim = node.args[1] % len(val.shape) if node.args[1] < 0 else node.args[1]
            n = len(node.args[2])
            node.args = (node.args[0], node.args[1], local[dim:dim + n])
    gm.recompile()
    return gm
