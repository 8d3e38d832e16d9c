r"""Inter-op planner: partition a model's layer sequence into pipeline stages (Alpa-style DP).

Inputs are per-unit costs measured by the intra-op ILP (``unit_costs``): the model is a prefix
(embeddings), ``n`` identical blocks and a suffix (head, loss); the ILP is solved once per
micro-batch size on the non-pp sub-mesh with the blocks folded, so every block (and every stage
made of blocks) shares one solve. For a unit ``u``: ``t_u`` forward+backward seconds (compute and
resharding, one micro-batch), ``w_u`` parameter + gradient + optimizer bytes per rank, ``a_u``
activation bytes saved per micro-batch. Stage ``s`` holding blocks ``[j, i)`` (the prefix joins
the first stage, the suffix the last) has

    T_s = sum_{u in s} t_u + c_s                c_s = 2 (alpha + beta * this rank's bytes of the boundary
                                                      activation) + g when s is not the last stage
    M_s = sum_{u in s} w_u + f_s * sum_{u in s} a_u

Stage boundaries are sent per rank (``send_placement``): every rank of a stage sends its own piece of the
boundary value, in the placements the producing op has on the sub-mesh, to the rank with the same sub-mesh
coordinates in the next stage, which takes it in those placements (no gather). A partial sum cannot be sent
per rank: it is summed over its mesh dim first (``P -> R``). Where the value is whole on a mesh dim it may be
cut over that dim before the send and gathered again on the receiving side (Megatron-LM's scatter/gather,
Narayanan et al. SC'21 sec. 4.1), when that is cheaper. ``g`` is that resharding, forward and backward,
on the sub-mesh (``boundary_seconds``, ``cost.transition_time``); the plan records each stage's send placements
(``pipeline.stages[i].send_placements``, written by ``autopar.frontend.pipeline``, run by
``autopar.frontend.applying.apply_pipeline``). ``f_s`` is the micro-batches in flight on that stage: GPipe ``m``;
1F1B ``min(m, p - s)``;
interleaved 1F1B (``v`` chunks per rank, stage ``s`` on rank ``s mod p``) the Megatron warm-up
count ``min(m v, (v - 1) p + 2 (p - r - 1) + 1)`` divided over the rank's ``v`` chunks.

Every micro-batch after the first adds its parameter gradients into the ones already there (autograd
accumulates into ``.grad``): ``g_u`` seconds per micro-batch, a memory-bound add over the unit's
gradient bytes (read two, write one) at the profile's bandwidth, plus one op overhead per parameter.
It grows with ``m`` while the bubble shrinks, so at small micro-batches it sets how many pay off.

Data-parallel gradient sums run once per step (``autopar.runtime.pipeline.StepReducer``: the micro-batches
accumulate local gradients, the bucketed all-reduces run after the schedule): ``y_u`` seconds, the
gradient (backward) part of the unit's edges the intra-op ILP prices as bucketed
(``solver.edges.grad_priced_bucketed``), taken out of ``t_u``. A rank's reduction starts when its schedule
ends; we charge the largest, ``Y = max_r sum_{s on r} y_s``, after the pipeline (no overlap).

Activation recompute (full, per stage: every block of a stage is run under ``torch.utils.checkpoint``, as
``codegen.checkpoint_regions`` does for ``"<block>:full"`` entries of the stage's plan): a recomputed
block costs ``t_u + r_u`` (``r_u`` its forward again: compute, forward collectives and the checkpoint
surcharge ``cost.checkpoint_overhead``) and keeps ``k_u`` bytes per micro-batch (its input, in its chosen
placement) instead of ``a_u``; while one block is recomputed in backward its ``a_u`` is live once more:

    T_s^rc = T_s + sum_{blocks} r_u          M_s^rc = sum w_u + f_s (A_s - sum_{blocks} (a_u - k_u)) + a_block

A stage recomputes only where keeping its activations does not fit (or always / never when
``recompute="full"`` / ``"none"`` is told).

Step time for ``S = p v`` stages on ``p`` ranks and ``m`` micro-batches (``R_r = sum`` of the
stage times on rank ``r``, ``G_r`` of their accumulation times):

    T = max_r (m R_r + (m - 1) G_r) + (p - 1) * max_r R_r / v + Y        (GPipe, 1F1B: v = 1)

so balanced stages of time ``t`` without accumulation give the bubble fraction ``(p-1) / (v m + p - 1)``;
we report ``bubble = (p - 1) max_r R_r / v`` and ``bubble / T``.

Partition (implemented in ``partition``): for a bound ``t_max`` on the stage time, minimize the
sum of stage times by dynamic programming over layer boundaries,

    F(0, 0) = 0
    F(k, i) = min_{j < i} F(k-1, j) + T(j, i)   over stages with T(j, i) <= t_max and M_k(j, i) <= budget
    T*(t_max) = F(S, n) + (m - 1) * t_max

and take the best ``t_max`` among the distinct stage times (Alpa, Zheng et al. 2022, eq. 2), scanning
them in increasing order and stopping once ``(m - 1) t_max`` alone exceeds the best total. For
interleaved schedules each chunk must fit ``budget / v``. ``search`` tries schedules and micro-batch
counts and returns the fastest partition that fits. This module imports autopar's core only.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from autopar.cluster.profile import ClusterProfile, LinkSpec
from autopar.core.capture import CapturedModel
from autopar.core.errors import ConfigError, InfeasiblePlanError
from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.core.options import PIPELINE_SCHEDULES, PipelineOptions
from autopar.core.placement import Partial, Replicate, Shard
from autopar.solver import cost as C
from autopar.solver import ilp
from autopar.solver.categories import MemCategory
from autopar.solver.cost import autocast_graph
from autopar.solver.edges import grad_priced_bucketed
from autopar.solver.keys import match_fix
from autopar.solver.runtime_model import priced_edges

log = logging.getLogger(__name__)

SCHEDULES = PIPELINE_SCHEDULES


@dataclass(frozen=True, kw_only=True)
class UnitCost:
    """One unit (prefix, one block, suffix) on the sub-mesh for one micro-batch."""

    time_s: float
    static_bytes: float      # params + grads + optimizer state per rank
    act_bytes: float         # activations saved for backward, per micro-batch per rank
    accum_s: float = 0.0     # adding one micro-batch's parameter gradients into the accumulated ones
    sync_s: float = 0.0      # its data-parallel gradient sum (bucketed all-reduces), once per step
    recompute_s: float = 0.0  # a fully recomputed unit's forward again, per micro-batch (blocks only)
    kept_bytes: float = 0.0  # activations a fully recomputed unit keeps per micro-batch (its input)


@dataclass(frozen=True, kw_only=True)
class UnitCosts:
    prefix: UnitCost
    block: UnitCost
    suffix: UnitCost
    num_blocks: int
    boundary_bytes: float    # a rank's piece of one block's output (what each rank sends), per micro-batch
    boundary_reshard_s: float = 0.0  # resharding it to its send placements and back, forward and backward


@dataclass(frozen=True, kw_only=True)
class Partition:
    """A solved pipeline: blocks per stage, schedule and its predicted cost."""

    stages: tuple[tuple[int, ...], ...]       # block indices per stage (stage s on pp rank s mod p)
    schedule: str
    microbatches: int
    virtual_stages: int
    pp: int
    stage_time_s: tuple[float, ...]
    stage_memory_bytes: tuple[float, ...]
    stage_extra_inflight_bytes: tuple[float, ...]   # activations of the micro-batches in flight beyond one
    step_time_s: float
    bubble_s: float
    comm_s: float
    accum_s: float = 0.0     # gradient accumulation over the micro-batches, on the critical rank
    sync_s: float = 0.0      # data-parallel gradient sums after the schedule (the slowest rank's), once per step
    stage_recompute: tuple[bool, ...] = ()   # per stage: its blocks recompute their activations in backward
    recompute_s: float = 0.0  # the recomputed forwards on the critical rank, over the step

    @property
    def bubble_fraction(self) -> float:
        return self.bubble_s / self.step_time_s if self.step_time_s > 0 else 0.0

    @property
    def rank_memory_bytes(self) -> tuple[float, ...]:
        out = [0.0] * self.pp
        for s, mem in enumerate(self.stage_memory_bytes):
            out[s % self.pp] += mem
        return tuple(out)


# ------------------------------------------------------------------------------------------ unit costs


def matching_patterns(gi, fix: dict | None, prefer: dict | None) -> tuple[dict, dict]:
    """The ``fix`` / ``prefer`` patterns that take some graph key of ``gi``, first pattern winning as in
    ilp.collect_keys: a stage (or the whole-model graph the unit costs come from) gets only those, and a
    pattern that takes no key of any stage is an error for the caller to raise."""
    used: set[str] = set()
    for key, members in gi.by_key().items():
        node = members[0]
        if match_fix(key, node, fix or {}, used) is None and node.kind == "op" and prefer:
            match_fix(key, node, prefer, used)
    return ({k: v for k, v in (fix or {}).items() if k in used},
            {k: v for k, v in (prefer or {}).items() if k in used})


def unit_costs(cap: CapturedModel, layer_list: str, mesh: MeshSpec, profile: ClusterProfile,
               links: tuple[LinkSpec, ...], *, budget: float | None = None, backend: str = "auto",
               time_limit: float = 60.0, fix: dict | None = None, prefer: dict | None = None,
               compute_dtype: torch.dtype = torch.float32, pp_link: LinkSpec | None = None,
               microbatches: int = 1) -> UnitCosts:
    """Solve the intra-op ILP for ``cap`` (captured at one micro-batch) on the sub-mesh and split its
    chosen costs into prefix / one block / suffix. ``budget`` bounds the whole model's memory on one
    sub-mesh (the caller passes p x the device budget: each of p stages gets one device's); the DP
    then checks every stage, in-flight activations included, against the device budget. ``fix`` /
    ``prefer`` (sub-mesh placements) pin what they match in this graph (see matching_patterns).
    ``compute_dtype``: the plan's autocast dtype (plan.precision): ops are costed at the dtypes autocast gives
    them (solver.cost.autocast_graph); stage boundaries are sent at their captured dtype, as the pipeline
    runtime casts them back to it, in ``send_placement`` (``pp_link``: the link between stages, which decides
    whether a boundary is cut further before the send; None: never). ``microbatches``: how many micro-batches of
    this capture make a step; the solve charges each its 1/m share of the data-parallel gradient sums, which the
    runtime runs once per step (ilp.solve's ``grad_sync_scale``), so the choice of placements is not biased
    towards avoiding a sum it pays m times over."""
    gi32 = index_graph(cap)
    gi = autocast_graph(gi32, compute_dtype, "cpu" if profile.host_is_device else "cuda")
    if layer_list not in gi.layer_counts:
        raise ConfigError(f"{layer_list!r} is not a list of repeated blocks in this model; found "
                          f"{sorted(gi.layer_counts) or 'none'}")
    n = gi.layer_counts[layer_list]
    fix, prefer = matching_patterns(gi, fix, prefer)
    keys = ilp.collect_keys(gi, mesh, profile, fix or None, prefer or None)
    # as the stage plans (autopar.frontend.pipeline): no offload (the stage DP does not account host memory) and
    # no ZeRO in pipeline stages yet
    share = 1.0 / max(1, microbatches)   # of each data-parallel gradient sum, in the solve's edge times
    sol = ilp.solve(gi, mesh, profile, links=links, budget=budget, backend=backend, time_limit=time_limit, keys=keys,
                    offload=False, zero=0, grad_sync_scale=share)
    order = {name: i for i, name in enumerate(gi.nodes)}
    in_block = [order[g.name] for g in gi.nodes.values() if g.layer is not None and g.layer[0] == layer_list]
    first_block = min(in_block)
    acc = {u: {"t": 0.0, "w": 0.0, "a": 0.0, "g": 0.0, "y": 0.0, "r": 0.0, "k": 0.0}
           for u in ("prefix", "block", "suffix")}
    boundary = reshard = 0.0
    sync, fwd_edges = step_edge_seconds(gi, sol.keys, sol.chosen, mesh, links)
    for key, strat in sol.chosen.items():
        info = sol.keys[key]
        node = info.node
        j = info.strategies.index(strat)
        unit = _unit_of(node, gi, layer_list, order, first_block)
        mem = info.memory[j]
        # the data-parallel gradient sums the edges into this key carry run once per step, not per micro-batch
        acc[unit]["t"] += info.mult * info.compute[j].total + sol.edge_time.get(key, 0.0) - share * sync.get(key, 0.0)
        acc[unit]["y"] += sync.get(key, 0.0)
        acc[unit]["r"] += info.mult * (info.compute[j].fwd_s + info.remat_extra.bwd_s) + fwd_edges.get(key, 0.0)
        acc[unit]["w"] += info.mult * sum(v for k, v in mem.items() if k != MemCategory.ACTIVATIONS)
        acc[unit]["a"] += info.mult * mem.get(MemCategory.ACTIVATIONS, 0.0)
        if MemCategory.GRADS in mem:
            acc[unit]["g"] += info.mult * accumulate_time(mem[MemCategory.GRADS], profile)
    for g in gi.nodes.values():   # the last op of a block: its output crosses a stage boundary
        if g.layer is not None and g.layer[0] == layer_list and g.outputs and g.outputs[0] is not None:
            users = [u for u in g.fx_node.users] if g.fx_node is not None else []
            if any(layer_of_gnode(gi, u.name, layer_list) != g.layer for u in users):
                meta = gi32.nodes[g.name].outputs[0]
                src = tuple(sol.chosen[g.key].outputs[0])
                send = send_placement(meta, src, tuple(mesh.shape), links, pp_link)
                boundary = max(boundary, C.local_bytes(meta, send, tuple(mesh.shape)))
                reshard = max(reshard, boundary_seconds(meta, src, send, tuple(mesh.shape), links))
                # what a checkpointed block keeps: its input, the previous block's output, as placed
                acc["block"]["k"] = max(acc["block"]["k"], n * C.local_bytes(
                    meta, sol.chosen[g.key].outputs[0], tuple(mesh.shape)))
    per = {u: UnitCost(time_s=v["t"] / (n if u == "block" else 1), static_bytes=v["w"] / (n if u == "block" else 1),
                       act_bytes=v["a"] / (n if u == "block" else 1), accum_s=v["g"] / (n if u == "block" else 1),
                       sync_s=v["y"] / (n if u == "block" else 1),
                       recompute_s=v["r"] / n if u == "block" else 0.0,
                       kept_bytes=min(v["k"], v["a"]) / n if u == "block" else v["a"])
           for u, v in acc.items()}
    return UnitCosts(prefix=per["prefix"], block=per["block"], suffix=per["suffix"], num_blocks=n,
                     boundary_bytes=boundary, boundary_reshard_s=reshard)


def grad_placements(sh: tuple) -> tuple:
    """The placements of a value's gradient (ops.collectives' default): a shard's gradient is sharded alike, a
    replicated value's is replicated, and a partial sum's is replicated (every rank's part needs all of it)."""
    return tuple(Replicate() if isinstance(x, Partial) else x for x in sh)


def boundary_seconds(meta, src: tuple, send: tuple, mesh_shape: tuple[int, ...], links: tuple[LinkSpec, ...]) -> float:
    """Resharding a boundary value from its producer's placements ``src`` to the placements it is sent in, and
    back to ``src`` on the receiving stage (whose unit plan reads it as ``src``), forward and backward: the
    sub-mesh part of a stage boundary's price (the send itself is the pp link's)."""
    g_src, g_send = grad_placements(src), grad_placements(send)
    back = tuple(Replicate() if isinstance(x, Partial) else x for x in src)   # a partial sum arrives summed
    return (C.transition_time(meta, src, send, mesh_shape, links)
            + C.transition_time(meta, send, back, mesh_shape, links)
            + C.transition_time(meta, g_send, g_src, mesh_shape, links)
            + C.transition_time(meta, grad_placements(back), g_send, mesh_shape, links))


def send_placement(meta, src: tuple, mesh_shape: tuple[int, ...], links: tuple[LinkSpec, ...],
                   pp_link: LinkSpec | None) -> tuple:
    """The placements a stage sends a boundary value in, from the placements ``src`` its producer gives it on the
    sub-mesh (module docstring; the one rule the pricing here and the plan's ``send_placements`` follow): partial
    sums summed (``P -> R``), then, mesh dim by mesh dim, a dim on which the value is whole is cut along the
    largest tensor dim it splits evenly (not already split) when the smaller send saves more than gathering it
    back costs on the receiving side (Megatron-LM's scatter/gather)."""
    send = tuple(Replicate() if isinstance(x, Partial) else x for x in src)
    if pp_link is None or meta is None or not meta.shape:
        return send

    def price(sh):
        ab = pp_link.collectives["send_recv"]
        return 2 * ab.beta * C.local_bytes(meta, sh, mesh_shape) + boundary_seconds(meta, src, sh, mesh_shape, links)

    for d, n in enumerate(mesh_shape):
        if n <= 1 or not isinstance(send[d], Replicate):
            continue
        used = {x.dim for x in send if isinstance(x, Shard)}
        dims = [k for k in range(len(meta.shape)) if k not in used and meta.shape[k] % n == 0]
        if not dims:
            continue
        k = max(dims, key=lambda k: (meta.shape[k], k))
        cut = send[:d] + (Shard(k),) + send[d + 1:]
        if price(cut) < price(send):
            send = cut
    return send


def step_edge_seconds(gi, keys: dict, chosen: dict, mesh: MeshSpec, links: tuple[LinkSpec, ...]
                      ) -> tuple[dict[str, float], dict[str, float]]:
    """Per key charged (an edge's consumer; its producer for a graph output, as the ILP charges edges): (the
    gradient seconds of the edges the ILP prices as a bucketed data-parallel sum, the forward resharding
    seconds of every edge), each times the edge class's multiplicity (solver.runtime_model.price_plan's
    terms, split)."""
    sync: dict[str, float] = defaultdict(float)
    fwd: dict[str, float] = defaultdict(float)
    for charged, producer, src, dst, mult, c in priced_edges(gi, keys, chosen, tuple(mesh.shape), links):
        fwd[charged] += mult * c.fwd_s
        if grad_priced_bucketed(gi, producer, src, dst):
            sync[charged] += mult * c.bwd_s
    return sync, fwd


def accumulate_time(grad_bytes: float, profile: ClusterProfile) -> float:
    """Seconds to add one micro-batch's gradient of ``grad_bytes`` (per rank) into the accumulated one:
    ``grad += new`` reads two tensors and writes one, plus one op overhead (one add per parameter)."""
    if grad_bytes <= 0:
        return 0.0
    dev = profile.device
    return dev.op_overhead_s + 3.0 * grad_bytes / (dev.memory_bandwidth * dev.max_memory_efficiency)


def layer_of_gnode(gi, name: str, layer_list: str):
    g = gi.nodes.get(name)
    return g.layer if g is not None and g.layer is not None and g.layer[0] == layer_list else None


def _unit_of(node, gi, layer_list: str, order: dict[str, int], first_block: int) -> str:
    if node.layer is not None and node.layer[0] == layer_list:
        return "block"
    pos = order[node.name]
    if node.kind in ("param", "buffer", "input") and node.fx_node is not None and node.fx_node.users:
        users = [u for u in node.fx_node.users if u.name in order]
        if users:   # a parameter belongs where it is first used (an LM head's weight to the suffix)
            first = min(users, key=lambda u: order[u.name])
            g = gi.nodes[first.name]
            if g.layer is not None and g.layer[0] == layer_list:
                return "block"
            pos = order[first.name]
    return "prefix" if pos < first_block else "suffix"


# ---------------------------------------------------------------------------------------- the DP


def inflight(schedule: str, stage: int, p: int, m: int, v: int) -> float:
    """Micro-batches whose activations a stage holds at its peak (see the module docstring)."""
    if schedule == "gpipe":
        return m
    if schedule == "1f1b":
        return min(m, p - stage)
    r = stage % p
    return min(m * v, (v - 1) * p + 2 * (p - r - 1) + 1) / v


def _stage_costs(u: UnitCosts, j: int, i: int, link: LinkSpec | None, last: bool) -> tuple[float, float, float]:
    """(time, static bytes, activation bytes) of a stage holding blocks [j, i), keeping its activations."""
    k = i - j
    t = k * u.block.time_s
    w = k * u.block.static_bytes
    a = k * u.block.act_bytes
    if j == 0:
        t, w, a = t + u.prefix.time_s, w + u.prefix.static_bytes, a + u.prefix.act_bytes
    if i == u.num_blocks:
        t, w, a = t + u.suffix.time_s, w + u.suffix.static_bytes, a + u.suffix.act_bytes
    comm = 0.0
    if not last and link is not None:
        ab = link.collectives["send_recv"]
        comm = 2 * (ab.alpha + link.sync_s + ab.beta * u.boundary_bytes) + u.boundary_reshard_s
    return t + comm, w, a


def _recomputed(u: UnitCosts, j: int, i: int) -> tuple[float, float, float]:
    """A stage of blocks [j, i) recomputing them: (seconds added per micro-batch, activation bytes saved per
    micro-batch, bytes live once while one block is recomputed)."""
    k = i - j
    return k * u.block.recompute_s, k * max(0.0, u.block.act_bytes - u.block.kept_bytes), u.block.act_bytes


def _stage_accum(u: UnitCosts, j: int, i: int) -> float:
    """Gradient accumulation seconds per micro-batch of a stage holding blocks [j, i)."""
    return ((i - j) * u.block.accum_s + (u.prefix.accum_s if j == 0 else 0.0)
            + (u.suffix.accum_s if i == u.num_blocks else 0.0))


def _stage_sync(u: UnitCosts, j: int, i: int) -> float:
    """Data-parallel gradient sum seconds (once per step) of a stage holding blocks [j, i)."""
    return ((i - j) * u.block.sync_s + (u.prefix.sync_s if j == 0 else 0.0)
            + (u.suffix.sync_s if i == u.num_blocks else 0.0))


def step_time(stage_times: list[float], p: int, m: int, v: int, stage_accum: list[float] | None = None,
              stage_sync: list[float] | None = None) -> tuple[float, float, float, float]:
    """(step time, bubble, accumulation, gradient sync) of a pipeline with these stage times, per-micro-batch
    gradient accumulation times and once-per-step data-parallel gradient sums (stage s on rank s mod p); see
    the module docstring."""
    per_rank, acc_rank, sync_rank = [0.0] * p, [0.0] * p, [0.0] * p
    for s, t in enumerate(stage_times):
        per_rank[s % p] += t
        acc_rank[s % p] += stage_accum[s] if stage_accum else 0.0
        sync_rank[s % p] += stage_sync[s] if stage_sync else 0.0
    busy = [m * r + (m - 1) * g for r, g in zip(per_rank, acc_rank)]
    critical = max(range(p), key=lambda r: busy[r])
    bubble = (p - 1) * max(per_rank) / v
    sync = max(sync_rank)
    return busy[critical] + bubble + sync, bubble, (m - 1) * acc_rank[critical], sync


def partition(u: UnitCosts, *, p: int, v: int, m: int, schedule: str, budget: float | None,
              link: LinkSpec | None, recompute: str | None = None) -> Partition | None:
    """The fastest contiguous partition of the blocks into ``p * v`` stages that fits ``budget``
    (None: no partition fits). See the module docstring for the recurrence. ``recompute``: None decides per
    stage (recompute only where keeping the activations does not fit), ``"full"`` recomputes every stage,
    ``"none"`` never."""
    S, n = p * v, u.num_blocks
    if S > n:
        raise ConfigError(f"{S} pipeline stages ({p} ranks x {v} virtual) but the model has only {n} layers; "
                          f"use at most {n} stages")
    if recompute not in (None, "none", "full"):
        raise ConfigError(f"pipeline stages recompute fully or not at all: recompute={recompute!r} is not "
                          f"supported with pipeline stages; use 'full', 'none' or leave it to the planner (None)")
    cap = budget / v if budget is not None else math.inf

    def cost(j, i, s):
        """(time, memory, recomputes) of stage s over blocks [j, i): keeping its activations where that fits."""
        t, w, a = _stage_costs(u, j, i, link, s == S - 1)
        f = inflight(schedule, s, p, m, v)
        keep = (t, w + f * a, False)
        if recompute == "none" or (recompute is None and keep[1] <= cap) or u.block.recompute_s <= 0:
            return keep
        dt, saved, live = _recomputed(u, j, i)
        return t + dt, w + f * (a - saved) + live, True

    table = {(j, i, s): cost(j, i, s) for s in range(S) for j in range(n) for i in range(j + 1, n + 1)}
    candidates = sorted({t for (t, mem, _) in table.values() if mem <= cap})
    best: tuple[float, list[tuple[int, int]]] | None = None

    def total_of(bounds):
        times = [table[(j, i, s)][0] for s, (j, i) in enumerate(bounds)]
        return step_time(times, p, m, v, [_stage_accum(u, j, i) for j, i in bounds],
                         [_stage_sync(u, j, i) for j, i in bounds])

    for t_max in candidates:
        if best is not None and (m - 1) * t_max >= best[0]:
            break
        # F[k][i]: min sum of stage times of the first k stages covering blocks [0, i)
        F = [[math.inf] * (n + 1) for _ in range(S + 1)]
        arg = [[-1] * (n + 1) for _ in range(S + 1)]
        F[0][0] = 0.0
        for k in range(1, S + 1):
            for i in range(k, n - (S - k) + 1):
                for j in range(k - 1, i):
                    if F[k - 1][j] == math.inf:
                        continue
                    t, mem, _ = table[(j, i, k - 1)]
                    if t <= t_max and mem <= cap and F[k - 1][j] + t < F[k][i]:
                        F[k][i], arg[k][i] = F[k - 1][j] + t, j
        if F[S][n] == math.inf:
            continue
        bounds, i = [], n
        for k in range(S, 0, -1):
            j = arg[k][i]
            bounds.append((j, i))
            i = j
        bounds.reverse()
        total = total_of(bounds)[0]
        if best is None or total < best[0] - 1e-15:
            best = (total, bounds)
    if best is None:
        return None
    bounds = best[1]
    times = [table[(j, i, s)][0] for s, (j, i) in enumerate(bounds)]
    mems = [table[(j, i, s)][1] for s, (j, i) in enumerate(bounds)]
    rc = [table[(j, i, s)][2] for s, (j, i) in enumerate(bounds)]
    extra = [(inflight(schedule, s, p, m, v) - 1)
             * (_stage_costs(u, j, i, None, True)[2] - (_recomputed(u, j, i)[1] if rc[s] else 0.0))
             for s, (j, i) in enumerate(bounds)]
    total, bubble, accum, sync = total_of(bounds)
    # the breakdown follows the critical rank (the one the step time's busy term takes)
    busy, comm_rank, rc_rank = [0.0] * p, [0.0] * p, [0.0] * p
    for s, (j, i) in enumerate(bounds):
        busy[s % p] += m * times[s] + (m - 1) * _stage_accum(u, j, i)
        comm_rank[s % p] += _stage_costs(u, j, i, link, s == S - 1)[0] - _stage_costs(u, j, i, None, True)[0]
        rc_rank[s % p] += _recomputed(u, j, i)[0] if rc[s] else 0.0
    critical = max(range(p), key=lambda r: busy[r])
    return Partition(stages=tuple(tuple(range(j, i)) for j, i in bounds), schedule=schedule, microbatches=m,
                     virtual_stages=v, pp=p, stage_time_s=tuple(times), stage_memory_bytes=tuple(mems),
                     stage_extra_inflight_bytes=tuple(max(0.0, e) for e in extra),
                     step_time_s=total, bubble_s=bubble, comm_s=m * comm_rank[critical], accum_s=accum, sync_s=sync,
                     stage_recompute=tuple(rc), recompute_s=m * rc_rank[critical])


def microbatch_options(batch: int, dp: int, p: int, fixed: int | None) -> list[int]:
    """Micro-batch counts to try: divisors of the batch whose micro-batch still splits over ``dp``."""
    if fixed is not None:
        if batch % fixed:
            raise ConfigError(f"{fixed} micro-batches do not divide the batch of {batch}; choose a divisor of "
                              f"{batch} ({', '.join(str(d) for d in range(1, batch + 1) if batch % d == 0)})")
        if fixed < p:
            raise ConfigError(f"{fixed} micro-batches for {p} pipeline ranks: torch's schedules need at least one "
                              f"micro-batch per rank; use microbatches >= {p}")
        return [fixed]
    opts = [m for m in range(p, batch + 1) if batch % m == 0 and (batch // m) % dp == 0]
    if not opts:
        raise ConfigError(f"the batch of {batch} cannot be cut into at least {p} micro-batches (one per pipeline "
                          f"rank) that split over dp={dp}; use a larger batch")
    # more micro-batches shrink the bubble but add per-micro-batch costs (op overheads, p2p latency, gradient
    # accumulation): try up to 4 counts from the largest down, each at most half the one before
    chosen: list[int] = []
    for m in reversed(opts):
        if not chosen or 2 * m <= chosen[-1]:
            chosen.append(m)
    return sorted(chosen[:4])


TIGHTEN_STEPS = 5       # unit costs are re-solved under up to 5 tighter memory bounds when no stage fits
TIGHTEN_FACTOR = 0.75   # each bound is this fraction of the one before


def search(costs_for: Callable[[int, int], UnitCosts], *, batch: int, p: int, dp: int, config: PipelineOptions,
           budget: float | None, link: LinkSpec | None, recompute: str | None = None) -> Partition:
    """The fastest (schedule, micro-batches, virtual stages, partition, recompute per stage) that fits ``budget``
    (``recompute`` as for ``partition``).

    ``costs_for(m, k)`` gives the unit costs for ``m`` micro-batches with the intra-op ILP's memory bound
    scaled by ``TIGHTEN_FACTOR ** k`` (cached by the caller): when no partition fits with the fastest per-unit plans,
    the units are re-planned under more memory pressure (sharding more) before giving up."""
    ms = microbatch_options(batch, dp, p, config.microbatches)
    schedules = [config.schedule] if config.schedule else list(SCHEDULES)
    best: Partition | None = None
    tried = []
    for m in ms:
        for k in range(TIGHTEN_STEPS + 1 if budget is not None else 1):
            try:
                u = costs_for(m, k)
            except InfeasiblePlanError:
                break
            found = None
            for sched in schedules:
                v = config.virtual_stages or 2 if sched == "interleaved" else 1
                if sched == "interleaved" and config.schedule != "interleaved" and p * v > u.num_blocks:
                    continue
                if sched == "interleaved" and v < 2:
                    raise ConfigError("interleaved 1F1B needs virtual_stages >= 2")
                part = partition(u, p=p, v=v, m=m, schedule=sched, budget=budget, link=link, recompute=recompute)
                tried.append((sched, m, v, k, part is not None))
                if part is not None and (found is None or _better(part, found)):
                    found = part
            if found is not None:
                if best is None or _better(found, best):
                    best = found
                break
    if best is None:
        need = _min_stage_memory(costs_for(ms[-1], 0), p, recompute != "none")
        raise InfeasiblePlanError(
            f"no pipeline of {p} stages fits {budget:.4g} bytes per device (tried (schedule, micro-batches, virtual "
            f"stages, tightening, fits): {tried}); the smallest stage needs about {need:.4g} bytes with the "
            f"fastest intra-op plans: raise the memory budget, use more pp ranks or more tp/dp",
            min_feasible_bytes=int(need))
    return best


def _better(a: Partition, b: Partition) -> bool:
    """Faster wins; at the same time (GPipe and 1F1B) less memory per rank wins."""
    if not math.isclose(a.step_time_s, b.step_time_s, rel_tol=1e-9):
        return a.step_time_s < b.step_time_s
    return max(a.rank_memory_bytes) < max(b.rank_memory_bytes)


def _min_stage_memory(u: UnitCosts, p: int, recompute: bool = False) -> float:
    per_block = u.block.static_bytes + (min(u.block.act_bytes, u.block.kept_bytes) if recompute and
                                        u.block.recompute_s > 0 else u.block.act_bytes)
    n = u.num_blocks
    return (math.ceil(n / p) * per_block + max(u.prefix.static_bytes + u.prefix.act_bytes,
                                               u.suffix.static_bytes + u.suffix.act_bytes))
