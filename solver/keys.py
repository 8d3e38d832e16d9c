"""Graph keys and their candidates: strategies, compute and memory per strategy, before any ILP is built.

``collect_keys`` turns an indexed graph into one ``KeyInfo`` per graph key (identical repeated layers
share a key): the strategies the op rules offer (less those ``fix`` / ``prefer`` rule out), their compute
cost and their memory by category (model.MemCategory via cost.param_state_bytes / saved_bytes), and what
autograd keeps of each output (solver.saved's kept_by). ``kept_copy`` says how a resharded copy on an
edge stays for backward. Imports autopar's core and the solver's strategies and cost model only.
"""
from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, field

from autopar.cluster.profile import ClusterProfile
from autopar.core.errors import ConfigError, ShardingError
from autopar.core.graph import GNode, GraphIndex, TensorMeta
from autopar.core.mesh import MeshSpec
from autopar.core.placement import Placement, Replicate, Shard, parse_sharding
from autopar.solver import cost as C
from autopar.solver.categories import MemCategory
from autopar.solver.saved import Saved
from autopar.solver.strategies import Strategy, strategies_for
from autopar.solver.strategies.base import in_meta
from autopar.solver.strategies.norm import splits_hidden, stat_collectives

OUTPUT = "__output__"   # the consumer of an edge into the graph's output


@dataclass
class KeyInfo:
    key: str
    node: GNode
    mult: float
    strategies: list[Strategy]
    fallback: bool
    in_metas: list[TensorMeta]
    compute: list[C.OpCost] = field(default_factory=list)
    memory: list[dict[MemCategory, float]] = field(default_factory=list)   # per strategy: bytes by category
    # output index -> (the producer keeps it itself, {(consumer key, argument)} through which the tensor
    # autograd keeps left it: solver.saved's kept_by); None where not traced
    kept_by: dict[int, tuple[bool, frozenset[tuple[str, int]]]] | None = None
    # the outputs autograd keeps as they are (solver.saved's Saved.outputs: not a view's or a copy's root);
    # None where not traced
    kept_outputs: frozenset[int] | None = None
    remat_extra: C.OpCost = C.OpCost(0.0, 0.0)   # per occurrence: selective (fwd_s) / full (bwd_s) surcharge
    # per strategy: the part of the activation bytes that is autocast's kept copies of float32 arguments
    # (cost.cast_bytes; mixed precision), which selective recompute recomputes; empty: none
    cast_bytes: list[float] = field(default_factory=list)



def _placeholder_strategies(meta: TensorMeta, mesh_shape: tuple[int, ...]) -> list[Strategy]:
    opts: list[Placement] = [Replicate()] + [Shard(d) for d in range(len(meta.shape))]
    out = []
    for combo in itertools.product(*[opts if n > 1 else [Replicate()] for n in mesh_shape]):
        split = [1] * len(meta.shape)
        for p, n in zip(combo, mesh_shape):
            if isinstance(p, Shard):
                split[p.dim] *= n
        if all(s % k == 0 for s, k in zip(meta.shape, split)):
            out.append(Strategy(inputs=(), outputs=(tuple(combo),)))
    return out


def _on_mesh(target: tuple[Placement, ...], mesh_shape: tuple[int, ...]) -> tuple[Placement, ...]:
    """A split or partial sum over a mesh dim of size 1 is the whole tensor: Replicate (so a plan's
    ``fix`` written for data parallelism also applies on a mesh of one device)."""
    return tuple(Replicate() if n == 1 else p for p, n in zip(target, mesh_shape))


def match_fix(key: str, node: GNode, fix: dict[str, list[str]], used: set[str] | None = None
               ) -> tuple[str, ...] | None:
    """The placements of the first pattern matching the key, an FQN or ``param:<fqn>`` (first wins)."""
    names = [key] + [f"{node.kind}:{f}" for f in node.fqns] + list(node.fqns)
    for pat, sh in fix.items():
        if any(fnmatch.fnmatchcase(n, pat) for n in names):
            if used is not None:
                used.add(pat)
            return tuple(sh)
    return None


def _with_own_collectives(cost: C.OpCost, node: GNode, s: Strategy, in_metas, mesh: MeshSpec,
                          profile: ClusterProfile) -> C.OpCost:
    """An op's compute plus the collectives its sharded form runs itself (a norm over a split hidden dim:
    its statistics' all-reduces, solver.strategies.norm), on the mesh dims' links."""
    cols = stat_collectives(node, in_metas[0], s.inputs[0], mesh.shape) if node.kind == "op" and in_metas else []
    if not cols:
        return cost
    links = profile.dim_links(mesh)
    t = {ph: sum(C.collective_time(k, b, mesh.shape[d], links[d]) for p, k, d, b in cols if p == ph)
         for ph in ("fwd", "bwd")}
    return C.OpCost(cost.fwd_s + t["fwd"], cost.bwd_s + t["bwd"])


def collect_keys(gi: GraphIndex, mesh: MeshSpec, profile: ClusterProfile,
                 fix: dict[str, list[str]] | None = None, prefer: dict[str, list[str]] | None = None,
                 saved: dict[str, Saved] | None = None, training: bool = True) -> dict[str, KeyInfo]:
    """Candidate strategies with their compute and memory per graph key. ``saved``: what autograd
    keeps per node (solver.saved.saved_tensors); without it every op is assumed to keep its outputs.
    ``training=False`` (an inference plan): a parameter's memory is its own bytes alone (no gradient, no
    optimizer state) and no op keeps anything for backward (the forward's live activations are the ILP's
    solver.forward_memory); compute keeps both directions, the ILP reads the forward's."""
    keys: dict[str, KeyInfo] = {}
    used: set[str] = set()
    for key, members in gi.by_key().items():
        node = members[0]
        in_metas = [in_meta(node, gi.nodes, i) for i in range(len(node.inputs))]
        if node.kind == "op":
            strategies, fallback = strategies_for(node, gi.nodes, mesh.shape)
        else:
            strategies, fallback = _placeholder_strategies(node.outputs[0], mesh.shape), False
        want = match_fix(key, node, fix or {}, used)
        if want is not None:
            target = parse_sharding(list(want), field=f"fix[{key!r}]")
            if len(target) != mesh.ndim:
                raise ShardingError(f"fix for {key}: {list(want)} has {len(target)} placements for a "
                                    f"{mesh.ndim}-D mesh")
            target = _on_mesh(target, mesh.shape)
            kept = [s for s in strategies if s.outputs and s.outputs[0] == target]
            if not kept:
                raise ShardingError(
                    f"{key} cannot be placed {list(want)}: shape {node.outputs[0].shape if node.outputs[0] else '?'} "
                    f"does not split evenly over mesh {mesh.shape} that way (or the op has no such strategy); "
                    f"choose a placement whose sharded dims divide by the mesh sizes")
            strategies = kept
        elif node.kind == "op" and prefer:
            soft = match_fix(key, node, prefer, used)
            if soft is not None:
                target = _on_mesh(parse_sharding(list(soft), field=f"prefer[{key!r}]"), mesh.shape)
                kept = [s for s in strategies if s.outputs and s.outputs[0] == target]
                strategies = kept or strategies  # a preference the op cannot take is ignored
        if want is None and mesh.ndim >= 3 and node.kind == "op":
            # the hidden-split norm is left to layouts that pin it on meshes of 3+ dims: offered freely there it
            # more than doubles a norm's strategies, and the ILP of llama3-1b on (2, 2, 2) found no plan in 60 s
            # (122 s to the optimum without it)
            strategies = [s for s in strategies if not splits_hidden(node, s.inputs, in_metas[0] if in_metas else None)]
        info = KeyInfo(key=key, node=node, mult=gi.multiplicity(key, members), strategies=strategies,
                       fallback=fallback, in_metas=in_metas, remat_extra=C.checkpoint_overhead(node, profile.device))
        if saved is not None and training:
            info.kept_by = _kept_by(saved.get(node.name), gi)
            rec = saved.get(node.name)
            info.kept_outputs = rec.outputs if rec is not None else frozenset()
        for s in strategies:
            info.compute.append(_with_own_collectives(C.compute_cost(node, s, in_metas, profile, mesh.shape), node, s,
                                                      in_metas, mesh, profile))
            if not training:
                info.memory.append({MemCategory.PARAMS: C.local_bytes(node.outputs[0], s.outputs[0], mesh.shape)}
                                   if node.kind == "param" else {})
            elif node.kind == "param":
                info.memory.append({MemCategory.parse(cat): b for cat, b in
                                    C.param_state_bytes(node.outputs[0], s.outputs[0], mesh.shape).items()})
            elif saved is not None and node.kind in ("op", "input"):
                info.memory.append({MemCategory.ACTIVATIONS: C.saved_bytes(node, s, saved.get(node.name), mesh.shape)})
                rec = saved.get(node.name)
                if rec is not None and rec.casts:
                    info.cast_bytes.append(C.cast_bytes(s, rec, mesh.shape))
            elif node.kind == "op":
                info.memory.append({MemCategory.ACTIVATIONS: C.activation_bytes(node, s, mesh.shape)})
            else:
                info.memory.append({})
        keys[key] = info
    unused = [p for p in list(fix or {}) + list(prefer or {}) if p not in used]
    if unused:
        raise ConfigError(f"placement pattern(s) {unused} match no input, parameter or graph key (or an earlier "
                          f"pattern takes them); keys look like 'input:idx', 'param:blocks.0.attn.qkv.weight', "
                          f"'blocks.*/attn.qkv/linear#0' (see the plan's node_shardings)")
    return keys


def _kept_by(rec: Saved | None, gi: GraphIndex) -> dict[int, tuple[bool, frozenset[tuple[str, int]]]]:
    """solver.saved's kept_by of one node in graph keys: output -> (a copy comes on top of the producer's
    tensor: the producer keeps it too, or it is a view whose bytes are another node's and no copy replaces
    them; the consumer edges that keep it)."""
    out: dict[int, tuple[bool, set]] = {}
    for i, consumer, arg in (rec.kept_by if rec is not None else ()):
        _, via = out.setdefault(i, (i not in rec.outputs, set()))
        if consumer is None:
            out[i] = (True, via)
        elif consumer in gi.nodes:
            via.add((gi.nodes[consumer].key, arg))
    return {i: (own, frozenset(via)) for i, (own, via) in out.items()}


def keeps_param_copy(node: GNode) -> bool:
    return node.kind == "op" and node.target not in C.FREE_OPS


def kept_copy(u: KeyInfo, o: int, kv: str, a: int, consumer: KeyInfo | None) -> str | None:
    """How a resharded copy on edge (u, o) -> (kv, a) stays for backward: "only" (the consumer keeps the
    copy, the producer's own tensor is not kept: the copy replaces it), "also" (kept besides the
    producer's tensor, or a parameter's gathered copy), None (not kept)."""
    if consumer is None:
        return None
    if u.kept_by is None:   # not traced: a parameter's copy is kept by every op but free ones
        return "also" if u.node.kind == "param" and keeps_param_copy(consumer.node) else None
    own, via = u.kept_by.get(o, (False, frozenset()))
    if (kv, a) not in via:
        return None
    return "only" if u.node.kind != "param" and not own and len(via) == 1 else "also"
