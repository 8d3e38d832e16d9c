"""cross_entropy_loss / nll_loss: split the batch (local sums, Partial output) or the vocabulary
(vocab-parallel: max, sum-exp and target logit reduced across ranks; replicated output).

Mean reduction stays exact with ignored targets: the runtime divides local sums by the global
count of counted targets. With ``reduction="none"`` (one loss per row) a split batch gives this
rank's rows (Shard(0) output), a split vocabulary the full rows.
"""
from __future__ import annotations

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Shard
from autopar.solver.strategies.base import P_SUM, R, Strategy1D, register

aten = torch.ops.aten


def _supported(node: GNode) -> bool:
    args = node.fx_node.args
    weight = args[2] if len(args) > 2 else node.fx_node.kwargs.get("weight")
    smoothing = args[5] if len(args) > 5 else node.fx_node.kwargs.get("label_smoothing", 0.0)
    return weight is None and not smoothing


def _reduction(node: GNode) -> int:
    args = node.fx_node.args
    r = args[3] if len(args) > 3 else node.fx_node.kwargs.get("reduction", 1)
    return 1 if r is None else int(r)


@register(aten.cross_entropy_loss.default)
def cross_entropy_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    logits, target = in_metas[:2]
    if not _supported(node) or len(in_metas) != 2 or len(logits.shape) != 2:
        return []
    if _reduction(node) == 0:   # one loss per row: split rows give this rank's rows
        return [Strategy1D((R, R), (R,)),
                Strategy1D((Shard(0), Shard(0)), (Shard(0),)),
                Strategy1D((Shard(1), R), (R,))]
    return [Strategy1D((R, R), (R,)),
            Strategy1D((Shard(0), Shard(0)), (P_SUM,)),
            Strategy1D((Shard(1), R), (R,))]
