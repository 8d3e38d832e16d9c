"""Ops of mixture-of-experts routing that neither autopar's other rules nor DTensor's cover:
``one_hot`` (the expert mask) and ``index_add`` (combining expert outputs into token rows).

one_hot: the class dim is appended, every input dim can be split (the output split the same way).
index_add(self, dim, index, source): split on any dim other than ``dim`` (self, source and output alike,
index replicated), or Partial: the op is linear in self and source together.
"""
from __future__ import annotations

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Shard
from autopar.solver.strategies.base import P_SUM, R, Strategy1D, norm_dim, register

aten = torch.ops.aten


@register(aten.one_hot.default)
def one_hot_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    nd = len(in_metas[0].shape)
    return [Strategy1D((R,), (R,))] + [Strategy1D((Shard(d),), (Shard(d),)) for d in range(nd)]


@register(aten.index_add.default)
def index_add_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    out = node.outputs[0]
    if out is None or len(in_metas) != 3:
        return []
    nd = len(out.shape)
    dim = norm_dim(int(node.fx_node.args[1]), nd)
    res = [Strategy1D((R, R, R), (R,))]
    res += [Strategy1D((Shard(d), R, Shard(d)), (Shard(d),)) for d in range(nd) if d != dim]
    res.append(Strategy1D((P_SUM, R, P_SUM), (P_SUM,)))
    return res
