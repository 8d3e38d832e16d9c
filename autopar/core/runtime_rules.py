"""What the runtime does, stated once for every part that must agree on it: the solver prices it, codegen
and the runtime do it, ``explain`` and the benchmarks count it.

* Collectives are ring collectives: ``ring_traffic(kind, n)`` is the bytes each rank moves per byte of the
  full (unsharded on that mesh dim) tensor. The cost model charges ``alpha + beta * traffic``; ``autopar
  profile`` fits alpha and beta against the same traffic.
* Data-parallel parameter gradients are summed by the bucketed reducer (``autopar.runtime.grad_sync``):
  buckets of ``GRAD_BUCKET_BYTES`` (the first ``FIRST_GRAD_BUCKET_BYTES``, as DDP), one all-reduce call per
  bucket and mesh dim; ``grad_bucket_count`` is how many calls a set of gradient bytes takes;
  ``grad_buckets`` lists the buckets themselves as the reducer forms them.
* Which gradients the reducer sums (``deferred_grads``): a parameter whose every use needs its gradient
  summed over the same mesh dims and nothing else, and the pass-through ops of parameters alone that
  feed such sums into their parameters. Codegen (``insert_collectives``) defers exactly these; the
  solver sees one edge at a time and prices the gradient of an edge as bucketed where
  ``reducer_candidate`` admits its producer and the edge does not reshard (necessary conditions of
  ``deferred_grads``: see there for what they overlook);
  ``solver.runtime_model`` lists the collectives of a plan with ``deferred_grads`` itself.
  ``grad_arrival`` is the gradient placement a consumer input receives (a Partial sum where the
  consumer splits its work and reads the input replicated).

Core: imports nothing of autopar's own (the graph index is read duck-typed: ``nodes``, ``output_refs``,
a node's ``kind``, ``target``, ``inputs`` and ``outputs``).
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

__all__ = ["COLLECTIVES", "FIRST_GRAD_BUCKET_BYTES", "GRAD_BUCKET_BYTES", "deferred_grads", "grad_arrival",
           "grad_bucket_count", "grad_buckets", "grad_ready_order", "of_params_only", "reducer_candidate",
           "ring_traffic"]

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")

GRAD_BUCKET_BYTES = 25 * 2 ** 20        # a gradient bucket of the reducer (the later ones; they dominate)
FIRST_GRAD_BUCKET_BYTES = 2 ** 20       # the first bucket: small, so the first all-reduce starts early


def ring_traffic(kind: str, n: int) -> float:
    """Bytes one rank sends per byte of the full tensor in a ring ``kind`` over ``n`` ranks."""
    if kind not in COLLECTIVES:
        raise KeyError(f"unknown collective kind {kind!r}; known: {COLLECTIVES}")
    if n <= 1:
        return 0.0
    if kind == "all_reduce":            # reduce-scatter then all-gather
        return 2 * (n - 1) / n
    if kind == "send_recv":             # the whole tensor to one peer
        return 1.0
    return (n - 1) / n                  # all-gather, reduce-scatter, all-to-all


def grad_bucket_count(grad_bytes: float, bucket_bytes: int = GRAD_BUCKET_BYTES,
                      first_bucket_bytes: int = FIRST_GRAD_BUCKET_BYTES) -> int:
    """All-reduce calls (per mesh dim) the reducer makes for ``grad_bytes`` of gradients of one dtype."""
    if grad_bytes <= 0:
        return 0
    return 1 + math.ceil(max(0.0, grad_bytes - first_bucket_bytes) / bucket_bytes)


def grad_buckets(params: Sequence[tuple[object, tuple[int, ...], object, int]],
                 bucket_bytes: int = GRAD_BUCKET_BYTES, first_bucket_bytes: int = FIRST_GRAD_BUCKET_BYTES
                 ) -> list[tuple[list, tuple[int, ...], int]]:
    """The reducer's buckets (``autopar.runtime.grad_sync.GradReducer`` forms them with this function): ``params`` are
    (name, mesh dims its gradient is summed over, dtype, bytes) in the order gradients become ready; a bucket
    holds consecutive parameters of one (dims, dtype), the first up to ``first_bucket_bytes``, the later ones
    up to ``bucket_bytes`` (a parameter larger than that is a bucket alone). Returns (names, dims, bytes) per
    bucket; each bucket is one all-reduce per mesh dim in ``dims``."""
    out: list[tuple[list, tuple[int, ...], int]] = []
    cur: list = []
    size, key = 0, None
    for name, dims, dtype, nbytes in params:
        cap = first_bucket_bytes if not out else bucket_bytes
        if cur and (size + nbytes > cap or (tuple(dims), dtype) != key):
            out.append((cur, key[0], size))
            cur, size = [], 0
        cur.append(name)
        key = (tuple(dims), dtype)
        size += nbytes
    if cur:
        out.append((cur, key[0], size))
    return out


def grad_ready_order(deferred: Sequence[str], last_use: Callable[[str], int]) -> list[str]:
    """The order the deferred gradients become ready (the reducer's bucket order): reverse order of each
    parameter's last use in forward, ties in ``deferred``'s order (``autopar.runtime.module``'s sort)."""
    return sorted(deferred, key=lambda name: -last_use(name))


def grad_arrival(dst: str, split: Sequence[bool]) -> str | None:
    """The gradient placement at a consumer input (placements as the plan writes them, one per mesh dim,
    space-separated: ``"S(0) R"``) when it differs from the default: ``P(sum)`` on every mesh dim where the
    consumer reads the input replicated and splits its work (``split``), the gradient of a partial input
    replicated. None where no such mesh dim exists."""
    parts = dst.split()
    if not any(p == "R" and s for p, s in zip(parts, split)):
        return None
    return " ".join("P(sum)" if p == "R" and s else ("R" if p.startswith("P") else p) for p, s in zip(parts, split))


def _float_input(gi, ref) -> bool:
    meta = gi.nodes[ref.src].outputs[ref.out]
    return meta is not None and meta.dtype.is_floating_point


def of_params_only(gi, node) -> bool:
    """An op whose floating-point tensor inputs are all parameters (and which has one): GPT's position-embedding
    lookup, a weight's transpose."""
    if node.kind != "op":
        return False
    floats = [gi.nodes[r.src] for r in node.inputs if _float_input(gi, r)]
    return bool(floats) and all(n.kind == "param" for n in floats)


def reducer_candidate(gi, node, out_replicated: bool) -> bool:
    """What one edge shows of ``deferred_grads``: the gradient flowing back into ``node``'s output can be summed
    by the bucketed reducer only if ``node`` is a parameter, or an op of parameters alone (``of_params_only``)
    whose output is replicated on every mesh dim (``out_replicated``: it splits no work). The solver prices the
    gradient of every such edge as bucketed; ``deferred_grads`` decides with every use of the value in view."""
    return node.kind == "param" or (out_replicated and of_params_only(gi, node))


def deferred_grads(gi, output_sharding: Callable[[str, int], str], input_sharding: Callable[[str, int], str],
                   split_dims: Callable[[str], tuple[bool, ...]]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(deferred parameters: node name -> mesh dims, pass-through ops): the gradients the bucketed reducer sums.

    ``output_sharding(name, out)`` / ``input_sharding(name, i)``: a node's planned placements as the plan writes
    them (``"S(0) R"``), ``split_dims(name)``: per mesh dim, whether its strategy splits its work.

    A parameter is deferred when its every use needs its gradient summed over the same mesh dims and nothing
    else (a replicated parameter read, unchanged, by ops that split the batch). A pass-through op is an unsplit
    op of parameters alone (``of_params_only``; one output, not a graph output), whose every use needs its
    output gradient summed over the same dims: its gradient stays a partial sum through its backward (linear in
    the gradient, same inputs on every rank) into its parameters, which are then deferred too (a pass-through
    op needs every one of its parameters deferred with its dims). Codegen inserts no reshard on a deferred
    parameter's or a pass-through op's uses; the reducer sums the parameters' gradients once each.

    What the per-edge view (``reducer_candidate`` on an edge that does not reshard: the ILP's) overlooks: a
    candidate some other use of which reshards or needs another sum is not deferred (its split uses all-reduce inline, one collective per
    distinct (placement, gradient) reshard); a deferred parameter read by several ops is summed once, not once
    per use; a pass-through op's sum covers its parameters' bytes (e.g. the whole position-embedding table),
    not its output's."""
    outputs = {r.src for r in gi.output_refs}
    uses: dict[str, list[tuple[str, bool, str | None]]] = {}   # producer -> (consumer, same placement, grad)
    for name, g in gi.nodes.items():
        if g.kind != "op" or g.target is operator.getitem:
            continue
        split = split_dims(name)
        for i, ref in enumerate(g.inputs):
            if gi.nodes[ref.src].kind not in ("param", "op"):
                continue
            src, dst = output_sharding(ref.src, ref.out), input_sharding(name, i)
            uses.setdefault(ref.src, []).append((name, src == dst, grad_arrival(dst, split)))

    def partial_only(name: str):
        u = {(same, grad) for _, same, grad in uses.get(name, ())}
        if len(u) != 1 or name in outputs:
            return None
        same, grad = next(iter(u))
        return grad if same and grad is not None else None

    candidates = {}
    for name, g in gi.nodes.items():
        if g.kind != "op" or g.target is operator.getitem or len(g.outputs) != 1 or any(split_dims(name)):
            continue
        grad = partial_only(name)
        if grad is None or not of_params_only(gi, g):
            continue
        candidates[name] = (grad, [ref.src for ref in g.inputs if gi.nodes[ref.src].kind == "param"])
    while True:   # a pass-through op needs every one of its parameters deferred with its dims
        # a parameter read by a pass-through op receives that op's partial gradient through it
        param_uses = {k: {(same, candidates[c][0] if c in candidates else grad) for c, same, grad in v}
                      for k, v in uses.items() if gi.nodes[k].kind == "param"}
        out = {}
        for pname, u in param_uses.items():
            if len(u) == 1:
                same, grad = next(iter(u))
                if same and grad is not None:
                    out[pname] = tuple(d for d, p in enumerate(grad.split()) if p == "P(sum)")
        keep = {n: c for n, c in candidates.items() if all(p in out for p in c[1])}
        if len(keep) == len(candidates):
            return out, set(candidates)
        candidates = keep
