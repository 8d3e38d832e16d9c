"""The bucketed gradient reducer in the sharding ILP (a part of solver.model's ShardingModel): the copy of
its last bucket on the step row.

The reducer (autopar.runtime.grad_sync) concatenates a full bucket of data-parallel gradients into a flat
buffer and makes the gradients views of it: for that moment a bucket exists twice. The last bucket is
launched at the end of backward, with every gradient live, so the step row holds min(data-parallel
gradient bytes, one bucket) more (a parameter larger than a bucket is a bucket alone, reduced without a
copy). A parameter's gradient reaches the reducer only where it is a partial sum: the parameter is
replicated on a mesh dim of size > 1 and an op reading it unchanged splits its work there
(runtime_rules.deferred_grads). ``collect`` (after the node and edge variables) gathers, per parameter
key and placement, its gradient bytes and the strategies of its consumers that make it a partial sum; a
parameter read through an op of parameters alone (a pass-through: its gradient may be deferred through
it) is counted wherever it is replicated, an upper bound. ZeRO-2 parameters reduce-scatter instead
(solver.zero_rows takes them off through ``exclude``); ``build`` (after ZeRO) adds the capped term to
MemCategory.GRAD_BUCKETS. Uses the model's public interface only.
"""
from __future__ import annotations

from collections import defaultdict

import pulp

from autopar.core.placement import Replicate
from autopar.core.runtime_rules import of_params_only
from autopar.solver import cost as C
from autopar.solver.model import UNIT, MemCategory, ShardingModel, value


class GradBuckets:
    def __init__(self, model: ShardingModel) -> None:
        self.model = model
        self.terms: list = []   # (gradient bytes, x or b) of the data-parallel gradients, set by build
        # per (param key, strategy): gradient bytes and, per consumer edge, the consumer strategies that make
        # the gradient a partial sum (None: counted wherever replicated)
        self._candidates: list[tuple[str, int, float, list[list] | None]] = []
        self._excluded: dict[tuple[str, int], list] = defaultdict(list)

    def collect(self) -> None:
        m = self.model
        uses: dict[str, list[tuple[str, int]]] = defaultdict(list)   # producer key -> uses of its output 0
        for ku, o, kv, a in m.gi.edge_classes():
            if o == 0:
                uses[ku].append((kv, a))
        self._uses = uses
        self._graph_outputs = {m.gi.nodes[r.src].key for r in m.gi.output_refs}
        for key, info in m.keys.items():
            if info.node.kind != "param":
                continue
            for j, s in enumerate(info.strategies):
                p = s.outputs[0]
                dims = [d for d, (pl, n) in enumerate(zip(p, m.mesh.shape)) if isinstance(pl, Replicate) and n > 1]
                if not dims:
                    continue
                nbytes = info.mult * info.memory[j][MemCategory.GRADS]
                self._candidates.append((key, j, nbytes, self._partial_uses(p, dims, uses[key])))

    def _partial_uses(self, p: tuple, dims: list[int], uses: list[tuple[str, int]], depth: int = 0
                      ) -> list[list] | None:
        """Per use of a parameter placed ``p``: the consumer's one-hots of the strategies that read it as ``p``
        and split their work on one of ``dims`` (its gradient then is a partial sum there). A use by an op of
        parameters alone (a pass-through, e.g. a weight's transpose) stands for its own uses, read replicated on
        one of ``dims`` and split there (the pass-through's placement itself is not followed); deeper chains,
        and a use as a graph output, are None (counted wherever replicated)."""
        m = self.model
        out = []
        for kv, a in uses:
            info = m.keys.get(kv)
            if info is None:
                return None
            if of_params_only(m.gi, info.node):
                if depth > 0 or len(info.node.outputs) != 1:
                    return None
                after = self._uses_of(kv)
                if after is None:
                    return None
                inner = self._partial_uses(None, dims, after, depth + 1)
                if inner is None:
                    return None
                out += inner
                continue
            xs = m.x[kv]
            out.append([xs[i] for i, s in enumerate(info.strategies)
                        if (s.inputs[a] == p or p is None)
                        and any(isinstance(s.inputs[a][d], Replicate) and s.split_dims()[d] for d in dims)])
        return out

    def _uses_of(self, key: str) -> list[tuple[str, int]] | None:
        """(consumer key, argument) of ``key``'s output; None where it is a graph output."""
        return None if key in self._graph_outputs else self._uses[key]

    def exclude(self, key: str, j: int, w) -> None:
        """The gradient of ``key`` placed as its strategy ``j`` is not bucketed where binary ``w`` is 1 (ZeRO-2:
        reduce-scattered by its own hook)."""
        self._excluded[(key, j)].append(w)

    def _bucketed_terms(self) -> list:
        """(bytes, variable) per candidate: x itself where every replicated placement counts, else one b >= 0
        with b >= x + sum(consumer one-hots of a use) - 1 - sum(ZeRO-2 w) per use (1 exactly when the placement
        is chosen, a use makes its gradient partial and ZeRO-2 does not take it; settled to that value)."""
        m = self.model
        terms = []
        for n, (key, j, nbytes, partial) in enumerate(self._candidates):
            x, off = m.x[key][j], self._excluded.get((key, j), [])
            if partial is None:
                terms += [(nbytes, x)] + [(-nbytes, w) for w in off]
                continue
            partial = [xs for xs in partial if xs]
            if not partial:
                continue   # no use splits its work where the parameter is replicated: nothing to reduce
            b = m.var(f"bucketed_{n}", lowBound=0)
            for u, xs in enumerate(partial):
                m.add_row(b >= x + pulp.lpSum(xs) - 1 - pulp.lpSum(off), f"bucketed_{n}_{u}")

            def settle(b=b, x=x, partial=partial, off=off) -> None:
                hit = value(x) > 0.5 and any(sum(value(v) for v in xs) > 0.5 for xs in partial)
                b.varValue = 1.0 if hit and not any(value(w) > 0.5 for w in off) else 0.0
            m.on_settle(settle)
            terms.append((nbytes, b))
        return terms

    def build(self) -> None:
        """B (MiB) >= min(sum of the collected gradient bytes, the largest bucket) on the step row: B >= G - M b,
        B >= cap b with one binary b (the solver takes the smaller); without a cap to reach, B is G itself.
        After solving, B settles at min(G, cap) (the solver may leave it higher where it does not bind)."""
        m = self.model
        self.terms = terms = self._bucketed_terms()
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
