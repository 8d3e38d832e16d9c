"""ZeRO-1/2 decisions of the sharding ILP (a part of solver.model's ShardingModel): optimizer states (and
gradients) sharded over a parameter's replicated mesh dims, per parameter key and placement.

``ZeroRows.build`` requires the node variables (solver.ilp's add_node_vars: the optimizer and gradient
terms of MemCategory.OPTIMIZER / GRADS) and the data-parallel gradients of solver.buckets (collected,
not yet capped: GradBuckets.build runs after it). Ensures: binaries w1, w2 per (key, placement) with
their rows; negative memory terms (the shares ZeRO takes off) in OPTIMIZER and GRADS, ZeRO-2 gradients
excluded from the buckets (GradBuckets.exclude); the
all-gather / reduce-scatter time in TimeCategory.COMM; ``choice`` reads the decision after solving.
ZeRO-3 is not here: it is a sharded parameter placement, priced on the edges. Uses the model's public
interface only; must not import codegen.
"""
from __future__ import annotations

import pulp

from autopar.core.placement import Partial, zero_sharding
from autopar.solver import cost as C
from autopar.solver.buckets import GradBuckets
from autopar.solver.model import MemCategory, ShardingModel, TimeCategory, value


class ZeroRows:
    """The ZeRO part of the ILP. ``zero``: autopar.plan's told stage (0, 1, 2) or None (the solver decides)."""

    def __init__(self, model: ShardingModel, buckets: GradBuckets, *, zero: int | None) -> None:
        self.model, self.buckets, self.zero = model, buckets, zero
        self.vars: dict[str, list[tuple[int, tuple, pulp.LpVariable, pulp.LpVariable]]] = {}

    def build(self) -> None:
        """ZeRO-1/2 per parameter key k and placement s with a ZeRO sharding z(s) (placement.zero_sharding:
        its replicated mesh dims, n_s ways): binaries w1_{k,s} + w2_{k,s} <= x_{k,s}. Per rank they take
        (1 - 1/n_s) of the optimizer state (w1, w2) and of the gradient (w2) off the memory rows, and add
        to the objective the all-gather of the stepped parameter, AG(z(s) -> s), for both, and for ZeRO-2
        the reduce-scatter RS(P -> z(s)) its hook runs inside backward, in full: the all-reduce it
        replaces overlapped backward in the bucketed reducer (autopar.runtime.grad_sync), so dropping it saves
        little step time; the edges keep pricing it (an upper bound for ZeRO-2's step time).
        Decided per key: identical repeated blocks share it, as they share placements; a per-parameter
        choice lets the solver shard just enough of the optimizer state. ``zero`` given: w_zero = x."""
        if self.zero == 0:
            return
        m = self.model
        for i, (key, info) in enumerate(m.keys.items()):
            if info.node.kind != "param" or key in m.merged:
                continue
            meta = info.node.outputs[0]
            rows = []
            for j, s in enumerate(info.strategies):
                sh = s.outputs[0]
                zs = zero_sharding(meta.shape, sh, m.mesh.shape)
                if zs is None:
                    continue
                ways = C.shard_factor(zs, m.mesh.shape) // C.shard_factor(sh, m.mesh.shape)
                mem = info.memory[j]
                partial = tuple(Partial("sum") if a != b else a for a, b in zip(sh, zs))
                ag = C.transition_time(meta, zs, sh, m.mesh.shape, m.links)
                rs = C.transition_time(meta, partial, zs, m.mesh.shape, m.links)
                w1 = m.var(f"z1_{i}_{j}", cat="Binary")
                w2 = m.var(f"z2_{i}_{j}", cat="Binary")
                m.add_row(w1 + w2 <= m.x[key][j], f"zero_{i}_{j}")
                if self.zero is not None:
                    m.add_row((w1 if self.zero == 1 else w2) == m.x[key][j], f"zero_told_{i}_{j}")
                keep = 1.0 - 1.0 / ways
                opt, grads = mem[MemCategory.OPTIMIZER], mem[MemCategory.GRADS]
                m.add_mem(MemCategory.OPTIMIZER, [(-info.mult * keep * opt, w1), (-info.mult * keep * opt, w2)])
                m.add_mem(MemCategory.GRADS, [(-info.mult * keep * grads, w2)])
                self.buckets.exclude(key, j, w2)
                m.add_time(TimeCategory.COMM, [(info.mult * ag, w1), (info.mult * (ag + rs), w2)])
                rows.append((j, zs, w1, w2))
            if rows:
                self.vars[key] = rows

    def exclude_host_optimizer(self, offload_switch: pulp.LpVariable | None) -> None:
        """Optimizer states either move to the host (HostOptimizer, binary ``offload_switch``) or are sharded
        (ZeRO-1/2), not both: the runtimes do not compose. One row, sum w <= W (1 - z) with W the number of
        ZeRO binaries."""
        ws = [w for rows in self.vars.values() for _, _, w1, w2 in rows for w in (w1, w2) if w is not None]
        if ws and offload_switch is not None:
            self.model.add_row(pulp.lpSum(ws) <= len(ws) * (1 - offload_switch), "zero_or_offload")

    def choice(self) -> dict[str, tuple[int, tuple]]:
        """After solving: param key -> (ZeRO stage, ZeRO sharding) where ZeRO was chosen."""
        out = {}
        for key, rows in self.vars.items():
            for j, zs, w1, w2 in rows:
                if value(w1) > 0.5:
                    out[key] = (1, zs)
                elif value(w2) > 0.5:
                    out[key] = (2, zs)
        return out
