"""Pointwise ops (found by ``torch.Tag.pointwise``) and other elementwise-shaped ops.

Every output dim can be split, each input following through broadcasting. Ops linear in their
inputs keep Partial: add/sub with all operands Partial, mul/div with one Partial operand (the
numerator for div) and the rest replicated, and unary copies.
"""
from __future__ import annotations

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Shard
from autopar.solver.strategies.base import P_SUM, R, Strategy1D, broadcast_placement, identity_rule, register

aten = torch.ops.aten

_ALL_PARTIAL = {aten.add.Tensor, aten.sub.Tensor}
_ONE_PARTIAL = {aten.mul.Tensor: None, aten.div.Tensor: 0}       # None: any operand; 0: only the first
_UNARY_LINEAR = {aten.neg.default, aten.mul.Scalar, aten.div.Scalar, aten.clone.default, aten._to_copy.default,
                 aten.alias.default, aten.detach.default, aten.to.dtype, aten.lift_fresh_copy.default}


@register("pointwise")
def pointwise_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    out = node.outputs[0]
    if out is None or len(node.outputs) != 1:
        return []
    nd = len(out.shape)
    res = [Strategy1D(tuple(R for _ in in_metas), (R,))]
    for d in range(nd):
        ins = tuple(broadcast_placement(Shard(d), nd, m.shape) for m in in_metas)
        if in_metas and all(p == R for p in ins):
            continue
        res.append(Strategy1D(ins, (Shard(d),)))
    t = node.target
    # a Python scalar operand would be added once per rank: only tensor-with-tensor sums keep Partial
    all_tensor_operands = all(isinstance(a, torch.fx.Node) for a in node.fx_node.args[:2])
    if (t in _ALL_PARTIAL and all_tensor_operands) or (t in _UNARY_LINEAR and len(in_metas) == 1):
        res.append(Strategy1D(tuple(P_SUM for _ in in_metas), (P_SUM,)))
    elif t in _ONE_PARTIAL:
        which = range(len(in_metas)) if _ONE_PARTIAL[t] is None else [0]
        for i in which:
            res.append(Strategy1D(tuple(P_SUM if j == i else R for j in range(len(in_metas))), (P_SUM,)))
    return res


@register(*_UNARY_LINEAR - {aten.mul.Scalar, aten.div.Scalar})
def copy_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    return identity_rule(node, n, in_metas, partial=True)


@register(aten.dropout.default, aten.native_dropout.default)
def dropout_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    return identity_rule(node, n, in_metas, partial=False)
