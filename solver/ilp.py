r"""The sharding ILP: one binary choice per graph key, resharding on edges, memory per rank.

Notation: K graph keys (a key stands for m_k identical nodes of the full model: repeated layers
share variables), S_k the strategies of key k, E the edge classes (producer key u, output o,
consumer key v, argument a) with multiplicity m_e.

The model is one solver.model.ShardingModel; this module builds it in order (ShardingILP.build_rows)
from its parts, each written through the model's public interface: the node one-hots (here), the edges
(solver.edges), the gradient buckets (solver.buckets), recompute (solver.remat), ZeRO (solver.zero_rows)
and offload (solver.offload); solver.backend runs the solver. Terms go in by category
(solver.categories: TimeCategory for the objective, MemCategory for memory, whose table ROWS says
which memory row each enters).

Variables
  x_{k,s} in {0,1}                       key k uses strategy s                      (ShardingILP.add_node_vars)
  y_{e,p,q} >= 0 (continuous)            edge e carries producer placement p to consumer group q,
                                         q = (required input placement, consumer's split mesh dims)
                                                                                    (edges.add_edge_vars)
Objective (predicted step time, seconds; ShardingModel.objective, the TimeCategory terms)
  min  sum_k m_k sum_s x_{k,s} (C^fwd_{k,s} + C^bwd_{k,s})                         COMPUTE  (add_node_vars)
     + sum_e m_e sum_{p,q} y_{e,p,q} (T^fwd(p->q) + T^bwd(g(q)->g(p)))             COMM: resharding,
                                                                                    including the data-
                                                                                    parallel gradient
                                                                                    all-reduce (bucketed:
                                                                                    latency shared per
                                                                                    bucket; add_edge_vars)
Constraints
  sum_s x_{k,s} = 1                                  for every k                    (add_node_vars)
  sum_q y_{e,p,q} = sum_{s: out_o(s)=p} x_{u,s}      for every e, p                 (edges.add_edge_vars)
  sum_p y_{e,p,q} = sum_{s: grp_a(s)=q} x_{v,s}      for every e, q                 (edges.add_edge_vars)
  memory rows, one per peak of a training step (categories.ROWS, ShardingModel.memory_exprs,
  ShardingILP.add_memory_row; in MiB):
    backward start:  P + O + A_rest + sum_g kept_g + G_edges + G_out  <= budget
    end of backward / optimizer step:  P + O + Grad + B                <= budget
    recompute:       P + O + A_before + sum_g T_g + H              <= budget   (when blocks recompute)
                     H >= sum_g kept_g,  H >= Grad   (remat.Remat.add_hold)
     P, Grad, O: parameter, gradient and AdamW bytes of placeholders (sum_k m_k sum_s x M_{k,s});
     A: bytes autograd keeps for backward, measured per node by solver.saved (not by rule);
     G_edges: resharded copies a consumer keeps for backward (solver.saved's kept_by: a parameter's
       gathered copy, or an activation's copy, instead of the producer's tensor where only the copy is
       kept), sum_e m_e sum y G_{e,p,q}; inside a repeated block they join kept_g (below);
     G_out: the first gradient of backward (the loss's input, e.g. the logits; cross-entropy holds two)
       and the backward collectives of the reshardings it flows through (edges.add_backward_start_grad,
       edges.add_edge_vars), and the model's outputs as returned (replicated), which the caller holds
       (edges.add_model_outputs: a bare HF model's logits and key/value cache);
     B: the data-parallel gradients the reducer copies into its last bucket, at most one bucket
       (buckets.GradBuckets);
     O and Grad less the ZeRO-1/2 shares (zero_rows.ZeroRows.build);
     kept_g, B_g, T_g: repeated blocks under the recompute decisions (remat.Remat.build).
  Recompute (solver/remat.py, Remat.build): per repeated-block list, integer counts of blocks kept /
  recomputed selectively / recomputed fully; their forward time, compute and the collectives inside
  the block (a ZeRO-3 parameter's all-gather among them) and the per-op checkpoint surcharges
  (cost.checkpoint_overhead), joins the objective (TimeCategory.RECOMPUTE).
  A recomputed block in backward (T_g) holds its activations, the resharded copies its consumers keep
  and its largest backward collective: M_g >= sum_{p,q} c_{e,p,q} y_{e,p,q}, one row per edge e into
  the block (y of an edge is one-hot). The copies kept by all blocks of a list are one sum
  K_g = sum_e sum_{p,q} G_{e,p,q} y_{e,p,q} / N (one row); the blocks that keep everything keep it,
  K_g c_keep, offloaded ones move it, K_g c_off, each product exact with the count in binary,
  c = sum_b 2^b beta_b, and w_b >= K_g - K_max (1 - beta_b), w_b >= K_min beta_b (remat._times_count):
  a few rows per list where one v per (y, mode) made llama3-8b's ILP 9x larger.
  Offload (solver/offload.py, only where the host is not the device): a fourth count per block list,
  blocks whose saved activations go to host memory (their copies' time beyond the block's compute
  joins the objective, TimeCategory.OFFLOAD; offload.add_block_offload), and one binary for optimizer
  states on the host (O_dev >= O - U z replaces O in the rows; grads down, params up and the CPU step
  join the objective; offload.OptimizerOffload).
  ZeRO-1/2 (solver/zero_rows.py, ZeroRows.build): per parameter key and placement, binaries w1 + w2 <= x
  for optimizer states (and gradients) sharded over the parameter's replicated mesh dims; their
  all-gather (and reduce-scatter) joins the objective (TimeCategory.COMM). ZeRO-3 is a sharded
  parameter placement.
An edge whose producer (or consumer) has a single placement group needs no y: its cost is
written directly on the other side's x (edges.add_edge_vars). Fixed placements (``fix=``) drop the
other strategies of the matching keys before the model is built; preferred ones (``prefer=``) do
the same for ops that have such a strategy and leave the others free (keys.collect_keys).

A budget solve whose recompute counts are free runs in two stages (_solve_keeping_blocks, _solve_below):
first with c_keep = N for every list, whose LP relaxation is nearly tight, then the full model with that
plan's objective as a cutoff. The full model's relaxation is weak (fractional x with the v products lets a
memory-heavy plan be "the recomputed blocks" and a light one "the kept blocks"): alone it often ends at
its time limit with a plan worse than stage one's. Staged, the plan is never slower than the best plan
without recompute, stage one's plan is proven optimal where the full model finds nothing below it, and
where the full model finds nothing within the limit the plan is stage one's, the same in any process.

Inference (``training=False``, autopar.plan's inference mode): the same one-hots and edges, with
  min  sum_k m_k sum_s x_{k,s} C^fwd_{k,s} + sum_e m_e sum_{p,q} y_{e,p,q} T^fwd(p->q)
  one memory row (categories.INFERENCE_ROWS):  P + L + KV <= budget
     P: parameter bytes alone (no gradient, no optimizer state; keys.collect_keys(training=False));
     L: the activations live at the forward's peak, KV: this rank's part of the declared KV cache by the
       attention ops' head split (both solver.forward_memory.ForwardMemory);
  and no loss gradient, kept copy, gradient bucket, recompute, ZeRO or offload term or variable. A second
  solve (_least_memory) keeps the step time within 1e-6 of the first's and minimizes P + L + KV: without
  gradients, plans that place a weight replicated or sharded often tie on time.

When the memory row makes the problem infeasible, a second solve minimizes the left-hand side to
report the smallest feasible budget (_min_memory, InfeasiblePlanError). Every solve goes through
backend.solve_problem (HiGHS, CBC where HiGHS is missing or, for this ILP, where it answers wrongly).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pulp

from autopar.cluster.profile import ClusterProfile, LinkSpec
from autopar.core.errors import ConfigError, InfeasiblePlanError, ShardingError
from autopar.core.graph import GraphIndex
from autopar.core.mesh import MeshSpec
from autopar.solver import backend as B
from autopar.solver import cost as C
from autopar.solver import edges as E
from autopar.solver import offload as O
from autopar.solver.buckets import GradBuckets
from autopar.solver.categories import INFERENCE_ROWS
from autopar.solver.forward_memory import ForwardMemory
from autopar.solver.keys import OUTPUT, KeyInfo, collect_keys
from autopar.solver.model import ACTIVATION_CATEGORIES, UNIT, MemCategory, ShardingModel, TimeCategory, value
from autopar.solver.remat import Remat
from autopar.solver.strategies import Strategy
from autopar.solver.zero_rows import ZeroRows

__all__ = ["OUTPUT", "KeyInfo", "ShardingILP", "Solution", "collect_keys", "solve"]
log = logging.getLogger(__name__)


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


class ShardingILP(ShardingModel):
    """Builds the ILP of the module docstring: the node one-hots here, the rest from its parts, in order."""

    def __init__(self, gi: GraphIndex, keys: dict[str, KeyInfo], mesh: MeshSpec, links: tuple[LinkSpec, ...],
                 budget: float | None, remat: bool = False, recompute: str | None = None,
                 zero: int | None = None, host: O.HostLink | None = None, training: bool = True,
                 kv_cache_bytes: int | None = None, output_rebuild_bytes: float = 0.0,
                 grad_sync_scale: float = 1.0) -> None:
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
        if not training and (recompute not in (None, "none") or zero not in (None, 0) or host is not None):
            raise ConfigError("an inference ILP (training=False) takes no recompute, ZeRO or offload decision")
        if training and kv_cache_bytes is not None:
            raise ConfigError("kv_cache_bytes is for an inference ILP (training=False)")
        self.training = training
        self.output_rebuild_bytes = output_rebuild_bytes   # edges.add_model_outputs
        self.grad_sync_scale = grad_sync_scale             # edges.add_edge_vars: the bucketed gradient sums
        remat = remat and training
        # recompute decisions only where memory is constrained (with memory to spare they cost time only),
        # or where they are told
        super().__init__(gi, keys, mesh, links, remat=bool(gi.shared_lists) and recompute != "none" and (
            recompute is not None or (remat and budget is not None)))
        self.budget, self.recompute, self.zero = budget, recompute, zero
        # offload (solver.offload) only to a host that is not the device, and where memory is constrained
        self.host = host if budget is not None or recompute == "offload" else None
        self.merge_trivial = True
        self.remat_rows = Remat(self, recompute=recompute, host=self.host)
        self.buckets = GradBuckets(self)
        self.zero_rows = ZeroRows(self, self.buckets, zero=zero)
        self.opt_offload = O.OptimizerOffload(self, self.host) if self.host is not None else None
        self.forward_memory = None if training else ForwardMemory(self, kv_cache_bytes=kv_cache_bytes)

    def build(self) -> None:
        self.build_rows()
        self.add_memory_row()
        self.prob.setObjective(self.objective())

    def build_rows(self) -> None:
        """Every variable and row but the memory budget and the objective (shared with _min_memory)."""
        self.add_node_vars()
        if not self.training:   # the forward alone: no backward, gradients, optimizer or memory decisions
            E.add_edge_vars(self, self.remat_rows, live=self.forward_memory)
            self.forward_memory.build()
            return
        E.add_edge_vars(self, self.remat_rows)
        E.add_backward_start_grad(self)
        E.add_model_outputs(self)
        self.buckets.collect()
        if self.remat:
            self.remat_rows.build()
        self.zero_rows.build()
        self.buckets.build()              # after ZeRO: ZeRO-2 gradients are reduce-scattered, not bucketed
        self.remat_rows.add_hold()        # after ZeRO: ZeRO-2 shrinks gradients
        if self.opt_offload is not None:  # after every optimizer-state term (ZeRO's included): O_dev replaces O
            self.opt_offload.build()
            self.zero_rows.exclude_host_optimizer(self.opt_offload.switch)

    def add_node_vars(self) -> None:
        producers: dict[str, set[tuple[str, int]]] = defaultdict(set)
        for (ku, o, kv, a), _ in self.gi.edge_classes().items():
            if a == 0:
                producers[kv].add((ku, o))
        for i, (key, info) in enumerate(self.keys.items()):
            xs = self._follow_exprs(info, producers.get(key, set()))
            if xs is None:
                xs = [self.var(f"x{i}_{j}", cat="Binary") for j in range(len(info.strategies))]
                self.add_row(pulp.lpSum(xs) == 1, f"one_{i}")
            else:
                self.merged[key] = next(iter(producers[key]))
            self.x[key] = xs
            group = self.block_list(info)
            if group is not None:
                self.remat_rows.record_key(group, info, xs)
            for j, (c, mem) in enumerate(zip(info.compute, info.memory)):
                t = c.total if self.training else c.fwd_s
                if t:
                    self.add_time(TimeCategory.COMPUTE, [(info.mult * t, xs[j])])
                for cat, b in mem.items():
                    if not b or (group is not None and cat is MemCategory.ACTIVATIONS):
                        continue   # a block's activations are charged by Remat.build
                    after = cat is MemCategory.ACTIVATIONS and self.remat and self.position(info.node) > self.blocks_end
                    self.add_mem(MemCategory.ACTIVATIONS_AFTER if after else cat, [(info.mult * b, xs[j])])

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

    def memory_exprs(self) -> dict[str, pulp.LpAffineExpression]:
        """The training step's rows (ShardingModel.memory_exprs), or an inference plan's one forward row
        (categories.INFERENCE_ROWS)."""
        if self.training:
            return super().memory_exprs()
        return {row: self.mem(cats) for row, cats in INFERENCE_ROWS.items()}

    def add_memory_row(self) -> None:
        if self.budget is not None:
            for name, expr in self.memory_exprs().items():   # in MiB (see UNIT)
                self.add_row(expr * (1 / UNIT) <= self.budget / UNIT, f"memory_{name}")


def solve(gi: GraphIndex, mesh: MeshSpec, profile: ClusterProfile, *, links: tuple[LinkSpec, ...],
          budget: float | None, fix: dict[str, list[str]] | None = None, backend: str = "auto",
          time_limit: float = 60.0, keys: dict[str, KeyInfo] | None = None, remat: bool = True,
          offload: bool = True, recompute: str | None = None, zero: int | None = None, training: bool = True,
          kv_cache_bytes: int | None = None, output_rebuild_bytes: float = 0.0,
          grad_sync_scale: float = 1.0) -> Solution:
    """``offload``: offer activation and optimizer offload (solver.offload; never where the host is the
    device); ``recompute`` / ``zero``: pin those memory decisions (see autopar.plan). ``training=False``:
    the inference ILP (the forward alone, solver.forward_memory; ``kv_cache_bytes`` its declared KV cache),
    which takes none of those decisions; ``keys`` must then come from collect_keys(training=False).
    ``output_rebuild_bytes``: what handing the outputs back in the model's structure allocates
    (solver.saved.output_rebuild_bytes; edges.add_model_outputs). ``grad_sync_scale``: the share of the
    bucketed data-parallel gradient sums one solved step pays (a pipeline's unit solve at one of m
    micro-batches: 1/m, as the pipeline runtime sums gradients once per step)."""
    t0 = time.perf_counter()
    keys = keys if keys is not None else collect_keys(gi, mesh, profile, fix, training=training)
    host = O.host_link(profile) if offload and training else None
    mode = {"output_rebuild_bytes": output_rebuild_bytes, "grad_sync_scale": grad_sync_scale} if training else \
        {"training": False, "kv_cache_bytes": kv_cache_bytes}
    ilp = ShardingILP(gi, keys, mesh, links, budget, remat=remat, recompute=recompute, zero=zero, host=host, **mode)
    ilp.build()
    t1 = time.perf_counter()
    need: list[float] = []   # the smallest feasible peak, solved for once where needed

    def min_memory() -> float:
        if not need:
            need.append(_min_memory(gi, keys, mesh, links, backend, time_limit, remat, host, recompute, zero, mode))
        return need[0]

    def distrust(res: B.SolveResult) -> str | None:
        """Why a HiGHS answer is wrong: no plan although one fits (its presolve erred once), or a plan
        (an incumbent at its time limit) that breaks a memory row."""
        if res.timed_out:
            return None
        if not res.has_plan:
            if budget is not None and min_memory() < budget * (1 - 1e-3):
                return f"HiGHS found no plan within {_fmt_bytes(budget)} although one of {_fmt_bytes(need[0])} exists"
            return None
        ilp.settle()
        over = _over_budget(ilp, budget)
        if over:
            return f"HiGHS's plan breaks the {over[0]} memory row ({_fmt_bytes(over[1])} over {_fmt_bytes(budget)})"
        return None

    stage0 = _solve_keeping_blocks(ilp, backend, time_limit) if budget is not None else None
    if stage0 is None:
        res = B.solve_problem(ilp.prob, backend=backend, time_limit=time_limit, distrust=distrust)
    else:
        res = _solve_below(ilp, stage0, backend, max(1.0, time_limit - stage0[0].seconds), distrust)
    if not training and res.has_plan and not res.timed_out:
        res = _least_memory(ilp, res, backend, time_limit)
    t2 = time.perf_counter()
    if res.timed_out:   # e.g. the time limit ran out before any plan: not infeasible
        raise ShardingError(f"the sharding ILP found no plan within its time limit of {time_limit:g} s (status "
                            f"{res.status}); raise time_limit / --time-limit")
    if not res.has_plan:
        if budget is None:
            raise ShardingError(f"the sharding ILP ended with status {res.status}; try a longer time limit")
        if min_memory() < budget * (1 - 1e-3):
            raise ShardingError(f"the ILP solver found no plan within {_fmt_bytes(budget)} although a plan of "
                                f"{_fmt_bytes(need[0])} exists (status {res.status}); try a longer time limit or "
                                f"backend='cbc' / --backend cbc")
        considered = "recompute, ZeRO and offload are" if host is not None else "recompute and ZeRO are"
        advice = f"{considered} already considered" if training else \
            "an inference plan holds parameters, live activations and the declared KV cache: lower kv_cache_bytes"
        raise InfeasiblePlanError(
            f"no plan fits {_fmt_bytes(budget)} per device on mesh {mesh.shape}; the smallest feasible budget is "
            f"about {_fmt_bytes(need[0])} (raise memory_budget / --memory or use a larger mesh; {advice})",
            min_feasible_bytes=int(math.ceil(need[0])))
    ilp.settle()
    over = _over_budget(ilp, budget)
    if over:
        raise ShardingError(f"the ILP solver returned a plan over the {_fmt_bytes(budget)} budget (the {over[0]} "
                            f"memory row by {_fmt_bytes(over[1])}); try a longer time limit or another backend")
    return _solution(ilp, res, t1 - t0, t2 - t1)


def _solve_keeping_blocks(ilp: ShardingILP, backend: str, time_limit: float
                          ) -> tuple[B.SolveResult, float, dict[str, float | None]] | None:
    """Stage one of a budget solve whose recompute counts are the solver's: the same model with every
    block keeping its activations (c_keep = N for every list). Where the full model's LP relaxation is weak
    (the products of strategy one-hots and recompute fractions, Remat.build, relax to mixtures of a
    memory-heavy and a light plan, each recomputed as suits it: zoo LLaMA (2, 2) at 40 %: root bound 0.0151 s
    against plans of 0.0182 s, 60 s without proof), this one's is nearly tight (0.01817 against 0.01817:
    proven optimal in ~4 s). Its plan bounds the full solve from above (_solve_below), proven optimal or not (a
    plan found at the time limit is kept: the full solve may still prove it optimal, "Infeasible" below it, or
    find nothing in the time left, and then it is the answer rather than no plan at all). Returns (result,
    objective, every variable's value), or None: nothing to stage (recompute told or absent, no HiGHS for
    the cutoff), or no plan without recompute."""
    lists = ilp.remat_rows.lists
    if not lists or ilp.recompute is not None or not B.cutoff_supported(backend):
        return None
    keep = [(lv.counts["keep"], lv.counts["keep"].lowBound) for lv in lists.values()]
    for (var, _), g in zip(keep, lists):
        var.lowBound = ilp.gi.layer_counts[g]   # c_keep = N (its upper bound): no block recomputes
    try:
        res = B.solve_problem(ilp.prob, backend=backend, time_limit=time_limit)
    finally:
        for var, low in keep:
            var.lowBound = low
    log.info("stage one (no recompute): %s, %s, %.1f s", res.status, "optimal" if res.optimal else "not proven",
             res.seconds)
    if not res.has_plan:
        return None
    return res, float(pulp.value(ilp.prob.objective) or 0.0), {v.name: v.varValue for v in ilp.prob.variables()}


def _solve_below(ilp: ShardingILP, stage0: tuple[B.SolveResult, float, dict[str, float | None]], backend: str,
                 time_limit: float, distrust) -> B.SolveResult:
    """The full solve with stage one's objective T0 as a cutoff: a plan below it wins; "Infeasible" proves
    stage one's plan optimal for the full model (restored, optimal); no plan within the time limit restores
    it, not proven (the same plan in any process where stage one's was proven optimal: it does not depend on
    how far the search got). The cutoff
    sits 1e-4 below T0 (HiGHS's relative gap: it may report a plan within that of the bound), and a plan
    it returns that is not below T0 loses to stage one's."""
    res0, t0, values = stage0
    cut = t0 * (1 - 1e-4)

    def no_cutoff_doubt(res: B.SolveResult) -> str | None:
        return None if not res.has_plan else distrust(res)   # "Infeasible" here means: nothing below T0

    res = B.solve_problem(ilp.prob, backend=backend, time_limit=time_limit, distrust=no_cutoff_doubt, cutoff=cut)
    log.info("full model below stage one's %.6g s: %s, %.1f s", t0, res.status, res.seconds)
    seconds = res0.seconds + res.seconds
    if res.has_plan and float(pulp.value(ilp.prob.objective) or 0.0) < t0:
        return dataclasses.replace(res, seconds=seconds)
    for v in ilp.prob.variables():
        v.varValue = values[v.name]
    proven = res.status == "Infeasible" or (res.has_plan and res.optimal)
    return dataclasses.replace(res0, optimal=proven, seconds=seconds)


def _least_memory(ilp: ShardingILP, res: B.SolveResult, backend: str, time_limit: float) -> B.SolveResult:
    """An inference solve's second stage: among the plans within 1e-6 of the fastest one's step time, the one
    with the smallest forward peak. Without backward there is no gradient reduction to price a parameter's
    placement: a rank holding a whole weight computes its slice of a sharded matmul as fast as one holding the
    slice (the R -> S(d) reshard is a local view), so plans tie on time and only memory tells them apart (the
    memory the engine then has for its KV cache). The objective stays the step time; where this stage finds
    nothing within the time limit, the first plan stands."""
    values = {v.name: v.varValue for v in ilp.prob.variables()}
    best = float(pulp.value(ilp.prob.objective) or 0.0)
    time_expr = ilp.objective()
    ilp.add_row(time_expr <= best * (1 + 1e-6) + 1e-12, "time_at_best")
    ilp.prob.setObjective(pulp.lpSum(ilp.memory_exprs().values()) * (1 / UNIT))   # one row: the forward peak
    second = B.solve_problem(ilp.prob, backend=backend, time_limit=time_limit)
    ilp.prob.setObjective(time_expr)
    if second.has_plan:
        return dataclasses.replace(res, seconds=res.seconds + second.seconds)
    for v in ilp.prob.variables():
        v.varValue = values[v.name]
    return res


def _solution(ilp: ShardingILP, res: B.SolveResult, build_s: float, solve_s: float) -> Solution:
    """The solved model read back: choices, decisions, time and memory by category."""
    chosen = {}
    for key, xs in ilp.x.items():
        j = max(range(len(xs)), key=lambda i: value(xs[i]))
        chosen[key] = ilp.keys[key].strategies[j]
    tb = {cat: sum(c * value(v) for c, v in ilp.time_terms(cat)) for cat in TimeCategory}
    mb = {cat: sum(c * value(v) for c, v in ilp.mem_terms(cat)) for cat in MemCategory}
    et = {k: sum(c * value(v) for c, v in terms) for k, terms in ilp.edge_terms.items()}
    peak = max(float(pulp.value(e) or 0.0) for e in ilp.memory_exprs().values())
    opt_off = ilp.opt_offload
    kv = {} if ilp.training else {"kv_cache": mb[MemCategory.KV_CACHE]}   # inference: the declared cache's part
    return Solution(chosen=chosen, keys=ilp.keys, status=res.status, optimal=res.optimal,
                    objective=float(pulp.value(ilp.prob.objective) or 0.0), backend=res.backend,
                    num_variables=ilp.prob.numVariables(), num_constraints=ilp.prob.numConstraints(),
                    build_s=build_s, solve_s=solve_s,
                    time_breakdown={f"{cat.value}_s": tb[cat] for cat in TimeCategory},
                    memory_breakdown={"params": mb[MemCategory.PARAMS], "grads": mb[MemCategory.GRADS],
                                      "optimizer": mb[MemCategory.OPTIMIZER],
                                      "activations": sum(mb[c] for c in ACTIVATION_CATEGORIES), **kv},
                    edge_time=et, peak_bytes=peak, remat=ilp.remat_rows.counts(),
                    offload=ilp.remat_rows.offload_counts(),
                    optimizer_offload=opt_off is not None and opt_off.offloaded(),
                    host_bytes=mb[MemCategory.HOST] + (opt_off.host_bytes() if opt_off is not None else 0.0),
                    zero=ilp.zero_rows.choice())


def _over_budget(ilp: ShardingModel, budget: float | None) -> tuple[str, float] | None:
    """The first memory row the solution breaks (beyond the solver's tolerance) and by how many bytes."""
    if budget is None:
        return None
    for row, expr in ilp.memory_exprs().items():
        excess = float(pulp.value(expr) or 0.0) - budget
        if excess > 1e-4 * budget + UNIT * 1e-3:
            return row, excess
    return None


def _min_memory(gi, keys, mesh, links, backend, time_limit, remat: bool = True,
                host: O.HostLink | None = None, recompute: str | None = None, zero: int | None = None,
                mode: dict | None = None) -> float:
    """The smallest peak (max over the memory rows) any plan reaches, recompute, ZeRO and offload included
    (``mode``: ShardingILP's training / kv_cache_bytes arguments of an inference ILP)."""
    ilp = ShardingILP(gi, keys, mesh, links, math.inf, remat=remat, recompute=recompute, zero=zero, host=host,
                      **(mode or {}))
    ilp.build_rows()
    peak = ilp.var("peak", lowBound=0)   # MiB (see UNIT)
    for name, expr in ilp.memory_exprs().items():
        ilp.add_row(peak >= expr * (1 / UNIT), f"peak_{name}")
    ilp.prob.setObjective(peak)
    res = B.solve_problem(ilp.prob, backend=backend, time_limit=time_limit)
    if not res.has_plan:
        raise ShardingError(f"the minimum-memory ILP ended with status {res.status}; try a longer time limit")
    return float(pulp.value(ilp.prob.objective) or 0.0) * UNIT


def forward_only(sol: Solution) -> float:
    """After an inference solve (and fusion.unfuse_broken, whose fused costs count backward too): every key's
    compute made the forward's alone, for the plan's tables; returns the chosen strategies' forward compute
    seconds less the solve's ``compute_s`` (the change unfusing broken groups made)."""
    now = 0.0
    for key, info in sol.keys.items():
        info.compute = [C.OpCost(c.fwd_s, 0.0) for c in info.compute]
        now += info.mult * info.compute[info.strategies.index(sol.chosen[key])].fwd_s
    return now - sol.time_breakdown["compute_s"]


def _fmt_bytes(b: float) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= k:
            return f"{b / k:.2f} {unit}"
    return f"{b:.0f} B"
