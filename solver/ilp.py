r"""The sharding ILP: one binary choice per graph key, resharding on edges, memory per rank.

Notation: K graph keys (a key stands for m_k identical nodes of the full model: repeated layers
share variables), S_k the strategies of key k, E the edge classes (producer key u, output o,
consumer key v, argument a) with multiplicity m_e.

Variables
  x_{k,s} in {0,1}                       key k uses strategy s                      (add_node_vars)
  y_{e,p,q} >= 0 (continuous)            edge e carries producer placement p to consumer group q,
                                         q = (required input placement, consumer's split mesh dims)
                                                                                    (add_edge_vars)
Objective (predicted step time, seconds)
  min  sum_k m_k sum_s x_{k,s} (C^fwd_{k,s} + C^bwd_{k,s})                         compute  (add_objective)
     + sum_e m_e sum_{p,q} y_{e,p,q} (T^fwd(p->q) + T^bwd(g(q)->g(p)))             resharding, including
                                                                                    the data-parallel
                                                                                    gradient all-reduce
                                                                                    (bucketed: latency
                                                                                    shared per bucket)
Constraints
  sum_s x_{k,s} = 1                                  for every k                    (add_node_vars)
  sum_q y_{e,p,q} = sum_{s: out_o(s)=p} x_{u,s}      for every e, p                 (add_edge_vars)
  sum_p y_{e,p,q} = sum_{s: grp_a(s)=q} x_{v,s}      for every e, q                 (add_edge_vars)
  memory rows, one per peak of a training step (memory_exprs, add_memory_row; in MiB):
    backward start:  P + O + A_rest + sum_g kept_g + G_edges + G_out  <= budget
    end of backward / optimizer step:  P + O + Grad + B                <= budget
    recompute:       P + O + A_before + sum_g T_g + H              <= budget   (when blocks recompute)
                     H >= sum_g kept_g,  H >= Grad   (remat.add_recompute_hold)
     P, Grad, O: parameter, gradient and AdamW bytes of placeholders (sum_k m_k sum_s x M_{k,s});
     A: bytes autograd keeps for backward, measured per node by solver.saved (not by rule);
     G_edges: resharded copies a consumer keeps for backward (solver.saved's kept_by: a parameter's
       gathered copy, or an activation's copy, instead of the producer's tensor where only the copy is
       kept), sum_e m_e sum y G_{e,p,q}; inside a repeated block they join kept_g (below);
     G_out: the first gradient of backward (the loss's input, e.g. the logits; cross-entropy holds two)
       and the backward collectives of the reshardings it flows through (add_backward_start_grad,
       add_edge_vars);
     B: the data-parallel gradients the reducer copies into its last bucket, at most one bucket (add_grad_buckets);
     O and Grad less the ZeRO-1/2 shares (zero_rows.add_zero_vars);
     kept_g, B_g, T_g: repeated blocks under the recompute decisions (remat.add_remat_vars).
  Recompute (solver/remat.py, add_remat_vars): per repeated-block list, integer counts of blocks kept /
  recomputed selectively / recomputed fully; their forward time, compute and the collectives inside
  the block (a ZeRO-3 parameter's all-gather among them) and the per-op checkpoint surcharges
  (cost.checkpoint_overhead), joins the objective (category "recompute").
  A recomputed block in backward (T_g) holds its activations, the resharded copies its consumers keep
  and its largest backward collective: M_g >= sum_{p,q} c_{e,p,q} y_{e,p,q}, one row per edge e into
  the block (y of an edge is one-hot). The copies kept by all blocks of a list are one sum
  K_g = sum_e sum_{p,q} G_{e,p,q} y_{e,p,q} / N (one row); the blocks that keep everything keep it,
  K_g c_keep, offloaded ones move it, K_g c_off, each product exact with the count in binary,
  c = sum_b 2^b beta_b, and w_b >= K_g - K_max (1 - beta_b), w_b >= K_min beta_b (remat._times_count):
  a few rows per list where one v per (y, mode) made llama3-8b's ILP 9x larger.
  Offload (solver/offload.py, only where the host is not the device): a fourth count per block list,
  blocks whose saved activations go to host memory (their copies' time beyond the block's compute
  joins the objective, category "offload"; add_block_offload), and one binary for optimizer states
  on the host (O_dev >= O - U z replaces O in the rows; grads down, params up and the CPU step join
  the objective; add_optimizer_offload).
  ZeRO-1/2 (solver/zero_rows.py, add_zero_vars): per parameter key and placement, binaries w1 + w2 <= x for optimizer
  states (and gradients) sharded over the parameter's replicated mesh dims; their all-gather (and
  reduce-scatter) joins the objective (category "comm"). ZeRO-3 is a sharded parameter placement.
An edge whose producer (or consumer) has a single placement group needs no y: its cost is
written directly on the other side's x (add_edge_vars). Fixed placements (``fix=``) drop the
other strategies of the matching keys before the model is built; preferred ones (``prefer=``) do
the same for ops that have such a strategy and leave the others free.

When the memory row makes the problem infeasible, a second solve minimizes the left-hand side to
report the smallest feasible budget (InfeasiblePlanError).
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import sys
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pulp

from autopar.errors import ConfigError, InfeasiblePlanError, ShardingError
from autopar.graph import GNode, GraphIndex, TensorMeta
from autopar.mesh import MeshSpec
from autopar.placement import Placement, Replicate, Shard, parse_sharding
from autopar.profile import ClusterProfile, LinkSpec
from autopar.solver import cost as C
from autopar.solver import offload as O
from autopar.solver import remat as R
from autopar.solver import zero_rows as Z
from autopar.solver.remat import UNIT as _UNIT, value as _value
from autopar.solver.saved import Saved
from autopar.solver.strategies import Strategy, strategies_for
from autopar.solver.strategies.base import in_meta

log = logging.getLogger(__name__)
OUTPUT = "__output__"
_MODES = ("keep", "sel", "full")   # activation recompute modes of a repeated block
# a loss whose backward holds several input-sized gradients at once: cross-entropy's nll_loss backward
# makes the gradient of the log-probabilities, log_softmax's backward the logits' one from it (both live)
_BACKWARD_START_COPIES = {C.aten.cross_entropy_loss.default: 2}


@dataclass
class KeyInfo:
    key: str
    node: GNode
    mult: float
    strategies: list[Strategy]
    fallback: bool
    in_metas: list[TensorMeta]
    compute: list[C.OpCost] = field(default_factory=list)
    memory: list[dict[str, float]] = field(default_factory=list)
    # output index -> (the producer keeps it itself, {(consumer key, argument)} through which the tensor
    # autograd keeps left it: solver.saved's kept_by); None where not traced
    kept_by: dict[int, tuple[bool, frozenset[tuple[str, int]]]] | None = None
    remat_extra: C.OpCost = C.OpCost(0.0, 0.0)   # per occurrence: selective (fwd_s) / full (bwd_s) surcharge


@dataclass
class Solution:
    chosen: dict[str, Strategy]
    keys: dict[str, KeyInfo]
    status: str
    optimal: bool
    objective: float
    backend: str
    num_variables: int
    num_constraints: int
    build_s: float
    solve_s: float
    time_breakdown: dict[str, float]
    memory_breakdown: dict[str, float]
    edge_time: dict[str, float]         # consumer key -> resharding seconds (for tables)
    peak_bytes: float = 0.0             # max over the memory rows
    remat: dict[str, tuple[int, int]] = field(default_factory=dict)   # block list -> (full, selective) counts
    offload: dict[str, int] = field(default_factory=dict)   # block list -> blocks whose activations go to host
    optimizer_offload: bool = False                          # optimizer states and step on the host
    host_bytes: float = 0.0                                  # offloaded bytes in host memory per rank
    zero: dict[str, tuple[int, tuple]] = field(default_factory=dict)  # param key -> (ZeRO stage, state placements)


def _placeholder_strategies(meta: TensorMeta, mesh_shape: tuple[int, ...]) -> list[Strategy]:
    import itertools
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


def _match_fix(key: str, node: GNode, fix: dict[str, list[str]], used: set[str] | None = None
               ) -> tuple[str, ...] | None:
    """The placements of the first pattern matching the key, an FQN or ``param:<fqn>`` (first wins)."""
    names = [key] + [f"{node.kind}:{f}" for f in node.fqns] + list(node.fqns)
    for pat, sh in fix.items():
        if any(fnmatch.fnmatchcase(n, pat) for n in names):
            if used is not None:
                used.add(pat)
            return tuple(sh)
    return None


def collect_keys(gi: GraphIndex, mesh: MeshSpec, profile: ClusterProfile,
                 fix: dict[str, list[str]] | None = None, prefer: dict[str, list[str]] | None = None,
                 saved: dict[str, Saved] | None = None) -> dict[str, KeyInfo]:
    """Candidate strategies with their compute and memory per graph key. ``saved``: what autograd
    keeps per node (solver.saved.saved_tensors); without it every op is assumed to keep its outputs."""
    keys: dict[str, KeyInfo] = {}
    used: set[str] = set()
    for key, members in gi.by_key().items():
        node = members[0]
        in_metas = [in_meta(node, gi.nodes, i) for i in range(len(node.inputs))]
        if node.kind == "op":
            strategies, fallback = strategies_for(node, gi.nodes, mesh.shape)
        else:
            strategies, fallback = _placeholder_strategies(node.outputs[0], mesh.shape), False
        want = _match_fix(key, node, fix or {}, used)
        if want is not None:
            target = parse_sharding(list(want), field=f"fix[{key!r}]")
            if len(target) != mesh.ndim:
                raise ShardingError(f"fix for {key}: {list(want)} has {len(target)} placements for a {mesh.ndim}-D mesh")
            target = _on_mesh(target, mesh.shape)
            kept = [s for s in strategies if s.outputs and s.outputs[0] == target]
            if not kept:
                raise ShardingError(
                    f"{key} cannot be placed {list(want)}: shape {node.outputs[0].shape if node.outputs[0] else '?'} "
                    f"does not split evenly over mesh {mesh.shape} that way (or the op has no such strategy); "
                    f"choose a placement whose sharded dims divide by the mesh sizes")
            strategies = kept
        elif node.kind == "op" and prefer:
            soft = _match_fix(key, node, prefer, used)
            if soft is not None:
                target = _on_mesh(parse_sharding(list(soft), field=f"prefer[{key!r}]"), mesh.shape)
                kept = [s for s in strategies if s.outputs and s.outputs[0] == target]
                strategies = kept or strategies  # a preference the op cannot take is ignored
        info = KeyInfo(key=key, node=node, mult=gi.multiplicity(key, members), strategies=strategies,
                       fallback=fallback, in_metas=in_metas, remat_extra=C.checkpoint_overhead(node, profile.device))
        if saved is not None:
            info.kept_by = _kept_by(saved.get(node.name), gi)
        for s in strategies:
            info.compute.append(C.compute_cost(node, s, in_metas, profile, mesh.shape))
            if node.kind == "param":
                info.memory.append(C.param_state_bytes(node.outputs[0], s.outputs[0], mesh.shape))
            elif saved is not None and node.kind in ("op", "input"):
                info.memory.append({"activations": C.saved_bytes(node, s, saved.get(node.name), mesh.shape)})
            elif node.kind == "op":
                info.memory.append({"activations": C.activation_bytes(node, s, mesh.shape)})
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
    """solver.saved's kept_by of one node in graph keys: output -> (kept by the producer, consumer edges)."""
    out: dict[int, tuple[bool, set]] = {}
    for i, consumer, arg in (rec.kept_by if rec is not None else ()):
        own, via = out.setdefault(i, (False, set()))
        if consumer is None:
            out[i] = (True, via)
        elif consumer in gi.nodes:
            via.add((gi.nodes[consumer].key, arg))
    return {i: (own, frozenset(via)) for i, (own, via) in out.items()}


def _keeps_param_copy(node: GNode) -> bool:
    return node.kind == "op" and node.target not in C.FREE_OPS


def _kept_copy(u: KeyInfo, o: int, kv: str, a: int, consumer: KeyInfo | None) -> str | None:
    """How a resharded copy on edge (u, o) -> (kv, a) stays for backward: "only" (the consumer keeps the
    copy, the producer's own tensor is not kept: the copy replaces it), "also" (kept besides the
    producer's tensor, or a parameter's gathered copy), None (not kept)."""
    if consumer is None:
        return None
    if u.kept_by is None:   # not traced: a parameter's copy is kept by every op but free ones
        return "also" if u.node.kind == "param" and _keeps_param_copy(consumer.node) else None
    own, via = u.kept_by.get(o, (False, frozenset()))
    if (kv, a) not in via:
        return None
    return "only" if u.node.kind != "param" and not own and len(via) == 1 else "also"


class ShardingILP:
    """Builds and solves the ILP of the module docstring."""

    def __init__(self, gi: GraphIndex, keys: dict[str, KeyInfo], mesh: MeshSpec, links: tuple[LinkSpec, ...],
                 budget: float | None, remat: bool = False, recompute: str | None = None,
                 zero: int | None = None, host: O.HostLink | None = None) -> None:
        self.gi, self.keys, self.mesh, self.links, self.budget = gi, keys, mesh, links, budget
        if recompute not in (None, "none", "selective", "full", "offload"):
            raise ConfigError(f"recompute={recompute!r}: give 'none', 'selective', 'full' or 'offload' (every repeated "
                              f"block), or None to let the solver decide")
        if recompute == "offload" and host is None:
            raise ConfigError("recompute='offload' moves every repeated block's saved activations to host memory: it "
                              "needs a cluster profile whose device is not the host (on cpu-gloo the device is the "
                              "host, offloading frees nothing) and offload=True")
        if zero not in (None, 0, 1, 2):
            raise ConfigError(f"zero={zero!r}: give 0, 1 (optimizer states sharded) or 2 (gradients too), or None "
                              f"to let the solver decide (ZeRO-3 is parameters sharded: fix={{'param:*': ...}})")
        self.recompute, self.zero = recompute, zero
        # recompute decisions only where memory is constrained (with memory to spare they cost time only),
        # or where they are told
        self.remat = bool(gi.shared_lists) and recompute != "none" and (
            recompute is not None or (remat and budget is not None))
        self._zero_vars: dict[str, list[tuple[int, tuple, pulp.LpVariable, pulp.LpVariable | None]]] = {}
        # offload (solver.offload) only to a host that is not the device, and where memory is constrained
        self.host = host if budget is not None or recompute == "offload" else None
        self.modes = _MODES + (("off",) if self.host is not None else ())
        self.opt_offload = None
        self.blocks: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))  # list -> terms
        self._last: dict[str, int] = {}
        self._remat_vars: dict[str, tuple] = {}
        self._max_vars: list[tuple[pulp.LpVariable, list]] = []   # v >= each edge's sum c x: settled to the max
        self._products: list[tuple] = []        # (K, K's terms, [(bit, w >= K bit)]): settled exactly (settle_remat)
        self._bits: dict[tuple[int, str], list[pulp.LpVariable]] = {}   # (block list, mode) -> its count in binary
        self._blocks_end = max((i for i, n in enumerate(gi.nodes.values())
                                if n.layer is not None and n.layer[0] in gi.shared_lists), default=-1)
        self.prob = pulp.LpProblem("autopar_sharding", pulp.LpMinimize)
        self.x: dict[str, list[pulp.LpVariable]] = {}
        self.time_terms: dict[str, list] = defaultdict(list)     # compute / comm -> [(coef, var)]
        self.mem_terms: dict[str, list] = defaultdict(list)      # params/grads/optimizer/activations
        self._bucket_terms: list = []                             # data-parallel gradient bytes (add_grad_buckets)
        self._bucket_copy: tuple | None = None
        self.edge_terms: dict[str, list] = defaultdict(list)     # consumer key -> [(coef, var)]
        self.merged: dict[str, tuple[str, int]] = {}              # follower key -> (producer key, output)
        self.merge_trivial = True
        self._cost_cache: dict[tuple, C.OpCost] = {}
        self._shard_factors: dict[tuple, int] = {}

    # -- variables ---------------------------------------------------------------------------
    def add_node_vars(self) -> None:
        producers: dict[str, set[tuple[str, int]]] = defaultdict(set)
        for (ku, o, kv, a), _ in self.gi.edge_classes().items():
            if a == 0:
                producers[kv].add((ku, o))
        for i, (key, info) in enumerate(self.keys.items()):
            xs = self._follow_exprs(info, producers.get(key, set()))
            if xs is None:
                xs = [self._var(f"x{i}_{j}", cat="Binary") for j in range(len(info.strategies))]
                self.prob += pulp.lpSum(xs) == 1, f"one_{i}"
            else:
                self.merged[key] = next(iter(producers[key]))
            self.x[key] = xs
            group = self._block_group(info)
            if group is not None:
                R.record_block_key(self, group, info, xs)
            for j, (c, mem) in enumerate(zip(info.compute, info.memory)):
                if c.total:
                    self.time_terms["compute"].append((info.mult * c.total, xs[j]))
                for cat, b in mem.items():
                    if not b or (group is not None and cat == "activations"):
                        continue   # a block's activations are charged by add_remat_vars
                    after = cat == "activations" and self.remat and self._pos(info.node) > self._blocks_end
                    self.mem_terms["activations_after" if after else cat].append((info.mult * b, xs[j]))

    def add_backward_start_grad(self) -> None:
        """The gradient backward creates first (e.g. of the logits, from the loss) is live at the backward
        start with every kept activation: per strategy of the graph output's producer, the local bytes of
        its largest floating-point input, times the copies its backward holds at once
        (_BACKWARD_START_COPIES; category "backward_grad", backward-start row)."""
        for ref in self.gi.output_refs:
            node = self.gi.nodes[ref.src]
            out = node.outputs[ref.out] if node.outputs else None
            if node.kind != "op" or out is None or not out.dtype.is_floating_point or len(out.shape) > 0:
                continue   # only a scalar loss starts backward
            info = self.keys[node.key]
            copies = _BACKWARD_START_COPIES.get(node.target, 1)
            for j, s in enumerate(info.strategies):
                b = copies * max((C.local_bytes(m, p, self.mesh.shape) for m, p in zip(info.in_metas, s.inputs)
                                  if m is not None and p is not None and m.dtype.is_floating_point), default=0.0)
                if b:
                    self.mem_terms["backward_grad"].append((b, self.x[node.key][j]))

    def _loss_grad_edges(self) -> set[tuple[str, int, str, int]]:
        """Edges the loss's first gradient flows back through before it meets an op that computes (the loss's
        floating-point inputs and the free ops, views, before them): a resharding there runs its backward
        collective at the backward start, on top of that gradient (add_edge_vars charges it)."""
        out: set[tuple[str, int, str, int]] = set()
        todo = [self.gi.nodes[r.src] for r in self.gi.output_refs]
        seen: set[str] = set()
        while todo:
            v = todo.pop()
            if v.name in seen or v.kind != "op":
                continue
            seen.add(v.name)
            for ai, ref in enumerate(v.inputs):
                u = self.gi.nodes[ref.src]
                meta = u.outputs[ref.out] if u.outputs else None
                if meta is None or not meta.dtype.is_floating_point:
                    continue
                out.add((u.key, ref.out, v.key, ai))
                if u.target in C.FREE_OPS:
                    todo.append(u)
        return out

    def add_grad_buckets(self) -> None:
        """The bucketed reducer (autopar.grad_sync) concatenates a full bucket of data-parallel gradients
        into a flat buffer and makes the gradients views of it: for that moment a bucket exists twice.
        The last bucket is launched at the end of backward, with every gradient live, so the step row
        holds min(data-parallel gradient bytes, one bucket) more (a parameter larger than a bucket is a
        bucket alone, reduced without a copy). Collects the gradient bytes per parameter key and
        placement with a replicated mesh dim of size > 1 (where the gradient is a partial sum when the
        batch is split there); ZeRO-2 parameters reduce-scatter instead (add_zero_vars takes them off);
        add_bucket_copy adds the capped term."""
        for key, info in self.keys.items():
            if info.node.kind != "param":
                continue
            for j, s in enumerate(info.strategies):
                if any(isinstance(p, Replicate) and n > 1 for p, n in zip(s.outputs[0], self.mesh.shape)):
                    self._bucket_terms.append((info.mult * info.memory[j]["grads"], self.x[key][j]))

    def add_bucket_copy(self) -> None:
        """B (MiB) >= min(sum of the collected gradient bytes, the largest bucket) on the step row: B >= G - M b,
        B >= cap b with one binary b (the solver takes the smaller); without a cap to reach, B is G itself.
        Call after add_zero_vars."""
        terms = self._bucket_terms
        most = sum(max(c, 0.0) for c, _ in terms)
        if most <= C.GRAD_BUCKET_BYTES:
            self.mem_terms["grad_buckets"] += terms
            return
        cap, big = C.GRAD_BUCKET_BYTES / _UNIT, most / _UNIT
        copy = self._var("bucket_copy", lowBound=0)
        capped = self._var("bucket_capped", cat="Binary")
        grads = pulp.lpSum(c * v for c, v in terms) * (1 / _UNIT)
        self.prob += copy >= grads - big * capped, "bucket_copy_grads"
        self.prob += copy >= cap * capped, "bucket_copy_cap"
        self.mem_terms["grad_buckets"].append((_UNIT, copy))
        self._bucket_copy = (copy, grads, cap)

    def _block_group(self, info: KeyInfo) -> str | None:
        """The repeated-block list an op belongs to, when recompute is decided for it."""
        node = info.node
        if not self.remat or node.kind != "op" or node.layer is None or node.layer[0] not in self.gi.shared_lists:
            return None
        return node.layer[0]

    def _opens_block(self, node: GNode) -> bool:
        """The block's first op: collectives inserted before it run outside its checkpoint region."""
        if not hasattr(self, "_block_first"):
            self._block_first: dict[tuple, int] = {}
            for n in self.gi.nodes.values():
                if n.kind == "op" and n.layer is not None:
                    self._block_first.setdefault(n.layer, self._pos(n))
        return self._block_first.get(node.layer) == self._pos(node)

    def _pos(self, node: GNode) -> int:
        if not hasattr(self, "_positions"):
            self._positions = {name: i for i, name in enumerate(self.gi.nodes)}
        return self._positions[node.name]

    # -- memory decisions: recompute (solver/remat.py), ZeRO-1/2 (solver/zero_rows.py) ------------
    def add_remat_vars(self) -> None:
        R.add_remat_vars(self)

    def add_recompute_hold(self) -> None:
        R.add_recompute_hold(self)

    def settle_remat(self) -> None:
        R.settle_remat(self)

    def settle_hold(self) -> None:
        R.settle_hold(self)

    def remat_counts(self) -> dict[str, tuple[int, int]]:
        return R.remat_counts(self)

    def offload_counts(self) -> dict[str, int]:
        return R.offload_counts(self)

    def add_zero_vars(self) -> None:
        Z.add_zero_vars(self)

    def exclude_zero_with_offload(self) -> None:
        Z.exclude_zero_with_offload(self)

    def zero_choice(self) -> dict[str, tuple[int, tuple]]:
        return Z.zero_choice(self, _value)

    def _follow_exprs(self, info: KeyInfo, producer: set[tuple[str, int]]):
        """Trivial ops merged into the op they follow: a one-input op whose strategies are one per
        placement its producer can emit takes that producer's choice (an expression, no variable)."""
        node = info.node
        if node.kind != "op" or len(node.inputs) != 1 or len(producer) != 1 or not self.merge_trivial:
            return None
        ku, o = next(iter(producer))
        if ku not in self.x:
            return None
        by_input: dict[tuple, int] = {}
        for j, s in enumerate(info.strategies):
            if s.inputs[0] in by_input:
                return None  # two strategies for one input placement: a real choice
            by_input[s.inputs[0]] = j
        u = self.keys[ku]
        exprs: list[list] = [[] for _ in info.strategies]
        for i, s in enumerate(u.strategies):
            j = by_input.get(s.outputs[o])
            if j is None:
                return None
            exprs[j].append(self.x[ku][i])
        return [pulp.lpSum(e) if e else pulp.LpAffineExpression() for e in exprs]

    def _edge_list(self) -> list[tuple[str, int, str, int, float]]:
        edges = [(u, o, v, a, m) for (u, o, v, a), m in self.gi.edge_classes().items()]
        for ref in self.gi.output_refs:
            edges.append((self.gi.nodes[ref.src].key, ref.out, OUTPUT, 0, 1.0))
        return edges

    def _param_derived(self, node: GNode) -> bool:
        """An op whose floating-point inputs are all parameters (and which has one)."""
        if node.kind != "op":
            return False
        floats = [self.gi.nodes[r.src] for r in node.inputs
                  if (m := self.gi.nodes[r.src].outputs[r.out]) is not None and m.dtype.is_floating_point]
        return bool(floats) and all(n.kind == "param" for n in floats)

    def add_edge_vars(self) -> None:
        loss_grad = self._loss_grad_edges()
        for ei, (ku, o, kv, a, mult) in enumerate(self._edge_list()):
            u = self.keys[ku]
            meta = u.node.outputs[o]
            if meta is None:
                continue
            pgroups: dict[tuple, list[int]] = defaultdict(list)
            for j, s in enumerate(u.strategies):
                pgroups[s.outputs[o]].append(j)
            qgroups: dict[tuple, list[int]] = defaultdict(list)
            if kv == OUTPUT:
                qgroups[(tuple(Replicate() for _ in self.mesh.shape), tuple(False for _ in self.mesh.shape))] = [-1]
            else:
                for j, s in enumerate(self.keys[kv].strategies):
                    inp = s.inputs[a]  # the split only matters where the input is replicated (Partial gradient)
                    qgroups[(inp, tuple(sp and isinstance(p, Replicate) for p, sp in zip(inp, s.split_dims())))].append(j)
            keeps = _kept_copy(u, o, kv, a, self.keys.get(kv))
            # a copy kept inside a repeated block that recompute may drop is charged through add_remat_vars
            group = self._block_group(u) if keeps and u.node.kind != "param" else None
            bgroup = self._block_group(self.keys[kv]) if kv in self.keys else None
            nbytes = meta.nbytes
            local = lambda pl: nbytes / self._shard_factor(pl)   # noqa: E731 (C.local_bytes, cached)

            derived = self._param_derived(u.node)

            def coef(p, q):
                # a parameter's gradient, or the partial gradient of an unsplit op of parameters alone (GPT's
                # position-embedding lookup, a weight's transpose), is summed by the bucketed reducer
                # (codegen.insert_collectives' deferred_grads), not by an all-reduce of its own; the runtime
                # defers it where every use of the op needs the same sum (a rarer mix is priced low here)
                is_param = u.node.kind == "param" or (derived and all(isinstance(x, Replicate) for x in p))
                ck = (meta, p, q, is_param)
                c = self._cost_cache.get(ck)
                if c is None:
                    c = self._cost_cache[ck] = C.edge_cost(meta, p, q[0], q[1], self.mesh.shape, self.links,
                                                           param=is_param)
                mem = 0.0
                if keeps and p != q[0]:   # the consumer keeps the resharded copy (in its placement)
                    mem = local(q[0])
                    if keeps == "only":   # ... instead of the producer's tensor, which add_node_vars charges
                        mem -= local(p)
                return mult * c.total, mult * mem, mult * c.fwd_s

            def add(t, mem, var, fwd, p=None, q=None):
                if bgroup is not None and p is not None and p != q[0] and var is not None:
                    # the block's backward runs this resharding's collective on the gradient: its result in
                    # the producer's placement and a staging buffer as large as the larger side
                    lp, lq = local(p), local(q[0])
                    self.blocks[bgroup]["grad_comm"].append((ei, mult / self.gi.layer_counts[bgroup] * (lp + max(lp, lq)),
                                                             var))
                if (ku, o, kv, a) in loss_grad and p is not None and p != q[0] and var is not None:
                    # the gradient's backward collective: its result in the producer's placement and the
                    # staging buffer of the gathered chunks, both live at the backward start
                    self.mem_terms["backward_grad"].append((2 * mult * local(p), var))
                if group is not None:
                    if mem and var is not None:   # one-block bytes, charged through add_remat_vars
                        self.blocks[group]["kept_copy"].append((ei, mem / self.gi.layer_counts[group], var))
                    mem = 0.0
                self._add_edge_term(kv, t, mem, var, fwd, ei)

            xu = self.x[ku]
            xv = self.x.get(kv)
            if a == 0 and self.merged.get(kv) == (ku, o):  # follower: its input placement is the producer's
                for q, qidx in qgroups.items():
                    t, mem, fwd = coef(q[0], q)
                    for j in qidx:
                        add(t, mem, xv[j], fwd, q[0], q)
                continue
            if len(pgroups) == 1 or len(qgroups) == 1:  # no y needed: the cost rides on one side's x
                for p, pidx in pgroups.items():
                    for q, qidx in qgroups.items():
                        t, mem, fwd = coef(p, q)
                        if not (t or mem):
                            continue
                        if len(pgroups) == 1:
                            vars_ = [xv[j] for j in qidx] if xv is not None else [None]
                        else:
                            vars_ = [xu[j] for j in pidx]
                        for var in vars_:
                            add(t, mem, var, fwd, p, q)
                continue
            ys = {}
            for pi, p in enumerate(pgroups):
                for qi, q in enumerate(qgroups):
                    y = self._var(f"y{ei}_{pi}_{qi}", lowBound=0)
                    ys[(p, q)] = y
                    t, mem, fwd = coef(p, q)
                    add(t, mem, y, fwd, p, q)
            for pi, (p, pidx) in enumerate(pgroups.items()):
                self.prob += pulp.lpSum(ys[(p, q)] for q in qgroups) == pulp.lpSum(xu[j] for j in pidx), f"ep{ei}_{pi}"
            for qi, (q, qidx) in enumerate(qgroups.items()):
                self.prob += pulp.lpSum(ys[(p, q)] for p in pgroups) == pulp.lpSum(xv[j] for j in qidx), f"eq{ei}_{qi}"

    def _shard_factor(self, placements: tuple) -> int:
        f = self._shard_factors.get(placements)
        if f is None:
            f = self._shard_factors[placements] = C._shard_factor(placements, self.mesh.shape)
        return f

    def _var(self, name: str, **kw) -> pulp.LpVariable:
        if hasattr(self.prob, "add_variable"):  # PuLP >= 3.3; LpVariable(...) is deprecated there
            return self.prob.add_variable(name, **kw)
        return pulp.LpVariable(name, **kw)

    def _add_edge_term(self, consumer: str, t: float, mem: float, var, fwd: float = 0.0, edge: int = -1) -> None:
        if t:
            self.time_terms["comm"].append((t, var))
            self.edge_terms[consumer].append((t, var))
        if fwd and var is not None and consumer in self.keys:
            group = self._block_group(self.keys[consumer])
            if group is not None and not self._opens_block(self.keys[consumer].node):
                # a recomputed block runs this collective again in backward (see add_remat_vars)
                self.blocks[group]["comm"].append((edge, fwd, var))
        if mem:
            self.mem_terms["activations"].append((mem, var))

    def _mem(self, cats) -> pulp.LpAffineExpression:
        return pulp.lpSum(c * v if v is not None else c for cat in cats for c, v in self.mem_terms.get(cat, []))

    def memory_exprs(self) -> dict[str, pulp.LpAffineExpression]:
        """Per-rank memory at the two peaks of a step (liveness over forward + backward + step):
        backward start, where every kept activation is live and no gradient exists yet
        (``zero_grad(set_to_none=True)``), and the optimizer step, where every gradient is live and
        the activations are freed. In between, blocks free activations as their gradients appear."""
        rows = {"backward": self._mem(("params", "optimizer", "activations", "activations_after", "blocks",
                                       "backward_grad")),
                "step": self._mem(("params", "optimizer", "grads", "grad_buckets"))}
        if self._remat_vars:
            # while a recomputed block runs its backward, the layers after the blocks are done (their
            # activations freed); the blocks before it still hold what they kept (selective: matmul outputs)
            # and the gradients of those after it have appeared: H >= kept, H >= Grad (add_recompute_hold)
            rows["recompute"] = self._mem(("params", "optimizer", "activations", "recompute", "recompute_hold"))
        return rows

    def add_memory_row(self) -> None:
        if self.budget is not None:
            for name, expr in self.memory_exprs().items():   # in MiB (see _UNIT)
                self.prob += expr * (1 / _UNIT) <= self.budget / _UNIT, f"memory_{name}"

    def add_objective(self) -> None:
        self.prob.setObjective(pulp.lpSum(c * v for terms in self.time_terms.values() for c, v in terms
                                          if v is not None))

    def build(self) -> None:
        self.build_rows()
        self.add_memory_row()
        self.add_objective()

    def build_rows(self) -> None:
        """Every variable and row but the memory budget and the objective (shared with _min_memory)."""
        self.add_node_vars()
        self.add_edge_vars()
        self.add_backward_start_grad()
        self.add_grad_buckets()
        if self.remat:
            self.add_remat_vars()
        self.add_zero_vars()
        self.add_bucket_copy()
        self.add_recompute_hold()
        if self.host is not None:   # after every optimizer-state term (ZeRO's included): it replaces O by O_dev
            O.add_optimizer_offload(self, self.host)
            self.exclude_zero_with_offload()


def _solver(backend: str, time_limit: float):
    if backend in ("auto", "highs"):
        s = pulp.HiGHS(msg=False, timeLimit=time_limit)
        if s.available():
            return s, "highs"
        if backend == "highs":
            raise ShardingError("backend 'highs' needs highspy: pip install highspy (or use backend='cbc')")
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(time_limit))), "cbc"


@contextlib.contextmanager
def _native_stdout_to_stderr():
    """HiGHS prints a banner from C++ on file descriptor 1 however msg is set; keep stdout for results."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable fd 1 (embedded interpreters): leave it
        yield
        return
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def solve(gi: GraphIndex, mesh: MeshSpec, profile: ClusterProfile, *, links: tuple[LinkSpec, ...],
          budget: float | None, fix: dict[str, list[str]] | None = None, backend: str = "auto",
          time_limit: float = 60.0, keys: dict[str, KeyInfo] | None = None, remat: bool = True,
          offload: bool = True, recompute: str | None = None, zero: int | None = None) -> Solution:
    """``offload``: offer activation and optimizer offload (solver.offload; never where the host is the
    device); ``recompute`` / ``zero``: pin those memory decisions (see autopar.plan)."""
    t0 = time.perf_counter()
    keys = keys if keys is not None else collect_keys(gi, mesh, profile, fix)
    host = O.host_link(profile) if offload else None
    ilp = ShardingILP(gi, keys, mesh, links, budget, remat=remat, recompute=recompute, zero=zero, host=host)
    ilp.build()
    t1 = time.perf_counter()
    solver, name = _solver(backend, time_limit)
    with _native_stdout_to_stderr():
        ilp.prob.solve(solver)
    t2 = time.perf_counter()
    status = pulp.LpStatus[ilp.prob.status]
    if ilp.prob.status == pulp.LpStatusNotSolved:   # e.g. the time limit ran out before any plan: not infeasible
        raise ShardingError(f"the sharding ILP found no plan within its time limit of {time_limit:g} s (status "
                            f"{status}); raise time_limit / --time-limit")
    if ilp.prob.status != pulp.LpStatusOptimal:
        if budget is not None:
            need = _min_memory(gi, keys, mesh, links, backend, time_limit, remat, host, recompute, zero)
            if need < budget * (1 - 1e-3) and name == "highs":
                # a plan of peak `need` fits the budget: HiGHS erred (its presolve did once); CBC decides
                log.warning("HiGHS found no plan within %s although one of %s exists; solving with CBC",
                            _fmt_bytes(budget), _fmt_bytes(need))
                cbc, name = _solver("cbc", time_limit)
                ilp.prob.solve(cbc)
                t2, status = time.perf_counter(), pulp.LpStatus[ilp.prob.status]
        if ilp.prob.status != pulp.LpStatusOptimal and budget is not None and need < budget * (1 - 1e-3):
            raise ShardingError(f"the ILP solver found no plan within {_fmt_bytes(budget)} although a plan of "
                                f"{_fmt_bytes(need)} exists (status {status}); try a longer time limit or "
                                f"backend='cbc' / --backend cbc")
        if budget is not None and ilp.prob.status != pulp.LpStatusOptimal:
            considered = "recompute, ZeRO and offload are" if host is not None else "recompute and ZeRO are"
            raise InfeasiblePlanError(
                f"no plan fits {_fmt_bytes(budget)} per device on mesh {mesh.shape}; the smallest feasible budget is "
                f"about {_fmt_bytes(need)} (raise memory_budget / --memory or use a larger mesh; {considered} "
                f"already considered)", min_feasible_bytes=int(math.ceil(need)))
        if ilp.prob.status != pulp.LpStatusOptimal:
            raise ShardingError(f"the sharding ILP ended with status {status}; try a longer time limit")
    ilp.settle_remat()
    ilp.settle_hold()
    opt_off = O.settle_optimizer_offload(ilp, _value)
    over = _over_budget(ilp, budget)
    if over and name == "highs":
        # HiGHS has returned (at its time limit) an incumbent that breaks a memory row: CBC decides
        log.warning("HiGHS's plan breaks the %s memory row (%s over %s); solving with CBC", over[0],
                    _fmt_bytes(over[1]), _fmt_bytes(budget))
        cbc, name = _solver("cbc", time_limit)
        ilp.prob.solve(cbc)
        t2, status = time.perf_counter(), pulp.LpStatus[ilp.prob.status]
        ilp.settle_remat()
        ilp.settle_hold()
        opt_off = O.settle_optimizer_offload(ilp, _value)
        over = _over_budget(ilp, budget) if ilp.prob.status == pulp.LpStatusOptimal else ("every", math.inf)
    if over:
        raise ShardingError(f"the ILP solver returned a plan over the {_fmt_bytes(budget)} budget (the {over[0]} "
                            f"memory row by {_fmt_bytes(over[1])}); try a longer time limit or another backend")
    optimal = getattr(ilp.prob, "sol_status", pulp.LpSolutionOptimal) == pulp.LpSolutionOptimal
    chosen = {}
    for key, xs in ilp.x.items():
        j = max(range(len(xs)), key=lambda i: _value(xs[i]))
        chosen[key] = keys[key].strategies[j]
    tb = {k: sum(c * _value(v) for c, v in terms) for k, terms in ilp.time_terms.items()}
    mb = {k: sum(c * _value(v) for c, v in terms) for k, terms in ilp.mem_terms.items()}
    et = {k: sum(c * _value(v) for c, v in terms) for k, terms in ilp.edge_terms.items()}
    peak = max(float(pulp.value(e) or 0.0) for e in ilp.memory_exprs().values())
    remat_counts = ilp.remat_counts()
    host_bytes = mb.get("host", 0.0) + opt_off["host_bytes"]
    zero_choice = ilp.zero_choice()
    return Solution(chosen=chosen, keys=keys, status=status, optimal=optimal,
                    objective=float(pulp.value(ilp.prob.objective) or 0.0), backend=name,
                    num_variables=ilp.prob.numVariables(), num_constraints=ilp.prob.numConstraints(),
                    build_s=t1 - t0, solve_s=t2 - t1,
                    time_breakdown={"compute_s": tb.get("compute", 0.0), "comm_s": tb.get("comm", 0.0),
                                    "recompute_s": tb.get("recompute", 0.0), "offload_s": tb.get("offload", 0.0)},
                    memory_breakdown={"params": mb.get("params", 0.0), "grads": mb.get("grads", 0.0),
                                      "optimizer": mb.get("optimizer", 0.0),
                                      "activations": sum(mb.get(k, 0.0) for k in ("activations", "activations_after",
                                                                                   "blocks", "backward_grad"))},
                    edge_time=et, peak_bytes=peak, remat=remat_counts, offload=ilp.offload_counts(),
                    optimizer_offload=bool(opt_off["offloaded"]), host_bytes=host_bytes, zero=zero_choice)


def _over_budget(ilp: ShardingILP, budget: float | None) -> tuple[str, float] | None:
    """The first memory row the solution breaks (beyond the solver's tolerance) and by how many bytes."""
    if budget is None:
        return None
    for row, expr in ilp.memory_exprs().items():
        excess = float(pulp.value(expr) or 0.0) - budget
        if excess > 1e-4 * budget + _UNIT * 1e-3:
            return row, excess
    return None


def _min_memory(gi, keys, mesh, links, backend, time_limit, remat: bool = True,
                host: O.HostLink | None = None, recompute: str | None = None, zero: int | None = None) -> float:
    """The smallest peak (max over the memory rows) any plan reaches, recompute, ZeRO and offload included."""
    ilp = ShardingILP(gi, keys, mesh, links, math.inf, remat=remat, recompute=recompute, zero=zero, host=host)
    ilp.build_rows()
    peak = ilp._var("peak", lowBound=0)   # MiB (see _UNIT)
    for name, expr in ilp.memory_exprs().items():
        ilp.prob += peak >= expr * (1 / _UNIT), f"peak_{name}"
    ilp.prob.setObjective(peak)
    solver, _ = _solver(backend, time_limit)
    with _native_stdout_to_stderr():
        ilp.prob.solve(solver)
    if ilp.prob.status != pulp.LpStatusOptimal:
        raise ShardingError(f"the minimum-memory ILP ended with status {pulp.LpStatus[ilp.prob.status]}; "
                            f"try a longer time limit")
    return float(pulp.value(ilp.prob.objective) or 0.0) * _UNIT


def _fmt_bytes(b: float) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= k:
            return f"{b / k:.2f} {unit}"
    return f"{b:.0f} B"
