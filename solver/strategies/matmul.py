"""linear, mm, addmm, bmm, matmul: every split of the batch, M, N and K dims (K gives Partial)."""
from __future__ import annotations

import string

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Placement, Shard
from autopar.solver.strategies.base import P_SUM, R, Strategy1D, broadcast_placement, einsum_strategies, register

aten = torch.ops.aten


def _from_einsum(spec: str) -> list[Strategy1D]:
    return [Strategy1D(ins, (out,)) for ins, out in einsum_strategies(spec)]


@register(aten.mm.default)
def mm_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    return _from_einsum("mk,kn->mn")


@register(aten.bmm.default)
def bmm_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    return _from_einsum("bmk,bkn->bmn")


@register(aten.addmm.default)
def addmm_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    bias_shape = in_metas[0].shape
    return [Strategy1D((broadcast_placement(out, 2, bias_shape),) + ins, (out,))
            for ins, out in einsum_strategies("mk,kn->mn")]


@register(aten.linear.default)
def linear_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    x = in_metas[0]
    batch = string.ascii_lowercase[: len(x.shape) - 1]
    res = []
    for ins, out in einsum_strategies(f"{batch}k,nk->{batch}n"):
        if len(node.inputs) == 3:  # bias [N] follows the output's last dim; a Partial output needs a Partial bias
            bias: Placement = R
            if isinstance(out, Shard) and out.dim == len(x.shape) - 1:
                bias = Shard(0)
            elif out == P_SUM:
                bias = P_SUM
            ins = ins + (bias,)
        res.append(Strategy1D(ins, (out,)))
    return res


@register(aten.matmul.default)
def matmul_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    a, b = in_metas
    if len(b.shape) == 2 and len(a.shape) >= 2:
        batch = string.ascii_lowercase[: len(a.shape) - 2]
        return _from_einsum(f"{batch}mk,kn->{batch}mn")
    if len(a.shape) == len(b.shape) and len(a.shape) >= 3 and a.shape[:-2] == b.shape[:-2]:
        batch = string.ascii_lowercase[: len(a.shape) - 2]
        return _from_einsum(f"{batch}mk,{batch}kn->{batch}mn")
    return []  # other broadcasting forms: replicate
