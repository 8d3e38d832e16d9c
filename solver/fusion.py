"""Fused kernels in the cost model: ops of the captured graph that run as one kernel share its traffic.

The front end recognizes the fusible groups on the captured graph (codegen's ``find_fusions``; the
solver must not import codegen) and passes them here as plain data, ``{"kind": str, "nodes": [fx
node names]}`` with the group's root (the node whose value the kernel returns) last. ``fuse_costs``
replaces the compute cost of every graph key with a member in a group by that member's share of the
fused kernel (``cost.fused_compute_cost``: inputs from outside the group read once, values that
leave the group written once, one op overhead per kernel); ``fusion_records`` lists the groups by
graph key with their count in the full model and the time they save under the chosen strategies.

A key stands for several captured nodes when blocks are identical; where those nodes fuse
differently (the first block's norm reads the embedding, every later one a residual sum it fuses
with), the key's cost is their average weighted by how many nodes of the full model each stands
for: a folded capture's last captured block stands for every block after it, and a member of a
group for as many as its group's root (the last captured block's residual add, which fuses with the
final norm, stands for that one add; block 0's, which fuses with block 1's norm, for all the others).

The ILP costs a group as fused whatever the placements of its ops, but codegen fuses only where no
reshard sits between them: after the solve, ``unfuse_broken`` costs the groups the chosen placements
reshard inside as unfused ops again (the predicted times follow; the plan does not list them). The
ILP's choice itself did not see the break. Must not import codegen.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from autopar.core.errors import ConfigError
from autopar.core.graph import GNode, GraphIndex
from autopar.solver import cost as C
from autopar.solver.keys import OUTPUT
from autopar.solver.strategies import Strategy


@dataclass(frozen=True, kw_only=True)
class Share:
    """One member's part of its fused kernel: which inputs it reads, which outputs it writes."""
    kind: str
    group: int                     # index of the group in the front end's list
    root: str                      # the group's root node
    reads: tuple[bool, ...]        # per tensor input (GNode.inputs order)
    writes: tuple[bool, ...]       # per output
    launch: bool                   # the group's root: pays the kernel's op overhead


def check_fusions(fusions: object) -> list[tuple[str, tuple[str, ...]]]:
    """The front end's list as (kind, node names); anything else is a ConfigError."""
    if not isinstance(fusions, Sequence) or isinstance(fusions, (str, bytes)):
        raise ConfigError(f"fusions must be a list of {{'kind': str, 'nodes': [node names]}}, "
                          f"got {type(fusions).__name__}")
    out = []
    for i, f in enumerate(fusions):
        kind = f.get("kind") if isinstance(f, Mapping) else None
        nodes = f.get("nodes") if isinstance(f, Mapping) else None
        if not isinstance(kind, str) or not isinstance(nodes, Sequence) or isinstance(nodes, str) or not nodes \
                or not all(isinstance(n, str) for n in nodes):
            raise ConfigError(f"fusions[{i}] must be {{'kind': str, 'nodes': [node names, root last]}}, got {f!r:.80}")
        out.append((kind, tuple(nodes)))
    return out


def shares(gi: GraphIndex, fusions: Sequence[tuple[str, tuple[str, ...]]]) -> dict[str, Share]:
    """Node name -> its Share, for every member of every group (names the index lacks are skipped:
    asserts and other ops without tensor outputs move no data)."""
    consumers: dict[tuple[str, int], set[str]] = defaultdict(set)
    for v in gi.nodes.values():
        for ref in v.inputs:
            consumers[(ref.src, ref.out)].add(v.name)
    for ref in gi.output_refs:
        consumers[(ref.src, ref.out)].add(OUTPUT)
    position = {name: i for i, name in enumerate(gi.nodes)}
    out: dict[str, Share] = {}
    for gid, (kind, names) in enumerate(fusions):
        members = [n for n in names if n in gi.nodes]
        if not members:
            continue
        root, group, seen = members[-1], set(members), set()
        for name in sorted(members, key=position.__getitem__):
            node = gi.nodes[name]
            reads = []
            for ref in node.inputs:   # each outside tensor is read once per kernel, by its first reader
                reads.append(ref.src not in group and (ref.src, ref.out) not in seen)
                if ref.src not in group:
                    seen.add((ref.src, ref.out))
            writes = tuple(bool(consumers[(name, i)] - group) for i in range(len(node.outputs)))
            out[name] = Share(kind=kind, group=gid, root=root, reads=tuple(reads), writes=writes, launch=name == root)
    return out


def node_weights(gi: GraphIndex) -> dict[str, float]:
    """Node name -> how many nodes of the full model it stands for (a folded capture's last captured
    block stands for itself and every block after it)."""
    out: dict[str, float] = {}
    for members in gi.by_key().values():
        lay = members[0].layer
        if lay is None or lay[0] not in gi.shared_lists:
            out.update((m.name, 1.0) for m in members)
            continue
        n, k = gi.layer_counts[lay[0]], gi.observed_counts[lay[0]]
        last = max(m.layer[1] for m in members)
        out.update((m.name, float(n - k + 1) if m.layer[1] == last else 1.0) for m in members)
    return out


def _weight(name: str, sh: dict[str, Share], weights: dict[str, float]) -> float:
    """A member of a group stands for as many nodes as the group has instances: its root's weight (the
    last captured block's residual add fuses with the final norm once, the others with the next block's)."""
    return weights[sh[name].root] if name in sh else weights[name]


def _member_cost(m: GNode, s: Strategy, info, share: Share | None, profile, mesh_shape, j: int) -> C.OpCost:
    if share is None:
        return info.compute[j]
    return C.fused_compute_cost(m, s, info.in_metas, profile, mesh_shape, reads=share.reads, writes=share.writes,
                                launch=share.launch)


def fuse_costs(gi: GraphIndex, keys: dict, sh: dict[str, Share], profile, mesh_shape: tuple[int, ...],
               groups: dict[str, Share] | None = None) -> dict[str, list[C.OpCost]]:
    """Replace ``keys[k].compute`` (keys.KeyInfo) of every key with a fused member by the members' fused
    costs (weighted as in the module docstring); returns the unfused costs of the keys it changed.
    ``groups`` (default ``sh``): the shares that weigh the members, a superset of ``sh`` when some
    groups are costed unfused but still say how many nodes their members stand for."""
    unfused: dict[str, list[C.OpCost]] = {}
    weights = node_weights(gi)
    groups = sh if groups is None else groups
    for key, members in gi.by_key().items():
        info = keys.get(key)
        if info is None or not any(m.name in groups for m in members):
            continue
        w = [_weight(m.name, groups, weights) for m in members]
        total = sum(w)
        new = []
        for j, s in enumerate(info.strategies):
            costs = [_member_cost(m, s, info, sh.get(m.name), profile, mesh_shape, j) for m in members]
            new.append(C.OpCost(sum(wi * c.fwd_s for wi, c in zip(w, costs)) / total,
                                sum(wi * c.bwd_s for wi, c in zip(w, costs)) / total))
        unfused[key], info.compute = info.compute, new
    return unfused


def fusion_records(gi: GraphIndex, keys: dict, sh: dict[str, Share], unfused: dict[str, list[C.OpCost]],
                   chosen: dict[str, Strategy], profile, mesh_shape: tuple[int, ...]) -> list[dict]:
    """One record per distinct group (by graph keys): ``kind``, ``root`` and ``nodes`` (graph keys, root
    last), ``count`` (instances in the full model) and ``time_saved_s`` (fwd + bwd compute seconds the
    fused kernels save over the unfused ops under the chosen strategies, all instances)."""
    weights = node_weights(gi)
    groups: dict[int, list[GNode]] = defaultdict(list)
    for name, s in sh.items():
        groups[s.group].append(gi.nodes[name])
    records: dict[tuple, dict] = {}
    for gid in sorted(groups):
        members = groups[gid]
        root = next(m for m in members if sh[m.name].launch)
        members = [m for m in members if m is not root] + [root]
        saved = 0.0
        for m in members:
            info, strat = keys[m.key], chosen[m.key]
            j = info.strategies.index(strat)
            fused = _member_cost(m, strat, info, sh[m.name], profile, mesh_shape, j)
            saved += unfused[m.key][j].total - fused.total
        weight = weights[root.name]
        sig = (sh[root.name].kind, tuple(m.key for m in members))
        rec = records.setdefault(sig, {"kind": sig[0], "root": root.key, "nodes": list(sig[1]), "count": 0,
                                       "time_saved_s": 0.0})
        rec["count"] += int(weight)
        rec["time_saved_s"] += weight * saved
    return list(records.values())


def broken_groups(gi: GraphIndex, sh: dict[str, Share], chosen: dict[str, Strategy]) -> set[int]:
    """Groups with a placement change between two of their ops under the chosen strategies: codegen
    fuses on the graph with the reshards inserted, where such a group no longer matches."""
    out = set()
    for name, s in sh.items():
        v = gi.nodes[name]
        for a, ref in enumerate(v.inputs):
            src = sh.get(ref.src)
            if src is not None and src.group == s.group and \
                    chosen[gi.nodes[ref.src].key].outputs[ref.out] != chosen[v.key].inputs[a]:
                out.add(s.group)
    return out


def unfuse_broken(gi: GraphIndex, keys: dict, sh: dict[str, Share], unfused: dict[str, list[C.OpCost]],
                  chosen: dict[str, Strategy], remat: dict[str, tuple[int, int]], profile,
                  mesh_shape: tuple[int, ...]) -> tuple[dict[str, Share], dict[str, list[C.OpCost]], float, float]:
    """After the solve: cost the broken groups' ops unfused again (as codegen will run them). Returns
    the remaining shares, their keys' unfused costs, and the change of the predicted compute and
    recompute seconds (a recomputed block runs its forward again: remat = list -> (full, selective))."""
    broken = broken_groups(gi, sh, chosen)
    if not broken:
        return sh, unfused, 0.0, 0.0
    before = {k: keys[k].compute for k in unfused}
    for k, costs in unfused.items():
        keys[k].compute = costs
    kept = {n: s for n, s in sh.items() if s.group not in broken}
    unfused_kept = fuse_costs(gi, keys, kept, profile, mesh_shape, groups=sh)
    d_compute = d_recompute = 0.0
    for k, old in before.items():
        info = keys[k]
        j = info.strategies.index(chosen[k])
        d_compute += info.mult * (info.compute[j].total - old[j].total)
        lay = info.node.layer
        if info.node.kind == "op" and lay is not None and lay[0] in remat:
            d_recompute += info.mult / gi.layer_counts[lay[0]] * (info.compute[j].fwd_s - old[j].fwd_s) * sum(remat[lay[0]])
    return kept, unfused_kept, d_compute, d_recompute
