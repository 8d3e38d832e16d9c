"""Pass: make every op read its inputs in the plan's placements, and return replicated outputs (a pipeline
stage's outputs in the placements it sends them in: ``ShardingContext.output_targets``).

For each tensor argument of each op, when the producer's planned output placement differs from
the placement the op's strategy needs (or the gradient must be reduced on the way back), insert
``autopar.ops.parallel_ops.reshard(x, mesh, src, dst[, grad_dst])``. The gradient of a replicated
input arrives as a Partial sum on every mesh dim where the op splits its work; ``grad_dst`` says
so, and the reshard's backward reduces it (this is where data-parallel gradients are all-reduced
unless the bucketed reducer takes them over).
"""
from __future__ import annotations

import operator
import warnings

import torch
from torch import fx

from autopar.codegen.context import ShardingContext
from autopar.core import runtime_rules
from autopar.core.runtime_rules import grad_arrival
from autopar.ops import parallel_ops


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


def _is_tensor_input(a: object, ctx: ShardingContext) -> bool:
    return isinstance(a, fx.Node) and a.name in ctx.gi.nodes and isinstance(a.meta.get("val"), torch.Tensor)


def deferred_grads(ctx: ShardingContext) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(deferred parameters: placeholder -> mesh dims, pass-through ops): the rule of
    ``autopar.core.runtime_rules.deferred_grads`` (stated there once, for the solver's runtime model too)
    on the plan's placements."""
    return runtime_rules.deferred_grads(ctx.gi, ctx.output_sharding, ctx.input_sharding, ctx.split_dims)


def insert_collectives(gm: fx.GraphModule, ctx: ShardingContext, *, defer_param_grads: bool = True
                       ) -> fx.GraphModule:
    """Requires: ctx has placements for every tensor node. Ensures: each op's inputs are resharded to its
    strategy's placements (with reduced gradients where the strategy splits work; identical reshards of one
    value are shared, so their gradients are summed before one reduction); graph outputs are replicated (or
    placed as ``ctx.output_targets`` says, one per flattened output).
    With ``defer_param_grads`` the data-parallel gradient sums of parameters are not inlined but listed in
    ``gm.meta["autopar_deferred_grads"]`` (placeholder -> mesh dims) for the bucketed reducer."""
    g = gm.graph
    mesh = mesh_node(gm)
    deferred, passthrough = deferred_grads(ctx) if defer_param_grads else ({}, set())
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
            if (src == dst and grad is None) or ref.src in deferred or ref.src in passthrough:
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
    slot = iter(range(1 << 30))

    def to_target(a):
        i = next(slot)
        if not is_tensor_input(a):
            return a
        src = ctx.output_sharding(after_getitem.get(a.name, a.name))
        dst = ctx.output_targets[i] if ctx.output_targets is not None else replicated
        if src == dst:
            return a
        if dst == replicated and _replicate_loss_in_place(a, src):
            return a
        with g.inserting_before(out):
            return g.call_function(parallel_ops.reshard, (a, mesh, src, dst))

    out.args = fx.node.map_aggregate(out.args, to_target)
    gm.recompile()
    return gm


def _replicate_loss_in_place(node: fx.Node, src: str) -> bool:
    """A cross-entropy whose only use is the graph output and whose rows are split: let it return the
    replicated loss itself, summing its loss and target count in one all-reduce per batch-splitting mesh
    dim (else the count is all-reduced inside it and the loss again at the output)."""
    if node.target is not parallel_ops.sharded_cross_entropy or len(node.users) != 1:
        return False
    if len(node.args) == 7:   # made replicated already (the loss returned twice)
        return node.args[6] is True
    logits, target, mesh, sharding, ignore, reduction = node.args   # as substitute_parallel_ops writes it
    if src != " ".join("P(sum)" if p == "S(0)" else "R" for p in sharding.split()) or reduction not in (1, 2):
        return False
    node.args = (logits, target, mesh, sharding, ignore, reduction, True)
    return True
