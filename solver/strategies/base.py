"""Strategy types, the registry, and the one helper that extends 1-D rules to N-D meshes.

A rule is written for a single mesh dimension of size ``n``: it lists ``Strategy1D`` choices
(one placement per tensor input and per tensor output). ``expand_to_mesh`` takes the cartesian
product over mesh dims and keeps the combinations in which every sharded tensor dim divides
evenly by the product of the mesh sizes sharding it (uneven shards are not planned).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Partial, Placement, Replicate, Shard, format_placement

log = logging.getLogger(__name__)
R = Replicate()
P_SUM = Partial("sum")
P_AVG = Partial("avg")


@dataclass(frozen=True)
class Strategy1D:
    inputs: tuple[Placement, ...]
    outputs: tuple[Placement, ...]


@dataclass(frozen=True)
class Strategy:
    """An N-D choice: per tensor input and output, one placement per mesh dim."""

    inputs: tuple[tuple[Placement, ...], ...]
    outputs: tuple[tuple[Placement, ...] | None, ...]

    def split_dims(self) -> tuple[bool, ...]:
        """Per mesh dim: does this strategy divide the work (any placement not Replicate)?"""
        ndim = len(next(iter(self.inputs + tuple(o for o in self.outputs if o is not None)), ()))
        return tuple(any(not isinstance(t[d], Replicate) for t in self.inputs + tuple(
            o for o in self.outputs if o is not None)) for d in range(ndim))

    def label(self) -> str:
        f = lambda sh: "·".join(format_placement(p) for p in sh) if sh is not None else "-"
        return f"{', '.join(f(s) for s in self.inputs)} -> {', '.join(f(s) for s in self.outputs)}"


Rule = Callable[[GNode, int, list[TensorMeta]], list[Strategy1D]]
_RULES: dict[object, Rule] = {}


def register(*targets: object) -> Callable[[Rule], Rule]:
    """Register a 1-D rule for ATen overloads (decorator)."""
    def deco(fn: Rule) -> Rule:
        for t in targets:
            _RULES[t] = fn
        return fn
    return deco


def registered_rules() -> dict[object, Rule]:
    return dict(_RULES)


def rule_for(node: GNode) -> Rule | None:
    r = _RULES.get(node.target)
    if r is None and isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
        r = _RULES.get("pointwise")
    return r


# --- helpers shared by rules --------------------------------------------------------------
def replicate_all(node: GNode) -> Strategy1D:
    return Strategy1D(tuple(R for _ in node.inputs), tuple(R if o is not None else R for o in node.outputs))


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def in_meta(node: GNode, graph_nodes: dict[str, GNode], i: int) -> TensorMeta:
    ref = node.inputs[i]
    return graph_nodes[ref.src].outputs[ref.out]


def broadcast_placement(p: Placement, out_ndim: int, in_shape: tuple[int, ...]) -> Placement:
    """The placement an input broadcast into an output of ``out_ndim`` dims needs for output placement ``p``."""
    if isinstance(p, Shard):
        d = p.dim - (out_ndim - len(in_shape))
        if d < 0 or in_shape[d] == 1:
            return R
        return Shard(d)
    return p


def einsum_strategies(spec: str, *, linear_partial: bool = True) -> list[tuple[tuple[Placement, ...], Placement]]:
    """Strategies of a contraction written as "bmk,bkn->bmn": shard a kept letter everywhere it
    appears, shard a contracted letter (output Partial), or replicate; with ``linear_partial`` a
    Partial operand times Replicate operands gives Partial."""
    lhs, out = spec.split("->")
    ins = lhs.split(",")
    res: list[tuple[tuple[Placement, ...], Placement]] = [(tuple(R for _ in ins), R)]
    for letter in dict.fromkeys("".join(ins)):
        pls = tuple(Shard(s.index(letter)) if letter in s else R for s in ins)
        res.append((pls, Shard(out.index(letter)) if letter in out else P_SUM))
    if linear_partial:
        for i in range(len(ins)):
            res.append((tuple(P_SUM if j == i else R for j in range(len(ins))), P_SUM))
    return res


# --- N-D expansion --------------------------------------------------------------------------
def _divisible(meta: TensorMeta | None, placements: tuple[Placement, ...], mesh_shape: tuple[int, ...]) -> bool:
    if meta is None:
        return True
    split = [1] * len(meta.shape)
    for p, n in zip(placements, mesh_shape):
        if isinstance(p, Shard):
            d = norm_dim(p.dim, len(meta.shape))
            if not 0 <= d < len(meta.shape):
                return False
            split[d] *= n
    return all(s % k == 0 for s, k in zip(meta.shape, split))


def _normalize(p: Placement, meta: TensorMeta | None) -> Placement:
    if isinstance(p, Shard) and meta is not None and p.dim < 0:
        return Shard(p.dim + len(meta.shape))
    return p


def expand_to_mesh(node: GNode, in_metas: list[TensorMeta], per_dim: list[list[Strategy1D]],
                   mesh_shape: tuple[int, ...]) -> list[Strategy]:
    """Cartesian product of 1-D strategies over mesh dims, keeping evenly divisible ones."""
    out: list[Strategy] = []
    seen = set()
    for combo in itertools.product(*per_dim):
        ins = tuple(tuple(_normalize(c.inputs[i], in_metas[i]) for c in combo) for i in range(len(node.inputs)))
        outs = tuple(tuple(_normalize(c.outputs[j], node.outputs[j]) for c in combo)
                     if node.outputs[j] is not None else None for j in range(len(node.outputs)))
        if not all(_divisible(m, s, mesh_shape) for m, s in zip(in_metas, ins)):
            continue
        if not all(_divisible(m, s, mesh_shape) for m, s in zip(node.outputs, outs) if s is not None):
            continue
        key = (ins, outs)
        if key not in seen:
            seen.add(key)
            out.append(Strategy(inputs=ins, outputs=outs))
    return out


def strategies_for(node: GNode, graph_nodes: dict[str, GNode], mesh_shape: tuple[int, ...]) -> tuple[list[Strategy], bool]:
    """All N-D strategies of a node; the flag says the replicate fallback was used."""
    in_metas = [in_meta(node, graph_nodes, i) for i in range(len(node.inputs))]
    rule = rule_for(node)
    fallback = rule is None
    per_dim: list[list[Strategy1D]] = []
    for n in mesh_shape:
        choices = [replicate_all(node)]
        if n == 1:  # a mesh dim of size one splits nothing: only the replicated choice
            per_dim.append(choices)
            continue
        if rule is not None:
            try:
                choices = rule(node, n, in_metas) or choices
            except (IndexError, KeyError, TypeError, ValueError) as e:
                log.warning("rule for %s failed (%s); replicating it", node.key, e)
                fallback = True
        if not any(all(isinstance(p, Replicate) for p in c.inputs + c.outputs) for c in choices):
            choices = [replicate_all(node)] + list(choices)
        per_dim.append(choices)
    strategies = expand_to_mesh(node, in_metas, per_dim, mesh_shape)
    if fallback:
        log.info("no sharding rule for %s (%s): replicated", node.key, node.target)
    return strategies, fallback


def all_placements(ndim: int, *, partial: bool = True) -> list[Placement]:
    pls: list[Placement] = [R] + [Shard(d) for d in range(ndim)]
    return pls + [P_SUM] if partial else pls


def identity_rule(node: GNode, n: int, in_metas: list[TensorMeta], *, partial: bool = True) -> list[Strategy1D]:
    """Single-input, single-output ops whose output dims are the input dims (clone, getitem, dropout...)."""
    meta = node.outputs[0]
    if meta is None:
        return []
    return [Strategy1D((p,) + (R,) * (len(node.inputs) - 1), (p,) * len(node.outputs))
            for p in all_placements(len(meta.shape), partial=partial)]
