"""Pass: replace ops whose sharded form is not the plain op on local shards.

* embedding with the vocabulary (weight dim 0) split -> ``parallel_ops.vocab_parallel_embedding``
  (ids outside this rank's rows give zeros; the output is a partial sum);
* cross_entropy_loss with split rows or classes -> ``parallel_ops.sharded_cross_entropy``;
* layer_norm / rms_norm with the normalized (last) dim split -> ``parallel_ops.sharded_norm`` (statistics
  all-reduced; solver.strategies.norm).
"""
from __future__ import annotations

import torch
from torch import fx

from autopar.codegen.context import ShardingContext
from autopar.codegen.insert_collectives import mesh_node
from autopar.ops import parallel_ops

aten = torch.ops.aten


def substitute_parallel_ops(gm: fx.GraphModule, ctx: ShardingContext) -> fx.GraphModule:
    """Requires: ctx placements; run before insert_collectives. Ensures: sharded embedding and
    cross-entropy nodes call the parallel implementations (same node names, same tensor arguments first)."""
    mesh = None
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.name not in ctx.shardings:
            continue
        if node.target == aten.embedding.default:
            w = ctx.input_sharding(node.name, 0)
            if "S(0)" in w.split():
                mesh = mesh or mesh_node(gm)
                pad = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
                node.target = parallel_ops.vocab_parallel_embedding
                node.args, node.kwargs = (node.args[0], node.args[1], mesh, w, pad), {}
        elif node.target == aten.cross_entropy_loss.default:
            logits = ctx.input_sharding(node.name, 0)
            if any(p in ("S(0)", "S(1)") for p in logits.split()):
                mesh = mesh or mesh_node(gm)
                a = list(node.args) + [None] * (6 - len(node.args))
                reduction = a[3] if a[3] is not None else node.kwargs.get("reduction", 1)
                ignore = a[4] if a[4] is not None else node.kwargs.get("ignore_index", -100)
                node.target = parallel_ops.sharded_cross_entropy
                node.args, node.kwargs = (a[0], a[1], mesh, logits, ignore, reduction), {}
        elif node.target in (aten.layer_norm.default, aten.rms_norm.default):
            x = ctx.input_sharding(node.name, 0)
            val = node.args[0].meta.get("val")
            if val is not None and f"S({val.dim() - 1})" in x.split():
                mesh = mesh or mesh_node(gm)
                rms = node.target == aten.rms_norm.default
                a = list(node.args) + [None] * (5 - len(node.args))
                w = a[2] if a[2] is not None else node.kwargs.get("weight")
                b = None if rms else (a[3] if a[3] is not None else node.kwargs.get("bias"))
                eps = a[3 if rms else 4]
                eps = eps if eps is not None else node.kwargs.get("eps", None if rms else 1e-5)
                node.target = parallel_ops.sharded_norm
                node.args, node.kwargs = (a[0], w, b, mesh, x, eps, rms), {}
    gm.recompile()
    return gm
