"""View-like ops: reshape family by flat-prefix matching, transpose/permute, expand, slice/select,
split/chunk/unbind, cat, getitem, repeat_interleave.

Reshape rule: splitting input dim d into n contiguous blocks equals splitting output dim e into n
blocks iff prod(in[:d]) == prod(out[:e]) and both sizes divide by n (the flat index ranges then
coincide). Partial passes through every view unchanged.
"""
from __future__ import annotations

import math
import operator

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Shard
from autopar.solver.strategies.base import P_SUM, R, Strategy1D, identity_rule, norm_dim, register

aten = torch.ops.aten


def _base(in_metas: list[TensorMeta], nout: int = 1) -> list[Strategy1D]:
    k = len(in_metas)
    return [Strategy1D((R,) * k, (R,) * nout), Strategy1D((P_SUM,) + (R,) * (k - 1), (P_SUM,) * nout)]


@register(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
          aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def reshape_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    src, dst = in_metas[0].shape, node.outputs[0].shape
    res = _base(in_metas)
    for d, s in enumerate(src):
        if s % n or s == 1:
            continue
        pre = math.prod(src[:d])
        for e, t in enumerate(dst):
            if t > 1 and t % n == 0 and math.prod(dst[:e]) == pre:
                res.append(Strategy1D((Shard(d),), (Shard(e),)))
                break
    return res


@register(aten.transpose.int, aten.permute.default, aten.t.default)
def permute_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    nd = len(in_metas[0].shape)
    args = node.fx_node.args
    if node.target == aten.permute.default:
        perm = [norm_dim(int(d), nd) for d in args[1]]
    else:
        perm = list(range(nd))
        a, b = (norm_dim(int(args[1]), nd), norm_dim(int(args[2]), nd)) if node.target == aten.transpose.int else (0, nd - 1)
        perm[a], perm[b] = perm[b], perm[a]
    return _base(in_metas) + [Strategy1D((Shard(perm[e]),), (Shard(e),)) for e in range(nd)]


@register(aten.expand.default)
def expand_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    src, dst = in_metas[0].shape, node.outputs[0].shape
    off = len(dst) - len(src)
    res = _base(in_metas)
    for e in range(len(dst)):
        d = e - off
        res.append(Strategy1D((Shard(d) if d >= 0 and src[d] != 1 else R,), (Shard(e),)))
    return res


@register(aten.slice.Tensor, aten.select.int)
def slice_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    nd = len(in_metas[0].shape)
    args = node.fx_node.args
    dim = norm_dim(int(args[1]) if len(args) > 1 else 0, nd)
    drop = node.target == aten.select.int
    return _base(in_metas) + [Strategy1D((Shard(d),), (Shard(d - (drop and d > dim)),)) for d in range(nd) if d != dim]


@register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
def split_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    nd = len(in_metas[0].shape)
    args = node.fx_node.args
    if node.target == aten.unbind.int:
        dim = norm_dim(int(args[1]) if len(args) > 1 else 0, nd)
    else:
        dim = norm_dim(int(args[2]) if len(args) > 2 else int(node.fx_node.kwargs.get("dim", 0)), nd)
    k = len(node.outputs)
    drop = node.target == aten.unbind.int
    return _base(in_metas, k) + [Strategy1D((Shard(d),), (Shard(d - (drop and d > dim)),) * k)
                                 for d in range(nd) if d != dim]


@register(aten.cat.default)
def cat_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    nd = len(node.outputs[0].shape)
    args = node.fx_node.args
    dim = norm_dim(int(args[1]) if len(args) > 1 else 0, nd)
    k = len(in_metas)
    if any(len(m.shape) != nd for m in in_metas):
        return []
    return [Strategy1D((R,) * k, (R,)), Strategy1D((P_SUM,) * k, (P_SUM,))] + [
        Strategy1D((Shard(d),) * k, (Shard(d),)) for d in range(nd) if d != dim]


@register(operator.getitem)
def getitem_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    return identity_rule(node, n, in_metas, partial=True)


@register(aten.repeat_interleave.self_int)
def repeat_interleave_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    args = node.fx_node.args
    if len(args) < 3 and "dim" not in node.fx_node.kwargs:
        return []  # flattening form: replicate
    return identity_rule(node, n, in_metas, partial=True)
