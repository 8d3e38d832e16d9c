"""One model of what the runtime does for a plan: the collectives one training step runs, and the step priced
with the ILP's own cost functions.

``planned_collectives(plan, gi)``: every collective the parallel module runs in one forward + backward (no
pipeline stages), derived from the plan's placements exactly as codegen emits them:

* reshards (codegen.insert_collectives): per op input whose producer's planned placement differs from the
  one the op reads, or whose gradient arrives as a partial sum (``runtime_rules.grad_arrival``), one
  reshard shared by every consumer of the same (value, placement, gradient placement); none on the uses
  of a deferred parameter or pass-through op (``runtime_rules.deferred_grads``); a multi-output op's
  slot is resharded after its getitem; graph outputs are made replicated, except a sharded cross-entropy
  that returns its loss replicated itself. Forward runs ``redistribute_steps(src, dst)``; backward, where
  a gradient flows back through the reshard, ``redistribute_steps(gradient at dst, gradient at src)``
  (autopar.ops.collectives), one collective per step that communicates;
* the parallel ops (codegen.substitute_parallel_ops, autopar.ops.parallel_ops): a vocab-parallel
  embedding runs none; a sharded cross-entropy all-reduces the row max, the sum of exponentials and the
  target logit per vocab-splitting mesh dim, and per batch-splitting mesh dim the (loss, count) pair
  (loss returned replicated) or the target count (mean, loss left a partial sum);
* the bucketed reducer (autopar.runtime.grad_sync): the deferred parameters' gradients in the reducer's
  buckets (``runtime_rules.grad_buckets`` in ``runtime_rules.grad_ready_order``), one all-reduce per
  bucket and mesh dim, in backward.

A collective is one call of a torch.distributed collective on one mesh dim's process group, described
by (phase ``fwd``/``bwd``, kind ``all_reduce``/``all_gather``/``reduce_scatter``/``all_to_all``, mesh dim,
bytes). **Bytes** are those of the tensor unsharded on that mesh dim (sharded as it is on the other
mesh dims): the all-reduced buffer, the all-gather's output, the reduce-scatter's input, the
all-to-all's input times the group size. It is the size the cost model's ring traffic multiplies
(``ring_traffic(kind, n) * bytes``, docs/cost_model.md), and the same on every rank of the group.
Not modelled (``planned_collectives`` raises ConfigError): pipeline stages, recompute (a checkpointed
region's collectives run again in backward), ZeRO-1/2 (their collectives run in the reducer's place and
the optimizer step), and captures with folded blocks. Offloaded activations run no collective and are
allowed.

``price_plan(plan, gi, keys, links)``: the step priced exactly as the ILP's objective prices it (one
term per key and per edge class): per key its compute (``KeyInfo.compute`` of the chosen strategy times
the key's multiplicity), per edge class ``edge_seconds`` (the forward resharding and the gradient's,
bucketed where ``edges.grad_priced_bucketed`` says so) times its multiplicity, charged to the consuming
key (an edge to the graph output to its producer). The data-parallel gradient all-reduces the ILP
prices as bucketed are inside those edge terms (each pays its bytes and ``bytes / GRAD_BUCKET_BYTES`` of
one latency), so buckets are no separate term. Memory decisions (recompute, activation and optimizer
offload, ZeRO) are not repriced: their seconds are taken from the plan's ``time_breakdown``
(``recompute_s`` and ``offload_s``) into ``memory_s``; a ZeRO plan, whose all-gathers and
reduce-scatters sit in the plan's ``comm_s`` with the edges, raises ConfigError. For a plan without
memory decisions ``StepPrice.total_s`` equals ``plan.solver.objective`` (and ``plan.predicted.step_time_s``
where no fused group was costed unfused again). ``price_collectives`` prices a listed step with the same
alpha-beta collective times, for comparing what the runtime runs with what the ILP charged.

An inference plan (``plan.mode == "inference"``, autopar.plan(training=False)) runs the forward alone:
``planned_collectives`` lists the forward reshards (no gradient flows, and apply builds it without the
reducer: no deferred parameters, no buckets), ``price_plan`` prices forward compute and forward resharding
(``KeyInfo.compute``'s ``fwd_s``, ``edge_seconds``' ``fwd_s``), as the inference ILP's objective does; its keys
come from collect_keys(training=False).

Imports autopar's core and the solver only (never codegen or ops).
"""
from __future__ import annotations

import math
import operator
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from autopar.cluster.profile import LinkSpec
from autopar.core import runtime_rules as RR
from autopar.core.errors import ConfigError
from autopar.core.graph import GNode, GraphIndex, TensorMeta
from autopar.core.placement import Partial, Replicate, parse_sharding, redistribute_steps
from autopar.core.plan import Plan
from autopar.solver import cost as C
from autopar.solver.edges import grad_priced_bucketed
from autopar.solver.keys import OUTPUT, KeyInfo
from autopar.solver.strategies import Strategy
from autopar.solver.strategies.norm import NORMS, stat_collectives

__all__ = ["Collective", "NodePrice", "StepPrice", "collective_counts", "edge_seconds", "planned_collectives",
           "price_collectives", "price_plan"]

aten = torch.ops.aten
# ops whose floating-point output carries no gradient back to their inputs
_NO_GRAD_OPS = {aten.detach.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
                aten.full_like.default, aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
                aten.new_full.default}


@dataclass(frozen=True)
class Collective:
    phase: str          # "fwd" | "bwd"
    kind: str           # "all_reduce" | "all_gather" | "reduce_scatter" | "all_to_all"
    mesh_dim: int
    bytes: int          # the tensor unsharded on mesh_dim (see the module docstring)
    what: str = field(default="", compare=False)   # where it comes from (reshard, bucket, cross-entropy)

    @property
    def signature(self) -> tuple[str, str, int, int]:
        return (self.phase, self.kind, self.mesh_dim, self.bytes)


def collective_counts(cols: Iterable[Collective]) -> Counter:
    """(phase, kind, mesh dim, bytes) -> how many calls."""
    return Counter(c.signature for c in cols)


# ------------------------------------------------------------------------------------------------ listing

class _Placements:
    """The plan's placements per captured node (as codegen.context.ShardingContext reads them)."""

    def __init__(self, plan: Plan, gi: GraphIndex) -> None:
        self.plan, self.gi = plan, gi
        self.ndim = len(plan.mesh.shape)
        self.ns = {}
        for name, g in gi.nodes.items():
            ns = plan.node_shardings.get(g.key)
            if ns is None:
                raise ConfigError(f"the plan has no placements for graph node {g.key!r}: it was made for another "
                                  f"capture; re-plan the model")
            self.ns[name] = ns

    def output_sharding(self, name: str, out: int = 0) -> str:
        s = self.ns[name].outputs[out]
        return " ".join(s) if s is not None else " ".join("R" for _ in range(self.ndim))

    def input_sharding(self, name: str, i: int) -> str:
        return " ".join(self.ns[name].inputs[i])

    def split_dims(self, name: str) -> tuple[bool, ...]:
        ns = self.ns[name]
        all_pl = [s for s in ns.inputs + ns.outputs if s is not None]
        return tuple(any(s[d] != "R" for s in all_pl) for d in range(self.ndim))


def _sh(text: str) -> tuple:
    return tuple(parse_sharding(text.split(), field="placement"))


def _default_grad(sh: tuple) -> tuple:
    return tuple(Replicate() if isinstance(p, Partial) else p for p in sh)


def _steps(meta: TensorMeta, src: tuple, dst: tuple, mesh_shape: tuple[int, ...], phase: str, what: str
           ) -> list[Collective]:
    """The communicating steps of redistribute_steps(src, dst) for a tensor of global ``meta``."""
    out = []
    cur = list(src)
    for d, kind, _before, after in redistribute_steps(tuple(src), tuple(dst)):
        if kind not in ("chunk", "zero") and mesh_shape[d] > 1:
            gathered = list(cur)
            gathered[d] = Replicate()
            out.append(Collective(phase, kind, d, int(meta.nbytes // C.shard_factor(tuple(gathered), mesh_shape)),
                                  what))
        cur[d] = after
    return out


def _reshard(meta, src: str, dst: str, grad: str | None, backward: bool, mesh_shape, what: str) -> list[Collective]:
    s, t = _sh(src), _sh(dst)
    out = _steps(meta, s, t, mesh_shape, "fwd", what)
    if backward and meta.dtype.is_floating_point:
        gdst = _sh(grad) if grad else _default_grad(t)
        out += _steps(meta, gdst, _default_grad(s), mesh_shape, "bwd", what + " (gradient)")
    return out


def _grad_flow(gi: GraphIndex) -> tuple[set[tuple[str, int]], set[str]]:
    """(values that require grad, nodes backward reaches from the loss: the scalar floating-point graph
    outputs that require grad)."""
    def is_float(ref) -> bool:
        meta = gi.nodes[ref.src].outputs[ref.out]
        return meta is not None and meta.dtype.is_floating_point

    requires: set[tuple[str, int]] = set()
    for name, g in gi.nodes.items():
        if g.kind == "param":
            flows = True
        elif g.kind == "op" and g.target not in _NO_GRAD_OPS:
            flows = any((r.src, r.out) in requires for r in g.inputs)
        else:
            flows = False
        if flows:
            requires |= {(name, o) for o, m in enumerate(g.outputs) if m is not None and m.dtype.is_floating_point}
    reached: set[str] = set()
    seeds = _loss_refs(gi, requires)
    consumers = defaultdict(list)
    for name, g in gi.nodes.items():
        for r in g.inputs:
            consumers[r.src].append(name)
    # backward from the outputs: a node is reached when a reached node reads one of its grad-requiring values
    todo = [r.src for r in seeds]
    while todo:
        n = todo.pop()
        if n in reached:
            continue
        reached.add(n)
        for r in gi.nodes[n].inputs:
            if (r.src, r.out) in requires and is_float(r):
                todo.append(r.src)
    return requires, reached


def _loss_refs(gi: GraphIndex, requires) -> list:
    return [r for r in gi.output_refs if (r.src, r.out) in requires and len(gi.nodes[r.src].outputs[r.out].shape) == 0]


def _ce_args(g: GNode) -> tuple[int, int]:
    """(reduction, ignore_index) of a captured cross_entropy_loss (as substitute_parallel_ops reads them)."""
    fx_node = g.fx_node
    a = list(fx_node.args) + [None] * (6 - len(fx_node.args))
    reduction = a[3] if a[3] is not None else fx_node.kwargs.get("reduction", 1)
    return int(reduction), a[4]


def planned_collectives(plan: Plan, gi: GraphIndex) -> list[Collective]:
    """Every collective one training step (forward + backward from the loss) of ``plan`` runs, in the order
    they are met in forward (backward ones listed with their forward, the buckets last). See the module
    docstring for what counts and its bytes; raises ConfigError for what is not modelled."""
    if plan.pipeline:
        raise ConfigError("planned_collectives models plans without pipeline stages")
    if plan.checkpoint:
        raise ConfigError(f"planned_collectives does not model recompute (the plan checkpoints "
                          f"{plan.checkpoint[:2]}...): a checkpointed region's collectives run again in backward")
    if plan.optimizer_sharding or plan.gradient_sharding:
        raise ConfigError("planned_collectives does not model ZeRO-1/2 (optimizer_sharding / gradient_sharding)")
    if any(gi.layer_counts[k] != gi.observed_counts.get(k, 0) for k in gi.layer_counts):
        raise ConfigError("planned_collectives needs a capture without folded blocks (every block in the graph)")
    mesh_shape = tuple(plan.mesh.shape)
    pl = _Placements(plan, gi)
    if plan.training:
        deferred, passthrough = RR.deferred_grads(gi, pl.output_sharding, pl.input_sharding, pl.split_dims)
        requires, reached = _grad_flow(gi)
    else:   # inference: no gradient flows, nothing is deferred to a reducer (autopar.apply)
        deferred, passthrough, requires, reached = {}, set(), set(), set()
    out: list[Collective] = []
    shared: dict[tuple, list] = {}       # (value, src, dst, grad) -> [meta, backward?, index in out]
    order: list[tuple] = []

    def reshard(ref, src, dst, grad, consumer: str) -> None:
        key = (ref.src, ref.out, src, dst, grad)
        backward = (ref.src, ref.out) in requires and consumer in reached
        if key not in shared:
            shared[key] = [gi.nodes[ref.src].outputs[ref.out], backward]
            order.append(key)
        else:
            shared[key][1] |= backward

    ce_in_place: dict[str, bool] = {}
    ce_nodes: list[str] = []
    norm_cols: list[Collective] = []
    for name, g in gi.nodes.items():
        if g.kind != "op":
            continue
        if g.target is operator.getitem:   # a slot of a multi-output op: resharded after its getitem
            ref = g.inputs[0]
            src, dst = pl.output_sharding(ref.src, ref.out), pl.input_sharding(name, 0)
            if src != dst:
                reshard(ref, src, dst, None, name)
            continue
        split = pl.split_dims(name)
        for i, ref in enumerate(g.inputs):
            src, dst = pl.output_sharding(ref.src, ref.out), pl.input_sharding(name, i)
            grad = RR.grad_arrival(dst, split)
            if (src == dst and grad is None) or ref.src in deferred or ref.src in passthrough:
                continue
            reshard(ref, src, dst, grad, name)
        if g.target == aten.cross_entropy_loss.default and any(
                p in ("S(0)", "S(1)") for p in pl.input_sharding(name, 0).split()):
            ce_nodes.append(name)
        if g.target in NORMS:   # a norm over a split hidden dim: parallel_ops.sharded_norm's statistics
            ref = g.inputs[0]
            x = gi.nodes[ref.src].outputs[ref.out]
            grads = (ref.src, ref.out) in requires and name in reached
            norm_cols += [Collective(phase, kind, d, nbytes, f"norm statistics {g.key}")
                    for phase, kind, d, nbytes in stat_collectives(g, x, _sh(pl.input_sharding(name, 0)), mesh_shape)
                    if phase == "fwd" or grads]
    replicated = " ".join("R" for _ in mesh_shape)
    losses = set(_loss_refs(gi, requires))
    users = Counter(r.src for g in gi.nodes.values() for r in g.inputs)
    for ref in gi.output_refs:
        src = pl.output_sharding(ref.src, ref.out)
        if src == replicated:
            continue
        g = gi.nodes[ref.src]
        if ref.src in ce_nodes and not users[ref.src]:
            if ref.src not in ce_in_place:
                logits = pl.input_sharding(ref.src, 0)
                want = " ".join("P(sum)" if p == "S(0)" else "R" for p in logits.split())
                ce_in_place[ref.src] = src == want and _ce_args(g)[0] in (1, 2)
            if ce_in_place[ref.src]:
                continue
        key = (ref.src, ref.out, src, replicated, None)
        if key not in shared:   # graph outputs: one reshard per output slot (backward from the loss)
            shared[key] = [g.outputs[ref.out], ref in losses]
            order.append(key)
    for key in order:
        src_name, o, src, dst, grad = key
        meta, backward = shared[key]
        out += _reshard(meta, src, dst, grad, backward, mesh_shape, f"reshard {gi.nodes[src_name].key}[{o}] "
                        f"{src} -> {dst}" + (f" (gradient {grad})" if grad else ""))
    out += norm_cols
    for name in ce_nodes:
        out += _cross_entropy(gi, gi.nodes[name], pl.input_sharding(name, 0), ce_in_place.get(name, False), mesh_shape)
    out += _buckets(gi, deferred, pl, mesh_shape)
    return out


def _cross_entropy(gi: GraphIndex, g: GNode, logits_sharding: str, in_place: bool, mesh_shape) -> list[Collective]:
    """autopar.ops.parallel_ops.sharded_cross_entropy's own collectives."""
    sh = logits_sharding.split()
    batch = [d for d, p in enumerate(sh) if p == "S(0)"]
    vocab = [d for d, p in enumerate(sh) if p == "S(1)"]
    meta = gi.nodes[g.inputs[0].src].outputs[g.inputs[0].out]
    item = meta.dtype.itemsize
    rows = int(meta.shape[0]) // math.prod(mesh_shape[d] for d in batch)
    what = f"cross_entropy {g.key}"
    out = []
    for d in vocab:      # the row max, then the sum of exponentials and the target logit: P(sum) -> R
        out.append(Collective("fwd", "all_reduce", d, rows * item, what + " max"))
    for part in ("sum of exponentials", "target logit"):
        for d in reversed(vocab):
            out.append(Collective("fwd", "all_reduce", d, rows * item, f"{what} {part}"))
    reduction, _ = _ce_args(g)
    if reduction == 0:
        return out
    for d in batch:
        if in_place:     # (loss, count) summed once per batch-splitting mesh dim
            out.append(Collective("fwd", "all_reduce", d, 2 * item, what + " (loss, count)"))
        elif reduction == 1:
            out.append(Collective("fwd", "all_reduce", d, item, what + " count"))
    return out


def _buckets(gi: GraphIndex, deferred: dict[str, tuple[int, ...]], pl: _Placements, mesh_shape) -> list[Collective]:
    last = {}
    for i, (name, g) in enumerate(gi.nodes.items()):
        for r in g.inputs:
            if r.src in deferred:
                last[r.src] = i
    params = []
    for name in RR.grad_ready_order(list(deferred), lambda n: last.get(n, 0)):
        meta = gi.nodes[name].outputs[0]
        nbytes = meta.nbytes // C.shard_factor(_sh(pl.output_sharding(name)), mesh_shape)
        params.append((name, deferred[name], meta.dtype, int(nbytes)))
    out = []
    for i, (names, dims, nbytes) in enumerate(RR.grad_buckets(params)):
        for d in dims:
            out.append(Collective("bwd", "all_reduce", d, nbytes, f"gradient bucket {i} ({len(names)} parameters)"))
    return out


# ------------------------------------------------------------------------------------------------ pricing

@dataclass(frozen=True)
class NodePrice:
    compute_s: float
    comm_s: float       # the edges charged to this key: its inputs' (and its outputs' to the graph output)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s


@dataclass(frozen=True)
class StepPrice:
    nodes: dict[str, NodePrice]   # graph key -> its share of the step
    memory_s: float = 0.0         # recompute and offload seconds, taken from the plan (not repriced)

    @property
    def compute_s(self) -> float:
        return sum(n.compute_s for n in self.nodes.values())

    @property
    def comm_s(self) -> float:
        return sum(n.comm_s for n in self.nodes.values())

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s + self.memory_s


def consumer_split(s: Strategy, a: int) -> tuple[bool, ...]:
    """Per mesh dim: does the consumer read argument ``a`` replicated while splitting its work there (its
    gradient then arrives as a partial sum)? As the ILP groups consumers (edges.add_edge_vars)."""
    inp = s.inputs[a]
    return tuple(sp and isinstance(p, Replicate) for p, sp in zip(inp, s.split_dims()))


def edge_seconds(gi: GraphIndex, producer: GNode, meta: TensorMeta, src: tuple, dst: tuple, split: tuple[bool, ...],
                 mesh_shape: tuple[int, ...], links: tuple[LinkSpec, ...]) -> C.OpCost:
    """One edge's resharding, forward and gradient, as the ILP prices it (edges.add_edge_vars)."""
    return C.edge_cost(meta, src, dst, split, mesh_shape, links, param=grad_priced_bucketed(gi, producer, src, dst))


def _edges(gi: GraphIndex):
    for (ku, o, kv, a), mult in gi.edge_classes().items():
        yield ku, o, kv, a, mult
    for ref in gi.output_refs:
        yield gi.nodes[ref.src].key, ref.out, OUTPUT, 0, 1.0


def priced_edges(gi: GraphIndex, keys: dict[str, KeyInfo], chosen: dict, mesh_shape: tuple[int, ...],
                 links: tuple[LinkSpec, ...]):
    """Every edge class carrying a tensor under the chosen strategies, as the ILP charges it: (key charged, the
    edge's consumer, or its producer for a graph output; producer node; source and destination placements;
    multiplicity; edge_seconds). The one walk price_plan and the pipeline's unit costs share."""
    replicated = tuple(Replicate() for _ in mesh_shape)
    for ku, o, kv, a, mult in _edges(gi):
        u = keys[ku]
        meta = u.node.outputs[o]
        if meta is None:
            continue
        src = chosen[ku].outputs[o]
        if kv == OUTPUT:
            dst, split, charged = replicated, tuple(False for _ in mesh_shape), ku
        else:
            dst, split, charged = chosen[kv].inputs[a], consumer_split(chosen[kv], a), kv
        yield charged, u.node, src, dst, mult, edge_seconds(gi, u.node, meta, src, dst, split, mesh_shape, links)


def price_plan(plan: Plan, gi: GraphIndex, keys: dict[str, KeyInfo], links: tuple[LinkSpec, ...],
               chosen: dict[str, Strategy] | None = None) -> StepPrice:
    """The ILP's objective for ``plan``'s strategies, term by term (module docstring). ``keys``: the
    strategies and compute as the planner costed them (solver.ilp.collect_keys, fused costs applied for
    a plan with fusions); ``chosen``: the plan's strategy per key (read from the plan when not given)."""
    if plan.optimizer_sharding or plan.gradient_sharding:
        raise ConfigError("price_plan does not separate ZeRO's collectives from the edges in the plan's comm_s; "
                          "price a plan without optimizer_sharding / gradient_sharding")
    chosen = chosen if chosen is not None else chosen_strategies(plan, keys)
    mesh_shape = tuple(plan.mesh.shape)
    seconds = (lambda c: c.total) if plan.training else (lambda c: c.fwd_s)   # inference: the forward alone
    compute = {k: info.mult * seconds(info.compute[info.strategies.index(chosen[k])]) if chosen[k] in info.strategies
               else _missing(k) for k, info in keys.items()}
    comm: dict[str, float] = defaultdict(float)
    for charged, _, _, _, mult, cost in priced_edges(gi, keys, chosen, mesh_shape, links):
        comm[charged] += mult * seconds(cost)
    tb = plan.predicted.time_breakdown
    memory = tb.get("recompute_s", 0.0) + tb.get("offload_s", 0.0)
    return StepPrice(nodes={k: NodePrice(compute[k], comm.get(k, 0.0)) for k in keys}, memory_s=memory)


def _missing(key: str):
    raise ConfigError(f"node {key}: the plan's strategy is not one of its strategies; re-plan the model")


def chosen_strategies(plan: Plan, keys: dict[str, KeyInfo]) -> dict[str, Strategy]:
    """The plan's strategy per graph key (its written placements)."""
    out = {}
    for k in keys:
        ns = plan.node_shardings.get(k)
        if ns is None:
            raise ConfigError(f"the plan has no sharding for {k!r}: it was made for another capture; re-plan")
        out[k] = Strategy(inputs=tuple(_parse(s, k, i) for i, s in enumerate(ns.inputs)),
                          outputs=tuple(_parse(s, k, i) if s is not None else None for i, s in enumerate(ns.outputs)))
    return out


def _parse(sh, key: str, i: int) -> tuple:
    return tuple(parse_sharding(list(sh), field=f"node_shardings[{key!r}][{i}]"))


def price_collectives(cols: Iterable[Collective], mesh_shape: tuple[int, ...], links: tuple[LinkSpec, ...]) -> float:
    """Seconds of the listed collectives at the cost model's alpha-beta times (one latency per call)."""
    return sum(C.collective_time(c.kind, c.bytes, mesh_shape[c.mesh_dim], links[c.mesh_dim]) for c in cols)
