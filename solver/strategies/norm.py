"""layer_norm and rms_norm: split any dim outside the normalized shape (weight and bias replicated), or
split the normalized (hidden) dim itself with the weight and bias split alike.

The hidden split is the distributed norm of the multi-dimensional tensor-parallel layouts: each rank
sums its part of every row (rms: the sum of squares; layer norm: the sum and the sum of squares), one
all-reduce of these statistics over each hidden-splitting mesh dim gives the row's mean / variance, and
each rank normalizes its part. Backward all-reduces the statistics' gradients once more. The runtime
op is ``autopar.ops.parallel_ops.sharded_norm`` (codegen's substitute_parallel_ops); ``stat_collectives``
lists its collectives for pricing (solver.keys) and for the plan's collective list (solver.runtime_model).
On meshes of 3+ dims solver.keys keeps the hidden split only where a layout pins the norm (ILP size).
"""
from __future__ import annotations

import math

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Placement, Shard
from autopar.solver.strategies.base import R, Strategy1D, register

aten = torch.ops.aten
NORMS = (aten.layer_norm.default, aten.rms_norm.default)


@register(*NORMS)
def norm_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    x = in_metas[0]
    normalized = node.fx_node.args[1]
    batch_dims = len(x.shape) - len(normalized)
    rest = (R,) * (len(in_metas) - 1)
    out = [Strategy1D((R,) + rest, (R,))] + [Strategy1D((Shard(d),) + rest, (Shard(d),)) for d in range(batch_dims)]
    if len(normalized) == 1 and len(node.outputs) == 1:   # the hidden dim split: statistics all-reduced
        last = len(x.shape) - 1
        out.append(Strategy1D((Shard(last),) + (Shard(0),) * (len(in_metas) - 1), (Shard(last),)))
    return out


def splits_hidden(node: GNode, inputs: tuple[tuple[Placement, ...], ...], x: TensorMeta | None) -> bool:
    """Whether a norm strategy with these input placements splits the normalized (hidden) dim."""
    return node.target in NORMS and x is not None and any(
        isinstance(p, Shard) and p.dim == len(x.shape) - 1 for p in inputs[0])


def stats_per_row(node: GNode) -> int:
    """Statistics the sharded norm reduces per row: the sum of squares (rms), or the sum too (layer norm)."""
    return 2 if node.target == aten.layer_norm.default else 1


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the statistics are summed and reduced in (as parallel_ops.sharded_norm does)."""
    return torch.promote_types(dtype, torch.float32)


def stat_collectives(node: GNode, x: TensorMeta, x_placements: tuple[Placement, ...],
                     mesh_shape: tuple[int, ...]) -> list[tuple[str, str, int, int]]:
    """(phase, kind, mesh dim, bytes) of the sharded norm's own collectives for input ``x`` placed
    ``x_placements``: per mesh dim splitting the hidden dim, one all-reduce of this rank's rows' statistics
    forward and one of their gradients backward (innermost mesh dim first); none when the hidden is whole."""
    if node.target not in NORMS or x is None:
        return []
    last = len(x.shape) - 1
    dims = [d for d, p in enumerate(x_placements) if isinstance(p, Shard) and p.dim == last and mesh_shape[d] > 1]
    if not dims:
        return []
    rows = math.prod(x.shape[:-1]) // math.prod(n for p, n in zip(x_placements, mesh_shape)
                                                 if isinstance(p, Shard) and p.dim != last)
    nbytes = rows * stats_per_row(node) * stats_dtype(x.dtype).itemsize
    return [(phase, "all_reduce", d, nbytes) for phase in ("fwd", "bwd") for d in reversed(dims)]
