"""embedding(weight [V, D], indices): split the indices (batch), the embedding dim, or the vocabulary
(vocab-parallel: each rank looks up its rows, others give zero; output Partial; ``padding_idx`` is kept).
With ``scale_grad_by_freq`` the gradient depends on how often each id occurs in the whole batch, so
neither the indices nor the vocabulary are split."""
from __future__ import annotations

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Shard
from autopar.solver.strategies.base import P_SUM, R, Strategy1D, register

aten = torch.ops.aten


@register(aten.embedding.default)
def embedding_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    w, idx = in_metas
    out_ndim = len(idx.shape) + 1
    res = [Strategy1D((R, R), (R,)),
           Strategy1D((Shard(1), R), (Shard(out_ndim - 1),))]
    if _scale_grad_by_freq(node):
        return res
    res.append(Strategy1D((Shard(0), R), (P_SUM,)))
    res += [Strategy1D((R, Shard(d)), (Shard(d),)) for d in range(len(idx.shape))]
    return res


def _scale_grad_by_freq(node: GNode) -> bool:
    fx_node = node.fx_node
    if fx_node is None:
        return False
    args = list(fx_node.args) + [None] * 5
    return bool(args[3] if args[3] is not None else fx_node.kwargs.get("scale_grad_by_freq", False))
