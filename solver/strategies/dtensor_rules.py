"""Strategies from DTensor's own sharding rules, for ops autopar has no rule for.

``torch.distributed.tensor`` registers a strategy function per ATen op (``op_strategy_funcs`` of DTensor's
sharding propagator). For an op without an autopar rule, ``dtensor_rule`` asks that function for the
op's 1-D strategies on a mesh dim of size ``n`` (a DeviceMesh built without a process group: the strategy
functions read only its shape), offering every tensor input replicated or sharded on any dim, and keeps
the strategies whose placements are all Replicate / Shard / Partial(sum) on the graph's tensors. The
parallel module runs the plain op on local shards, which is what DTensor's rule describes for these
placements. Only ops in ``VETTED`` are taken from DTensor: each is checked strategy by strategy against
one device by tests/test_strategy_registry.py (a DTensor rule that assumes a decomposition or a
redistribute inside the op would be silently wrong on local shards); every other op without a rule stays
on the replicate fallback, reported in the plan's ``nodes_fallback``. Registered like autopar's own rules.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec
from torch.distributed.tensor._dtensor_spec import TensorMeta as DTMeta
from torch.distributed.tensor._op_schema import OpSchema, OpSpec, OpStrategy

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Partial, Replicate, Shard
from autopar.solver.strategies.base import Strategy1D, register

log = logging.getLogger(__name__)
aten = torch.ops.aten

# DTensor rules taken as they are: each has a forced-strategy case in tests/strategy_cases.py
VETTED = frozenset({aten.topk.default, aten.gather.default, aten.scatter_add.default, aten.argmax.default,
                    aten.cumsum.default, aten.sort.default})


@functools.lru_cache(maxsize=16)
def _mesh(n: int):
    return DeviceMesh("cpu", torch.arange(n), _init_backend=False, _rank=0)


def _ok(p) -> bool:
    """Plain placements only: DTensor's subclasses (e.g. the masked partial of a vocabulary-split gather) mean
    work inside DTensor's op that a plain op on local shards does not do."""
    return type(p) in (Replicate, Shard) or (type(p) is Partial and p.reduce_op == "sum")


@register(*sorted(VETTED, key=str))
def dtensor_rule(node: GNode, n: int, in_metas: list[TensorMeta]) -> list[Strategy1D]:
    """1-D strategies of ``node`` from DTensor's rule ([] when DTensor has none or the op is not vetted)."""
    if node.target not in VETTED or node.fx_node is None:
        return []
    funcs = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
    if node.target not in funcs:
        return []
    mesh = _mesh(n)

    def strategy_of(a):
        if not (isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)):
            return a.meta.get("val") if isinstance(a, fx.Node) else a
        v = a.meta["val"]
        meta = DTMeta(v.shape, v.stride(), v.dtype)
        places = [Replicate()] + [Shard(d) for d in range(v.dim())]
        return OpStrategy([OpSpec(DTensorSpec(mesh, (p,), tensor_meta=meta)) for p in places])

    args, kwargs = pytree.tree_map(strategy_of, (tuple(node.fx_node.args), dict(node.fx_node.kwargs)))
    try:
        out = funcs[node.target](OpSchema(node.target, args, kwargs))
    except Exception as e:   # a rule that cannot take these arguments: the replicate fallback
        log.info("DTensor's rule for %s failed (%s: %s)", node.target, type(e).__name__, e)
        return []
    res = []
    for spec in out.strategies:
        outs = spec.output_specs if isinstance(spec.output_specs, (tuple, list)) else (spec.output_specs,)
        ins = tuple(s.placements[0] for s in (spec.input_specs or ()))
        if len(ins) != len(in_metas) or len(outs) != len(node.outputs):
            continue
        o = tuple(s.placements[0] if s is not None else Replicate() for s in outs)
        if all(_ok(p) for p in ins + o):
            res.append(Strategy1D(ins, o))
    return res
