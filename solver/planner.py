"""From a captured graph to a Plan: collect strategies, solve the ILP, write the decisions down."""
from __future__ import annotations

import logging
import re
import time
from collections import defaultdict

from autopar.cluster.profile import ClusterProfile
from autopar.core.capture import CapturedModel
from autopar.core.graph import GraphIndex, index_graph
from autopar.core.mesh import MeshSpec
from autopar.core.placement import format_sharding
from autopar.core.plan import FusedKernel, LayerCost, ModelInfo, NodeSharding, Plan, Predicted, SolverStats
from autopar.solver import cost as C
from autopar.solver import fusion as F
from autopar.solver import ilp
from autopar.solver.saved import output_rebuild_bytes, saved_tensors
from autopar.solver.strategies import Strategy

log = logging.getLogger(__name__)


def _row_name(key: str) -> str:
    if key.startswith(("param:", "buffer:", "input:")):
        key = key.split(":", 1)[1]
    m = re.match(r"^(.+?\.\*)", key)
    if m:
        return m.group(1)
    head = key.split("/")[0].split(".")[0]
    return head or "root"


def plan_graph(cap: CapturedModel, mesh: MeshSpec, profile: ClusterProfile, *, nodes: int | None = None,
               budget: float | None = None, fix: dict[str, list[str]] | None = None,
               prefer: dict[str, list[str]] | None = None, backend: str = "auto",
               time_limit: float = 60.0, phase_times: dict[str, float] | None = None,
               force: dict[str, Strategy] | None = None, fusions: list[dict] | None = None,
               offload: bool = True, recompute: str | None = None, zero: int | None = None,
               precision: dict | None = None, training: bool = True, kv_cache_bytes: int | None = None,
               grad_sync_scale: float = 1.0) -> Plan:
    """Solve a plan for a captured model. ``force`` pins graph keys to one of their strategies (tests,
    tools); ``fix``/``prefer`` pin placements by glob, ``recompute`` / ``zero`` the memory decisions
    (see autopar.plan). ``fusions``: groups of captured nodes that will run as one fused kernel,
    ``[{"kind", "nodes": [fx node names, root last]}]`` (the front end finds them with codegen's
    find_fusions), costed as the fused kernels' traffic (solver.fusion) and listed in the plan; None or
    empty: every op is costed on its own. ``offload=False`` keeps activations and optimizer states on
    the device (pipeline stages). ``precision`` (plan.precision): the plan is costed at the dtypes autocast gives
    each op (solver.cost.precision_graph: compute at that dtype's peak, activations and their reshardings at
    their size) and the tensors kept for backward are traced under autocast (solver.saved: lower-precision
    copies of weights and activations the matmuls keep); parameters, gradients and AdamW states stay float32.
    ``grad_sync_scale``: see ilp.solve (a pipeline stage's plan at one of m micro-batches: 1/m)."""
    t0 = time.perf_counter()
    gi = C.precision_graph(index_graph(cap), precision, profile)
    links = profile.dim_links(mesh, nodes)
    t1 = time.perf_counter()
    try:
        saved = saved_tensors(cap.program.graph_module, set(cap.program.graph_signature.inputs_to_parameters),
                              autocast_dtype=C.compute_dtype(precision))
    except Exception as e:  # an op the meta device cannot run: fall back to "every op keeps its outputs"
        log.warning("could not trace the tensors kept for backward (%s: %s); assuming every op keeps its outputs",
                    type(e).__name__, e)
        saved = None
    keys = ilp.collect_keys(gi, mesh, profile, fix, prefer, saved=saved, training=training)
    shares = F.shares(gi, F.check_fusions(fusions or []))
    unfused = F.fuse_costs(gi, keys, shares, profile, mesh.shape)
    for key, strat in (force or {}).items():
        info = keys[key]
        j = info.strategies.index(strat)
        info.strategies, info.compute, info.memory = [strat], [info.compute[j]], [info.memory[j]]
        info.cast_bytes = info.cast_bytes[j:j + 1]
        if key in unfused:
            unfused[key] = [unfused[key][j]]
    t2 = time.perf_counter()
    mode = {"output_rebuild_bytes": output_rebuild_bytes(cap.program), "grad_sync_scale": grad_sync_scale} \
        if training else \
        {"training": False, "kv_cache_bytes": kv_cache_bytes}   # see ilp.solve
    sol = ilp.solve(gi, mesh, profile, links=links, budget=budget, fix=fix, backend=backend,
                    time_limit=time_limit, keys=keys, offload=offload, recompute=recompute, zero=zero, **mode)

    param_placements: dict[str, tuple[str, ...]] = {}
    members = gi.by_key()
    node_shardings: dict[str, NodeSharding] = {}
    for key, strat in sol.chosen.items():
        info = sol.keys[key]
        node_shardings[key] = NodeSharding(
            inputs=tuple(tuple(format_sharding(s)) for s in strat.inputs),
            outputs=tuple(tuple(format_sharding(s)) if s is not None else None for s in strat.outputs))
        if info.node.kind == "param":
            for member in members[key]:   # every captured block's parameter (identical blocks share a key)
                for fqn in member.fqns:
                    for full in _full_fqns(fqn, gi):
                        param_placements[full] = tuple(format_sharding(strat.outputs[0]))

    optimizer_sharding: dict[str, tuple[str, ...]] = {}
    gradient_sharding: dict[str, tuple[str, ...]] = {}
    for key, (stage, zs) in sol.zero.items():
        for member in members[key]:
            for fqn in member.fqns:
                for full in _full_fqns(fqn, gi):
                    optimizer_sharding[full] = tuple(format_sharding(zs))
                    if stage == 2:
                        gradient_sharding[full] = tuple(format_sharding(zs))

    # a group the chosen placements reshard inside is not fused by codegen: cost it unfused again
    shares, unfused, d_compute, d_recompute = F.unfuse_broken(gi, sol.keys, shares, unfused, sol.chosen, sol.remat,
                                                              profile, mesh.shape)
    if not training:   # the forward's compute alone
        d_compute = ilp.forward_only(sol)
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for key, strat in sol.chosen.items():
        info = sol.keys[key]
        j = info.strategies.index(strat)
        r = rows[_row_name(key)]
        r["time_s"] += info.mult * info.compute[j].total
        r["memory_bytes"] += info.mult * sum(info.memory[j].values())
        r["comm_s"] += sol.edge_time.get(key, 0.0)
    layers = []
    for name, r in rows.items():
        count = gi.layer_counts.get(name[:-2], 1) if name.endswith(".*") else 1
        layers.append(LayerCost(name=name, count=count, time_s=r["time_s"] + r["comm_s"], comm_s=r["comm_s"],
                                memory_bytes=int(r["memory_bytes"])))

    tb = dict(sol.time_breakdown)
    tb["compute_s"] += d_compute
    tb["recompute_s"] += d_recompute
    tb.setdefault("offload_s", 0.0)
    tb["bubble_s"] = 0.0
    mb = {k: int(v) for k, v in sol.memory_breakdown.items()}
    if sol.host_bytes:
        mb["host"] = int(sol.host_bytes)   # offloaded bytes in host memory (not part of the device peak)
    checkpoint, offload = [], []
    for lst, (full, selective) in sorted(sol.remat.items()):   # the first blocks are recomputed
        checkpoint += [f"{gi.block_name(lst, i)}:full" for i in range(full)]
        checkpoint += [f"{gi.block_name(lst, i)}:selective" for i in range(full, full + selective)]
        first = full + selective                                 # the next ones offload their activations
        offload += [gi.block_name(lst, i) for i in range(first, first + sol.offload.get(lst, 0))]
    fused = [FusedKernel(kind=r["kind"], root=r["root"], nodes=tuple(r["nodes"]), count=r["count"],
                         time_saved_s=r["time_saved_s"])
             for r in F.fusion_records(gi, sol.keys, shares, unfused, sol.chosen, profile, mesh.shape)]
    t3 = time.perf_counter()
    phases = dict(phase_times or {})
    phases.update({"index": t1 - t0, "strategies": t2 - t1, "build_ilp": sol.build_s, "solve": sol.solve_s,
                   "write_plan": t3 - t2 - sol.build_s - sol.solve_s})
    return Plan(
        mesh=mesh, cluster=profile,
        model=ModelInfo(fingerprint=cap.fingerprint(), inputs=tuple(
            {"name": i.name, "shape": list(i.shape), "dtype": i.dtype, "arg": i.arg} for i in cap.user_inputs),
            folded_layers=dict(cap.folded_layers), num_parameters=_num_params(cap, gi),
            param_shapes=_param_shapes(cap, gi)),
        param_placements=param_placements, node_shardings=node_shardings,
        predicted=Predicted(step_time_s=sum(v for k, v in tb.items()), time_breakdown=tb,
                            peak_memory_bytes=int(sol.peak_bytes), memory_breakdown=mb),
        solver=SolverStats(backend=sol.backend, status=sol.status, optimal=sol.optimal, objective=sol.objective,
                           num_variables=sol.num_variables, num_constraints=sol.num_constraints,
                           phase_times_s=phases),
        layers=tuple(sorted(layers, key=lambda r: -r.time_s)),
        checkpoint=tuple(checkpoint), offload=tuple(offload), optimizer_offload=sol.optimizer_offload,
        optimizer_sharding=optimizer_sharding, gradient_sharding=gradient_sharding, fusions=tuple(fused),
        nodes_fallback=tuple(k for k, i in sol.keys.items() if i.fallback),
        mode="training" if training else "inference")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _num_params(cap: CapturedModel, gi: GraphIndex) -> int:
    total = 0
    for fqn, shape in cap.param_shapes.items():
        lst = gi.shared_list_of(fqn)
        m = gi.layer_counts[lst] / gi.observed_counts[lst] if lst is not None else 1
        total += _numel(shape) * m
    return int(total)


def _param_shapes(cap: CapturedModel, gi: GraphIndex) -> dict[str, tuple[int, ...]]:
    """Every FQN of the full model (folded blocks expanded, tied names included) -> shape."""
    out = {}
    for name, fqns in cap.param_fqns.items():
        shape = cap.param_shapes[fqns[0]]
        for fqn in fqns:
            for full in _full_fqns(fqn, gi):
                out[full] = shape
    return out


def _full_fqns(fqn: str, gi: GraphIndex) -> list[str]:
    """A captured FQN -> the FQNs it stands for in the full model (every block of a shared list)."""
    return gi.full_fqns(fqn)
