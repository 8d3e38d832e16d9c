"""sum / mean: a split kept dim stays split; a split reduced dim gives Partial (sum, or avg for mean)."""
from __future__ import annotations

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Shard
from autopar.solver.strategies.base import P_AVG, P_SUM, R, Strategy1D, norm_dim, register

aten = torch.ops.aten


@register(aten.sum.dim_IntList, aten.mean.dim, aten.sum.default, aten.mean.default)
def reduction_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    x = in_metas[0]
    nd = len(x.shape)
    args = node.fx_node.args
    is_mean = node.target in (aten.mean.dim, aten.mean.default)
    if node.target in (aten.sum.default, aten.mean.default):
        dims, keep = list(range(nd)), False
    else:
        dims = args[1] if len(args) > 1 else node.fx_node.kwargs.get("dim")
        dims = list(range(nd)) if dims is None or dims == [] else [norm_dim(int(d), nd) for d in dims]
        keep = bool(args[2]) if len(args) > 2 else bool(node.fx_node.kwargs.get("keepdim", False))
    res = [Strategy1D((R,), (R,)), Strategy1D((P_SUM,), (P_SUM,))]
    for d in range(nd):
        if d in dims:
            res.append(Strategy1D((Shard(d),), (P_AVG if is_mean else P_SUM,)))
        else:
            res.append(Strategy1D((Shard(d),), (Shard(d if keep else d - sum(1 for r in dims if r < d)),)))
    return res
