"""Pass: make every op read its inputs in the plan's placements, and return replicated outputs.

For each tensor argument of each op, when the producer's planned output placement differs from
the placement the op's strategy needs (or the gradient must be reduced on the way back), insert
``autopar.parallel_ops.reshard(x, mesh, src, dst[, grad_dst])``. The gradient of a replicated
input arrives as a Partial sum on every mesh dim where the op splits its work; ``grad_dst`` says
so, and the reshard's backward reduces it (this is where data-parallel gradients are all-reduced
unless the bucketed reducer takes them over).
"""
from __future__ import annotations

import operator
import warnings

import torch
from torch import fx

from autopar import parallel_ops
from autopar.codegen.context import ShardingContext


def mesh_node(gm: fx.GraphModule) -> fx.Node:
    """The graph's ``mesh = self.mesh`` node (created after the placeholders on first use)."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == "mesh":
            return n
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    if not hasattr(gm, "mesh"):
        gm.mesh = None  # the runtime sets the DeviceMesh
    with gm.graph.inserting_after(last), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fx warns for get_attr of a non-tensor attribute
        return gm.graph.get_attr("mesh")


def grad_arrival(dst: str, split: tuple[bool, ...]) -> str | None:
    """The gradient placement at a consumer input, when it differs from the default."""
    parts = dst.split()
    if not any(p == "R" and s for p, s in zip(parts, split)):
        return None
    return " ".join("P(sum)" if p == "R" and s else ("R" if p.startswith("P") else p) for p, s in zip(parts, split))


def _is_tensor_input(a: object, ctx: ShardingContext) -> bool:
    return isinstance(a, fx.Node) and a.name in ctx.gi.nodes and isinstance(a.meta.get("val"), torch.Tensor)


def deferred_grad_dims(ctx: ShardingContext) -> dict[str, tuple[int, ...]]:
    """Parameters whose every use only needs its gradient summed over some mesh dims (data parallel):
    placeholder name -> those dims. Their reduction is left to the bucketed reducer (DDP semantics)."""
    uses: dict[str, set] = {}
    for name, g in ctx.gi.nodes.items():
        if g.kind != "op" or g.target is operator.getitem:
            continue
        split = ctx.split_dims(name)
        for i, ref in enumerate(g.inputs):
            if ctx.gi.nodes[ref.src].kind != "param":
                continue
            src, dst = ctx.output_sharding(ref.src, ref.out), ctx.input_sharding(name, i)
            grad = grad_arrival(dst, split)
            uses.setdefault(ref.src, set()).add((src == dst, grad))
    out = {}
    for pname, u in uses.items():
        if len(u) == 1:
            same, grad = next(iter(u))
            if same and grad is not None:
                out[pname] = tuple(d for d, p in enumerate(grad.split()) if p == "P(sum)")
    return out


def insert_collectives(gm: fx.GraphModule, ctx: ShardingContext, *, defer_param_grads: bool = True
                       ) -> fx.GraphModule:
    """Requires: ctx has placements for every tensor node. Ensures: each op's inputs are resharded to its
    strategy's placements (with reduced gradients where the strategy splits work; identical reshards of one
    value are shared, so their gradients are summed before one reduction); graph outputs are replicated.
    With ``defer_param_grads`` the data-parallel gradient sums of parameters are not inlined but listed in
    ``gm.meta["autopar_deferred_grads"]`` (placeholder -> mesh dims) for the bucketed reducer."""
    g = gm.graph
    mesh = mesh_node(gm)
    deferred = deferred_grad_dims(ctx) if defer_param_grads else {}
    gm.meta["autopar_deferred_grads"] = deferred
    shared: dict[tuple, fx.Node] = {}
    after_getitem: dict[str, str] = {}  # reshard inserted after a getitem -> that getitem (its consumers' input)

    def is_tensor_input(a) -> bool:
        return isinstance(a, fx.Node) and (a.name in after_getitem or _is_tensor_input(a, ctx))

    for node in list(g.nodes):
        if node.op != "call_function" or node.name not in ctx.shardings:
            continue
        gnode = ctx.gnode(node.name)
        split = ctx.split_dims(node.name)
        if node.target is operator.getitem:  # a slot of a multi-output op: reshard after selecting it
            ref = gnode.inputs[0]
            src, dst = ctx.output_sharding(ref.src, ref.out), ctx.input_sharding(node.name, 0)
            if src != dst:
                with g.inserting_after(node):
                    r = g.call_function(parallel_ops.reshard, (node, mesh, src, dst))
                node.replace_all_uses_with(r, delete_user_cb=lambda u: u is not r)
                after_getitem[r.name] = node.name
            continue
        counter = iter(range(len(gnode.inputs)))

        def remap(a):
            if not is_tensor_input(a):
                return a
            i = next(counter)
            ref = gnode.inputs[i]
            src, dst = ctx.output_sharding(ref.src, ref.out), ctx.input_sharding(node.name, i)
            grad = grad_arrival(dst, split)
            if (src == dst and grad is None) or ref.src in deferred:
                return a
            key = (after_getitem.get(a.name, a.name), src, dst, grad)
            if key not in shared:
                with g.inserting_before(node):
                    shared[key] = g.call_function(parallel_ops.reshard, (a, mesh, src, dst) + ((grad,) if grad else ()))
            return shared[key]

        node.args = fx.node.map_aggregate(node.args, remap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, remap)
    out = g.output_node() if hasattr(g, "output_node") else next(n for n in g.nodes if n.op == "output")
    replicated = " ".join("R" for _ in ctx.mesh_shape)

    def to_replicated(a):
        if not is_tensor_input(a):
            return a
        src = ctx.output_sharding(after_getitem.get(a.name, a.name))
        if src == replicated:
            return a
        with g.inserting_before(out):
            return g.call_function(parallel_ops.reshard, (a, mesh, src, replicated))

    out.args = fx.node.map_aggregate(out.args, to_replicated)
    gm.recompile()
    return gm
