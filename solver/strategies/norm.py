"""layer_norm and rms_norm: split any dim outside the normalized shape; weight and bias replicated."""
from __future__ import annotations

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Shard
from autopar.solver.strategies.base import R, Strategy1D, register

aten = torch.ops.aten


@register(aten.layer_norm.default, aten.rms_norm.default)
def norm_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    x = in_metas[0]
    normalized = node.fx_node.args[1]
    batch_dims = len(x.shape) - len(normalized)
    rest = (R,) * (len(in_metas) - 1)
    return [Strategy1D((R,) + rest, (R,))] + [Strategy1D((Shard(d),) + rest, (Shard(d),)) for d in range(batch_dims)]
