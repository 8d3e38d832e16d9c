"""Ops that create tensors from nothing (arange, zeros, full, ...): replicated output."""
from __future__ import annotations

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.solver.strategies.base import R, Strategy1D, register

aten = torch.ops.aten


@register(aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default, aten.ones.default,
          aten.full.default, aten.empty.memory_format, aten.scalar_tensor.default)
def factory_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    return [Strategy1D(tuple(R for _ in in_metas), (R,))]
