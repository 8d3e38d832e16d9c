"""scaled_dot_product_attention on [B, H, T, D]: split batch or heads (T and D stay whole)."""
from __future__ import annotations

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Shard
from autopar.solver.strategies.base import R, Strategy1D, broadcast_placement, register

aten = torch.ops.aten


@register(aten.scaled_dot_product_attention.default)
def sdpa_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    q = in_metas[0]
    res = []
    for d in (0, 1):
        if any(len(m.shape) != 4 for m in in_metas[:3]):
            continue
        ins = tuple(Shard(d) for _ in range(3))
        ins = ins + tuple(broadcast_placement(Shard(d), 4, m.shape) for m in in_metas[3:])  # attn_mask
        res.append(Strategy1D(ins, (Shard(d),)))
    return [Strategy1D(tuple(R for _ in in_metas), (R,))] + res if q else res
