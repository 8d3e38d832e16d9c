"""Pass: the packed-step graph of a decoder (after :mod:`autopar.codegen.paged_attention_pass`) sharded for
tensor-parallel decoding on a 1-D mesh: this rank's slices of the weights, the plan's collectives, local heads.

``layouts`` says, per module FQN (a linear or an embedding of the model), how the plan runs it -- decided once, from
the plan, by :func:`autopar.inference.tensor_parallel.decode_layouts` (the same decision the torch-styles path
applies): ``(place, local_in, local_out)`` with ``place`` the weight's placement ``S(0)`` / ``S(1)`` / ``R``,
``local_in`` whether the op's input arrives as this rank's feature shard, ``local_out`` whether its consumer takes
this rank's output shard. The pass rewrites each such op of the graph (found by the module it was called from,
``nn_module_stack``, so a tied weight is placed per use):

=========================  ===================================================================================
linear ``S(0)``            this rank's output features (weight rows, bias); output gathered unless local_out
linear ``S(1)``            this rank's input features (weight columns; input sliced unless local_in); the
                           partial sums all-reduced, then the bias added; output sliced if local_out
linear ``R``               whole weight; a local input gathered, a local output sliced
embedding ``S(0)``         this rank's vocabulary rows: masked lookup, all-reduce
embedding ``S(1)``         this rank's hidden columns, output gathered
=========================  ===================================================================================

Between a head-split q/k/v and o_proj the tensors hold this rank's heads: views whose shape names the model's
head count (autopar's built-in Llama writes ``view(b, t, n_head, d)``) get ``-1`` there, and the paged attention
op reads the local heads (the KV cache holds ``kv_heads / n`` heads per rank). Collectives are
``autopar.ops.parallel_ops.reshard`` nodes on ``gm.mesh`` (the runtime sets the DeviceMesh), as in the training
codegen, so the module's source can be emitted and read.
"""
from __future__ import annotations

import torch
from torch import fx

from autopar.codegen.insert_collectives import mesh_node
from autopar.core.errors import ConfigError
from autopar.ops import parallel_ops

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _module_fqn(node: fx.Node, prefix: str) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = path.removeprefix(prefix)
    return path


def _local_param(gm: fx.GraphModule, g: fx.Graph, before: fx.Node, w: fx.Node, dim: int | None, rank: int,
                 world: int, fqn: str, what: str) -> fx.Node:
    """A get_attr node of this rank's chunk of the tensor of get_attr node ``w`` along ``dim``."""
    full = _attr(gm, w.target)
    if full.shape[dim] % world:
        raise ConfigError(f"{fqn}.{what} has {full.shape[dim]} rows on dim {dim}, which do not divide over {world} "
                          "ranks: plan it replicated")
    name = f"tp_{fqn.replace('.', '_')}_{what}"
    if not hasattr(gm, name):
        gm.register_buffer(name, full.chunk(world, dim)[rank].contiguous(), persistent=False)
    with g.inserting_before(before):
        return g.get_attr(name)


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _reshard(g: fx.Graph, mesh: fx.Node, x: fx.Node, src: str, dst: str) -> fx.Node:
    return g.call_function(parallel_ops.reshard, (x, mesh, src, dst))


def chunk_last(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's chunk of the last dim of a replicated tensor (no communication)."""
    return x.chunk(world, -1)[rank]


def vocab_local_ids(ids: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Token ids as rows of this rank's vocabulary slice ``[start, start + rows)`` (others: row 0, masked later)."""
    local = ids - start
    return torch.where((local >= 0) & (local < rows), local, torch.zeros_like(local))


def vocab_mask_rows(out: torch.Tensor, ids: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Zero the looked-up rows of tokens outside this rank's vocabulary slice (their sum over ranks is exact)."""
    inside = (ids >= start) & (ids < start + rows)
    return out * inside.unsqueeze(-1).to(out.dtype)


def _slice_last(g: fx.Graph, x: fx.Node, rank: int, world: int) -> fx.Node:
    return g.call_function(chunk_last, (x, rank, world))


def shard_step_graph(gm: fx.GraphModule, layouts: dict[str, tuple[str, bool, bool]], *, rank: int, world: int,
                     prefix: str = "", local_heads: set[str] | None = None) -> fx.GraphModule:
    """Requires: a packed-step graph (paged attention swapped) whose ops carry ``nn_module_stack``; ``layouts`` from
    the plan (see the module docstring; modules not named run replicated); ``prefix``: what the captured module
    adds in front of the model's FQNs; ``local_heads``: attention modules whose q/k/v run on local heads. Ensures:
    parameters read by sharded ops are this rank's chunks; outputs are the full (replicated) logits."""
    g = gm.graph
    mesh = mesh_node(gm)
    local_heads = local_heads or set()
    seen = set()
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in (aten.linear.default, aten.embedding.default):
            continue
        fqn = _module_fqn(node, prefix)
        if fqn not in layouts:
            continue
        seen.add(fqn)
        place, local_in, local_out = layouts[fqn]
        nd = node.meta["val"].dim()
        last = f"S({nd - 1})"
        if node.target is aten.embedding.default:
            _shard_embedding(gm, g, mesh, node, place, rank, world, fqn, last)
            continue
        x, w = node.args[:2]
        b = node.args[2] if len(node.args) > 2 else None
        if place == "S(0)" and local_in:
            raise ConfigError(f"{fqn}: a column-parallel linear reading a local input is not a decoding layout")
        users = list(node.users)
        with g.inserting_before(node):
            if place == "R" and local_in:
                node.replace_input_with(x, _reshard(g, mesh, x, last, "R"))
            if place == "S(1)" and not local_in:
                node.replace_input_with(x, _slice_last(g, x, rank, world))
        if place == "S(0)":
            node.replace_input_with(w, _local_param(gm, g, node, w, 0, rank, world, fqn, "weight"))
            if b is not None:
                node.replace_input_with(b, _local_param(gm, g, node, b, 0, rank, world, fqn, "bias"))
            out = node
            if not local_out:
                with g.inserting_after(node):
                    out = _reshard(g, mesh, node, last, "R")
        elif place == "S(1)":
            node.replace_input_with(w, _local_param(gm, g, node, w, 1, rank, world, fqn, "weight"))
            with g.inserting_after(node):
                out = _reshard(g, mesh, node, "P(sum)", "R")
            if b is not None:
                node.args = node.args[:2]
                with g.inserting_after(out):
                    out = g.call_function(aten.add.Tensor, (out, b))
            if local_out:
                with g.inserting_after(out):
                    out = _slice_last(g, out, rank, world)
        elif place == "R":
            out = node
            if local_out:
                with g.inserting_after(node):
                    out = _slice_last(g, node, rank, world)
        else:
            raise ConfigError(f"{fqn}: placement {place} cannot run in tensor-parallel decoding (S(0), S(1), R)")
        if out is not node:
            for u in users:
                u.replace_input_with(node, out)
        if local_out and fqn.rsplit(".", 1)[0] in local_heads:
            _localize_head_views(node, out)
    missing = set(layouts) - seen
    if missing:
        raise ConfigError(f"the captured step graph has no op of modules {sorted(missing)[:4]} the plan places: "
                          "the graph and the plan are of different models")
    g.lint()
    gm.recompile()
    return gm


def _shard_embedding(gm, g, mesh, node, place, rank, world, fqn, last):
    w, ids = node.args[:2]
    users = list(node.users)
    if place == "S(0)":          # vocabulary rows: look up the local rows, zero the others, sum over ranks
        full = _attr(gm, w.target)
        rows = full.shape[0] // world
        node.replace_input_with(w, _local_param(gm, g, node, w, 0, rank, world, fqn, "weight"))
        with g.inserting_before(node):
            local_ids = g.call_function(vocab_local_ids, (ids, rank * rows, rows))
        node.replace_input_with(ids, local_ids)
        with g.inserting_after(node):
            masked = g.call_function(vocab_mask_rows, (node, ids, rank * rows, rows))
        with g.inserting_after(masked):
            out = _reshard(g, mesh, masked, "P(sum)", "R")
    elif place == "S(1)":        # hidden columns: gather the output features
        node.replace_input_with(w, _local_param(gm, g, node, w, 1, rank, world, fqn, "weight"))
        with g.inserting_after(node):
            out = _reshard(g, mesh, node, last, "R")
    else:
        return
    for u in users:
        u.replace_input_with(node, out)


def _localize_head_views(node: fx.Node, out: fx.Node) -> None:
    """Views right after a head-split projection that name the global head count: that dim becomes ``-1``."""
    for u in list(out.users):
        if u.op == "call_function" and u.target in _VIEWS and isinstance(u.args[1], (list, tuple)):
            shape = list(u.args[1])
            if len(shape) == 4 and isinstance(shape[2], int) and shape[2] != -1:
                shape[2] = -1
                u.args = (u.args[0], shape, *u.args[2:])
