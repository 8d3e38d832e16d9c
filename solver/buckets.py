"""The bucketed gradient reducer in the sharding ILP (a part of solver.model's ShardingModel): the copy of
its last bucket on the step row.

The reducer (autopar.runtime.grad_sync) concatenates a full bucket of data-parallel gradients into a flat
buffer and makes the gradients views of it: for that moment a bucket exists twice. The last bucket is
launched at the end of backward, with every gradient live, so the step row holds min(data-parallel
gradient bytes, one bucket) more (a parameter larger than a bucket is a bucket alone, reduced without a
copy). ``collect`` (after the node variables) gathers the gradient bytes per parameter key and placement
with a replicated mesh dim of size > 1 (where the gradient is a partial sum when the batch is split
there); ZeRO-2 parameters reduce-scatter instead (solver.zero_rows takes them off through ``add``);
``build`` (after ZeRO) adds the capped term to MemCategory.GRAD_BUCKETS. Uses the model's public
interface only.
"""
from __future__ import annotations

import pulp

from autopar.core.placement import Replicate
from autopar.solver import cost as C
from autopar.solver.model import UNIT, MemCategory, ShardingModel


class GradBuckets:
    def __init__(self, model: ShardingModel) -> None:
        self.model = model
        self.terms: list = []   # (gradient bytes, x or ZeRO-2 w) of the data-parallel gradients

    def collect(self) -> None:
        m = self.model
        for key, info in m.keys.items():
            if info.node.kind != "param":
                continue
            for j, s in enumerate(info.strategies):
                if any(isinstance(p, Replicate) and n > 1 for p, n in zip(s.outputs[0], m.mesh.shape)):
                    self.terms.append((info.mult * info.memory[j][MemCategory.GRADS], m.x[key][j]))

    def add(self, terms: list) -> None:
        """More (bytes, variable) terms of the gradients the reducer buckets (negative: taken off)."""
        self.terms += terms

    def build(self) -> None:
        """B (MiB) >= min(sum of the collected gradient bytes, the largest bucket) on the step row: B >= G - M b,
        B >= cap b with one binary b (the solver takes the smaller); without a cap to reach, B is G itself.
        After solving, B settles at min(G, cap) (the solver may leave it higher where it does not bind)."""
        m, terms = self.model, self.terms
        most = sum(max(c, 0.0) for c, _ in terms)
        if most <= C.GRAD_BUCKET_BYTES:
            m.add_mem(MemCategory.GRAD_BUCKETS, terms)
            return
        cap, big = C.GRAD_BUCKET_BYTES / UNIT, most / UNIT
        copy = m.var("bucket_copy", lowBound=0)
        capped = m.var("bucket_capped", cat="Binary")
        grads = pulp.lpSum(c * v for c, v in terms) * (1 / UNIT)
        m.add_row(copy >= grads - big * capped, "bucket_copy_grads")
        m.add_row(copy >= cap * capped, "bucket_copy_cap")
        m.add_mem(MemCategory.GRAD_BUCKETS, [(UNIT, copy)])
        m.on_settle(lambda: setattr(copy, "varValue", max(0.0, min(float(pulp.value(grads) or 0.0), cap))))
