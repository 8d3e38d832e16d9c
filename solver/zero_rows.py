"""ZeRO-1/2 decisions of the sharding ILP: optimizer states (and gradients) sharded over a parameter's
replicated mesh dims, per parameter key and placement.

Requires a ``solver.ilp.ShardingILP`` whose node variables exist (add_node_vars) and whose optimizer,
gradient terms are in ``ilp.mem_terms`` and bucket terms in ``ilp._bucket_terms`` (add_node_vars,
add_grad_buckets); ilp.add_bucket_copy runs after it.
Ensures: binaries w1, w2 per (key, placement) with their rows in ``ilp.prob``; negative memory terms
(the shares ZeRO takes off) in ``ilp.mem_terms`` and ``ilp._bucket_terms``; the all-gather / reduce-scatter time in
``ilp.time_terms["comm"]``; ``ilp._zero_vars`` for zero_choice after solving. ZeRO-3 is not here: it is a
sharded parameter placement, priced on the edges. Must not import codegen.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pulp

from autopar.placement import Partial, zero_sharding
from autopar.solver import cost as C

if TYPE_CHECKING:
    from autopar.solver.ilp import ShardingILP


def add_zero_vars(ilp: ShardingILP) -> None:
    """ZeRO-1/2 per parameter key k and placement s with a ZeRO sharding z(s) (placement.zero_sharding:
    its replicated mesh dims, n_s ways): binaries w1_{k,s} + w2_{k,s} <= x_{k,s}. Per rank they take
    (1 - 1/n_s) of the optimizer state (w1, w2) and of the gradient (w2) off the memory rows, and add
    to the objective the all-gather of the stepped parameter, AG(z(s) -> s), for both, and for ZeRO-2
    the reduce-scatter RS(P -> z(s)) its hook runs inside backward, in full: the all-reduce it
    replaces overlapped backward in the bucketed reducer (autopar.grad_sync), so dropping it saves
    little step time; the edges keep pricing it (an upper bound for ZeRO-2's step time).
    Decided per key: identical repeated blocks share it, as they share placements; a per-parameter
    choice lets the solver shard just enough of the optimizer state. ``zero`` given: w_zero = x."""
    if ilp.zero == 0:
        return
    for i, (key, info) in enumerate(ilp.keys.items()):
        if info.node.kind != "param" or key in ilp.merged:
            continue
        meta = info.node.outputs[0]
        rows = []
        for j, s in enumerate(info.strategies):
            sh = s.outputs[0]
            zs = zero_sharding(meta.shape, sh, ilp.mesh.shape)
            if zs is None:
                continue
            ways = C._shard_factor(zs, ilp.mesh.shape) // C._shard_factor(sh, ilp.mesh.shape)
            mem = info.memory[j]
            partial = tuple(Partial("sum") if a != b else a for a, b in zip(sh, zs))
            ag = C.transition_time(meta, zs, sh, ilp.mesh.shape, ilp.links)
            rs = C.transition_time(meta, partial, zs, ilp.mesh.shape, ilp.links)
            w1 = ilp._var(f"z1_{i}_{j}", cat="Binary")
            w2 = ilp._var(f"z2_{i}_{j}", cat="Binary")
            ilp.prob += w1 + w2 <= ilp.x[key][j], f"zero_{i}_{j}"
            if ilp.zero is not None:
                ilp.prob += (w1 if ilp.zero == 1 else w2) == ilp.x[key][j], f"zero_told_{i}_{j}"
            keep = 1.0 - 1.0 / ways
            ilp.mem_terms["optimizer"] += [(-info.mult * keep * mem["optimizer"], w1),
                                            (-info.mult * keep * mem["optimizer"], w2)]
            ilp.mem_terms["grads"].append((-info.mult * keep * mem["grads"], w2))
            ilp._bucket_terms.append((-info.mult * mem["grads"], w2))
            ilp.time_terms["comm"] += [(info.mult * ag, w1), (info.mult * (ag + rs), w2)]
            rows.append((j, zs, w1, w2))
        if rows:
            ilp._zero_vars[key] = rows


def exclude_zero_with_offload(ilp: ShardingILP) -> None:
    """Optimizer states either move to the host (HostOptimizer) or are sharded (ZeRO-1/2), not both:
    the runtimes do not compose. One row, sum w <= W (1 - z) with W the number of ZeRO binaries."""
    ws = [w for rows in ilp._zero_vars.values() for _, _, w1, w2 in rows for w in (w1, w2) if w is not None]
    if ws and ilp.opt_offload is not None:
        ilp.prob += pulp.lpSum(ws) <= len(ws) * (1 - ilp.opt_offload[0]), "zero_or_offload"


def zero_choice(ilp: ShardingILP, value) -> dict[str, tuple[int, tuple]]:
    """After solving: param key -> (ZeRO stage, ZeRO sharding) where ZeRO was chosen."""
    out = {}
    for key, rows in ilp._zero_vars.items():
        for j, zs, w1, w2 in rows:
            if value(w1) > 0.5:
                out[key] = (1, zs)
            elif value(w2) > 0.5:
                out[key] = (2, zs)
    return out
