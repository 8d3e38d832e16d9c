"""softmax / log_softmax: split any dim but the one normalized over."""
from __future__ import annotations

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Shard
from autopar.solver.strategies.base import R, Strategy1D, norm_dim, register

aten = torch.ops.aten


@register(aten.softmax.int, aten.log_softmax.int, aten._softmax.default, aten._log_softmax.default)
def softmax_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    x = in_metas[0]
    dim = norm_dim(int(node.fx_node.args[1]), len(x.shape))
    return [Strategy1D((R,), (R,))] + [Strategy1D((Shard(d),), (Shard(d),)) for d in range(len(x.shape)) if d != dim]
