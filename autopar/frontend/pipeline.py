"""Planning pipeline stages: inter-op DP over the repeated blocks + one intra-op ILP per stage.

``plan_pipeline`` (called by ``autopar.plan`` on a mesh with a dim named ``"pp"``): the blocks of the
model's repeated-layer list are partitioned by ``autopar.solver.pipeline`` from unit costs the intra-op
ILP gives on the non-pp sub-mesh (one folded solve per micro-batch size); the chosen partition is cut by
``codegen.split_stages`` and each stage gets its own intra-op plan on the sub-mesh. The result is one
``Plan`` whose ``pipeline`` field holds every stage and can be applied without solving
(``autopar.frontend.applying.apply_pipeline``; run by ``autopar.runtime.pipeline``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import torch
from torch import nn

from autopar.cluster.profile import ClusterProfile
from autopar.codegen.split_stages import split_stages
from autopar.core.capture import ExampleInputs, _foldable_lists, capture, normalize_inputs
from autopar.core.errors import ConfigError, MeshError, ShardingError
from autopar.core.graph import index_graph
from autopar.core.mesh import PP_DIM, MeshSpec
from autopar.core.options import PipelineOptions
from autopar.core.placement import Replicate, format_sharding, parse_sharding
from autopar.core.plan import ModelInfo, Plan, Predicted, SolverStats, check_precision
from autopar.runtime.pipeline import batch_size
from autopar.solver import plan_graph
from autopar.solver.pipeline import TIGHTEN_FACTOR, matching_patterns, search, send_placement, unit_costs

__all__ = ["choose_partition", "layer_list_of", "microbatch_inputs", "plan_pipeline", "split_mesh"]


def layer_list_of(model: nn.Module) -> str:
    """The ModuleList of identical blocks that pipelining cuts (the longest one)."""
    lists = _foldable_lists(model, 2)
    if not lists:
        raise ConfigError("pipelining cuts a ModuleList of identical blocks (e.g. model.blocks) but this model "
                          "has none; plan it without pipeline= or restructure its layers as an nn.ModuleList")
    return max(lists, key=lambda name: len(lists[name]))


def split_mesh(mesh: MeshSpec, profile: ClusterProfile, nodes: int | None):
    """(pp size, the non-pp sub-mesh or None, a profile whose links are the sub-mesh's, the pp link)."""
    if PP_DIM not in mesh.dim_names:
        raise MeshError(f"pipeline= needs a mesh dim named {PP_DIM!r} (e.g. mesh_dim_names=('pp', 'dp', 'tp')); "
                        f"this mesh has {mesh.dim_names}")
    k = mesh.dim_names.index(PP_DIM)
    links = profile.dim_links(mesh, nodes)
    p = mesh.shape[k]
    rest = [d for d in range(mesh.ndim) if d != k]
    if not rest:
        return p, None, None, links[k]
    sub = MeshSpec(shape=tuple(mesh.shape[d] for d in rest), dim_names=tuple(mesh.dim_names[d] for d in rest))
    sub_profile = dataclasses.replace(profile, mesh_shape=sub.shape, mesh_dim_links=tuple(links[d] for d in rest))
    return p, sub, sub_profile, links[k]


def sub_mesh_patterns(patterns: dict | None, mesh: MeshSpec, what: str) -> dict:
    """``fix`` / ``prefer`` placements given for the whole mesh -> the same for the non-pp sub-mesh each
    stage is planned on. The ``pp`` entry must be ``R``: a stage holds its tensors whole along ``pp``."""
    k = mesh.dim_names.index(PP_DIM)
    out = {}
    for pat, sh in (patterns or {}).items():
        if isinstance(sh, str) or not isinstance(sh, (list, tuple)):
            raise ConfigError(f"{what}[{pat!r}] must be a list of placements, one per mesh dim "
                              f"{list(mesh.dim_names)} (e.g. {['R'] * mesh.ndim}), got {sh!r}")
        parsed = parse_sharding(list(sh), field=f"{what}[{pat!r}]")
        if len(parsed) != mesh.ndim:
            raise ShardingError(f"{what}[{pat!r}]: {list(sh)} has {len(parsed)} placements for the mesh "
                                f"{list(mesh.dim_names)}; give one per mesh dim, 'R' for {PP_DIM!r}")
        if not isinstance(parsed[k], Replicate):
            raise ConfigError(f"{what}[{pat!r}] places the {PP_DIM!r} mesh dim as {sh[k]}: pipeline stages hold "
                              f"their tensors whole along {PP_DIM!r}; write 'R' there")
        out[pat] = [x for d, x in enumerate(sh) if d != k]
    return out


def microbatch_inputs(example_inputs: ExampleInputs, m: int) -> tuple[tuple, dict]:
    """The first of ``m`` micro-batches of the inputs (dim 0 split evenly)."""
    args, kwargs = normalize_inputs(example_inputs)
    b = batch_size(args, kwargs)
    if b % m:
        raise ConfigError(f"{m} micro-batches do not divide the batch of {b}; choose a divisor of {b}")
    cut = lambda t: t[: b // m] if isinstance(t, torch.Tensor) else t
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _as_inputs(args: tuple, kwargs: dict) -> ExampleInputs:
    if args and kwargs:
        raise ConfigError("give example inputs either positionally (a tuple) or by keyword (a dict), not both")
    return kwargs if kwargs else args


def choose_partition(model: nn.Module, example_inputs: ExampleInputs, mesh: MeshSpec, profile: ClusterProfile,
                     budget: float | None, pipeline, *, nodes: int | None = None, backend: str = "auto",
                     time_limit: float = 60.0, fold_layers: bool = True, fix: dict | None = None,
                     prefer: dict | None = None, precision: dict | None = None, recompute: str | None = None):
    """The inter-op decision alone: (Partition, layer list, UnitCosts per micro-batch count). ``fix`` /
    ``prefer`` are sub-mesh placements (``sub_mesh_patterns``); ``precision`` (plan.precision): the units are
    costed at the dtypes autocast gives their ops; ``recompute``: None (the partition decides per stage),
    ``"none"`` or ``"full"`` (every stage)."""
    cfg = PipelineOptions.parse(pipeline)
    p, sub, sub_profile, pp_link = split_mesh(mesh, profile, nodes)
    if recompute not in (None, "none", "full"):
        raise ConfigError(f"recompute={recompute!r} is not supported with pipeline stages (they recompute whole "
                          f"blocks or nothing); use 'full', 'none' or leave it to the planner")
    if sub is None:   # stage checkpointing is part of a stage's plan, which a pp-only mesh does not make
        if recompute == "full":
            raise ConfigError("recompute='full' in pipeline stages needs a mesh with a dim besides 'pp' (each "
                              "stage's plan checkpoints its blocks); add a dp or tp dim, even of size 1")
        recompute = "none"
    if p < 2:
        raise MeshError(f"the {PP_DIM!r} dim has size {p}; a pipeline needs at least 2 pp ranks")
    v = cfg.virtual_stages
    if cfg.stages is not None:
        if cfg.stages % p:
            raise MeshError(f"pipeline stages={cfg.stages} does not match the mesh's {PP_DIM!r} dim of size {p}: "
                            f"stages must be a multiple of {p} (stage s runs on pp rank s mod {p})")
        sv = cfg.stages // p
        if v is not None and v != sv:
            raise ConfigError(f"pipeline stages={cfg.stages} on {p} pp ranks means {sv} virtual stages per rank, "
                              f"not virtual_stages={v}")
        v = sv
        if v > 1 and cfg.schedule not in (None, "interleaved"):
            raise ConfigError(f"{cfg.stages} stages on {p} pp ranks need the interleaved schedule, "
                              f"not {cfg.schedule!r}")
        cfg = dataclasses.replace(cfg, schedule="interleaved" if v > 1 else cfg.schedule or None)
        if v == 1 and cfg.schedule is None:
            cfg = dataclasses.replace(cfg, schedule=None)
    cfg = dataclasses.replace(cfg, virtual_stages=v)
    layer_list = layer_list_of(model)
    n = len(model.get_submodule(layer_list))
    need = p * (v or 1)
    if need > n:
        raise ConfigError(f"{need} pipeline stages but the model has only {n} layers in {layer_list!r}; "
                          f"use at most {n} stages (a smaller {PP_DIM!r} dim)")
    args, kwargs = normalize_inputs(example_inputs)
    batch = batch_size(args, kwargs)
    cost_mesh = sub or MeshSpec(shape=(1,), dim_names=("dp",))
    # a pp-only mesh: the units are costed on one device (a measured profile's per-dim links do not apply)
    cost_profile = sub_profile or dataclasses.replace(profile, mesh_shape=None, mesh_dim_links=None)
    cost_links = cost_profile.dim_links(cost_mesh)
    dp = cost_mesh.shape[cost_mesh.dim_names.index("dp")] if "dp" in cost_mesh.dim_names else 1
    cache: dict[int, object] = {}

    caps: dict[int, object] = {}

    def costs_for(m: int, tighten: int):
        if (m, tighten) not in cache:
            if m not in caps:
                a, kw = microbatch_inputs(example_inputs, m)
                caps[m] = capture(model, _as_inputs(a, kw), fold_layers=fold_layers)
            # the whole model on one sub-mesh under p x the device budget (each of p stages gets one device's),
            # tightened when no stage fit with the looser bound
            bound = budget * p * TIGHTEN_FACTOR ** tighten if budget is not None else None
            cache[(m, tighten)] = unit_costs(caps[m], layer_list, cost_mesh, cost_profile, cost_links, budget=bound,
                                             backend=backend, time_limit=time_limit,
                                             fix=fix if sub is not None else None,
                                             prefer=prefer if sub is not None else None,
                                             compute_dtype=_compute_dtype(precision),
                                             pp_link=pp_link if sub is not None else None, microbatches=m)
        return cache[(m, tighten)]

    part = search(costs_for, batch=batch, p=p, dp=dp, config=cfg, budget=budget, link=pp_link, recompute=recompute)
    return part, layer_list, cache


def plan_pipeline(model: nn.Module, example_inputs: ExampleInputs, mesh: MeshSpec, profile: ClusterProfile,
                  budget: float | None, pipeline, *, nodes: int | None = None, backend: str = "auto",
                  time_limit: float = 60.0, fold_layers: bool = True, phase_times: dict | None = None,
                  fix: dict | None = None, prefer: dict | None = None, precision: dict | None = None,
                  recompute: str | None = None) -> Plan:
    """A Plan with stages: the partition, then each stage's intra-op plan on the sub-mesh.

    ``fix`` / ``prefer`` (placements for the whole mesh, ``R`` on ``pp``) apply to every stage and to the
    unit costs the partition is chosen from; keys are shared by identical stages (``blocks.*/...``), a
    stage's inputs are ``input:<name>`` with the names of ``pipeline.stages[i].inputs``. A pattern that
    matches nothing in any stage is an error. ``precision`` (plan.precision, bf16 only: the pipeline runtime has no
    loss scaling) is written into the plan, and the partition's unit costs follow it. ``recompute``: None (a stage
    recomputes its blocks where keeping their activations does not fit its device), ``"none"`` or ``"full"``; a
    recomputing stage's plan is solved with ``recompute="full"`` (its plan's ``checkpoint`` lists its blocks)."""
    split_mesh(mesh, profile, nodes)   # a mesh without a pp dim fails here, before the patterns are read
    fix, prefer = sub_mesh_patterns(fix, mesh, "fix"), sub_mesh_patterns(prefer, mesh, "prefer")
    t0 = time.perf_counter()
    part, layer_list, _ = choose_partition(model, example_inputs, mesh, profile, budget, pipeline, nodes=nodes,
                                           backend=backend, time_limit=time_limit, fold_layers=fold_layers,
                                           fix=fix, prefer=prefer, precision=precision, recompute=recompute)
    t1 = time.perf_counter()
    _, sub, sub_profile, pp_link = split_mesh(mesh, profile, nodes)
    a, k = microbatch_inputs(example_inputs, part.microbatches)
    cap = capture(model, _as_inputs(a, k), fold_layers=False)
    stages = split_stages(cap, layer_list, [list(s) for s in part.stages])
    # stage graphs: planned on the sub-mesh, and where fix= / prefer= are looked up (a pp-only mesh needs
    # them for that alone)
    scaps = [capture(st.module, stage_example_inputs(st)) if sub is not None or fix or prefer else None
             for st in stages]
    patterns = [matching_patterns(index_graph(c), fix, prefer) if c is not None else ({}, {}) for c in scaps]
    used = {pat for f, pr in patterns for pat in (*f, *pr)}
    unused = [pat for pat in (*fix, *prefer) if pat not in used]
    if unused:
        raise ConfigError(f"placement pattern(s) {unused} match no input, parameter or graph key of any pipeline "
                          f"stage (or an earlier pattern takes them); keys look like 'input:idx', "
                          f"'param:blocks.0.attn.qkv.weight', 'blocks.*/attn.qkv/linear#0' (see the stages' "
                          f"node_shardings; a later stage's inputs are named in pipeline.stages[i].inputs)")
    stage_plans: list[Plan | None] = []
    sends: list[list[list[str]] | None] = []
    for st, scap, (sfix, sprefer) in zip(stages, scaps, patterns):
        if sub is None:
            stage_plans.append(None)
            sends.append(None)
            continue
        if st.index > 0:   # a stage takes its inputs in the placements the previous stage sends them in
            sfix = {**sfix, **{f"input:{name}": sh for name, sh in zip(st.inputs, sends[-1]) if f"input:{name}"
                               not in sfix}}
        # the stage ILP sees one micro-batch's activations: leave room for the others in flight
        room = budget - part.stage_extra_inflight_bytes[st.index] if budget is not None else None
        # zero=0: pipeline stages step their parameters with a plain optimizer (no ZeRO shards at run time yet);
        # recompute as the partition priced it: every block of the stage; otherwise none where told, else the
        # stage ILP's own decision (it recomputes only under memory pressure the partition did not foresee)
        srecompute = "full" if part.stage_recompute[st.index] else "none" if recompute == "none" else None
        stage_plans.append(plan_graph(scap, sub, sub_profile, budget=room if room is None or room > 0 else budget,
                                      fix=sfix or None, prefer=sprefer or None, backend=backend,
                                      time_limit=time_limit, offload=False, zero=0, recompute=srecompute,
                                      precision=precision,   # priced at autocast's dtypes, its copies kept
                                      grad_sync_scale=1.0 / part.microbatches))   # summed once per step
        if stage_plans[-1].checkpoint:   # the solver counts a stage's blocks from 0: name the stage's own blocks
            stage_plans[-1] = dataclasses.replace(stage_plans[-1], checkpoint=tuple(
                _stage_block(entry, layer_list, st.layers) for entry in stage_plans[-1].checkpoint))
        last = st.index == len(stages) - 1
        sends.append(None if last else send_placements(scap, stage_plans[-1], sub, sub_profile, pp_link))
    t2 = time.perf_counter()
    phases = dict(phase_times or {})
    phases.update({"pipeline_partition": t1 - t0, "stage_plans": t2 - t1})
    out = _assemble(cap, mesh, profile, part, layer_list, stages, stage_plans, phases, example_inputs, sends)
    return out if precision is None else dataclasses.replace(out, precision=dict(precision))


def send_placements(scap, splan: Plan, sub: MeshSpec, sub_profile: ClusterProfile, pp_link) -> list[list[str]]:
    """Per output of a stage (in order), the sub-mesh placements each rank sends it in: the placements the stage's
    plan gives the value, as ``solver.pipeline.send_placement`` turns them (partial sums summed; maybe cut for
    scatter/gather) -- the rule the partition priced the boundary by."""
    gi = index_graph(scap)
    links = sub_profile.dim_links(sub)
    out = []
    for ref in gi.output_refs:
        g = gi.nodes[ref.src]
        src = parse_sharding(list(splan.node_shardings[g.key].outputs[ref.out]), field=f"{g.key} output")
        out.append(format_sharding(send_placement(g.outputs[ref.out], tuple(src), tuple(sub.shape), links, pp_link)))
    return out


def _stage_block(entry: str, layer_list: str, layers: tuple[int, ...]) -> str:
    """A stage plan's checkpoint entry ``"<list>.<i>:<mode>"`` (i-th block of the stage) -> the block's own FQN."""
    fqn, mode = entry.rsplit(":", 1)
    head, _, idx = fqn.rpartition(".")
    if head != layer_list or not idx.isdigit() or int(idx) >= len(layers):
        raise ConfigError(f"stage plan checkpoints {entry!r}, which is not one of its blocks of {layer_list!r}")
    return f"{layer_list}.{layers[int(idx)]}:{mode}"


def _compute_dtype(precision: dict | None) -> torch.dtype:
    if precision is None:
        return torch.float32
    p = check_precision(precision)
    if p["loss_scaling"] == "dynamic":
        raise ConfigError("precision with float16 compute needs dynamic loss scaling, which pipeline stages do not "
                          "apply yet; use precision='bf16' or pipeline=False")
    return getattr(torch, p["compute_dtype"])


def stage_example_inputs(st) -> tuple:
    """Tensors shaped like the values a stage receives, on the device of its parameters (meta stays meta)."""
    tensors = list(st.module.parameters()) + list(st.module.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    out = []
    for node in st.module.graph.nodes:
        if node.op == "placeholder":
            val = node.meta["val"]
            out.append(torch.zeros(val.shape, dtype=val.dtype, device=device))
    return tuple(out)


def _assemble(cap, mesh: MeshSpec, profile: ClusterProfile, part, layer_list: str, stages, stage_plans, phases,
              example_inputs, sends) -> Plan:
    k = mesh.dim_names.index(PP_DIM)
    full = {i.name: i for i in cap.user_inputs}
    inputs = tuple({"name": i.name, "shape": [part.microbatches * i.shape[0], *i.shape[1:]], "dtype": i.dtype,
                    "arg": i.arg} for i in full.values())
    params: dict[str, tuple[str, ...]] = {}
    rows = []
    for st, sp, send in zip(stages, stage_plans, sends):
        for fqn in st.param_fqns:
            sub = list(sp.param_placements[fqn]) if sp is not None else []
            params[fqn] = tuple(sub[:k] + ["R"] + sub[k:])
        rows.append({"index": st.index, "pp_rank": st.index % part.pp,
                     "layers": [f"{layer_list}.{i}" for i in st.layers], "params": list(st.param_fqns),
                     "inputs": list(st.inputs), "outputs": list(st.outputs),
                     "time_s": part.stage_time_s[st.index], "memory_bytes": int(part.stage_memory_bytes[st.index]),
                     "plan": json.loads(sp.to_json()) if sp is not None else None})   # plain JSON values
        if send is not None:   # the placements each rank sends its outputs in (the next stage takes them so)
            rows[-1]["send_placements"] = send
    field = {"pp_dim": PP_DIM, "layer_list": layer_list, "num_layers": sum(len(s.layers) for s in stages),
             "schedule": part.schedule, "microbatches": part.microbatches, "virtual_stages": part.virtual_stages,
             "predicted_bubble_fraction": part.bubble_fraction, "predicted_accum_s": part.accum_s, "stages": rows}
    comm = part.comm_s
    # grad_sync_s: the data-parallel gradient sums after the schedule, once per step (StepReducer)
    tb = {"compute_s": part.step_time_s - part.bubble_s - comm - part.sync_s - part.recompute_s, "comm_s": comm,
          "recompute_s": part.recompute_s, "offload_s": 0.0, "bubble_s": part.bubble_s, "grad_sync_s": part.sync_s}
    peak_rank = max(range(part.pp), key=lambda r: part.rank_memory_bytes[r])
    subs = [sp for sp in stage_plans if sp is not None]
    solver = SolverStats(backend=subs[0].solver.backend if subs else "none",
                         status="Optimal" if all(sp.solver.status == "Optimal" for sp in subs) else "Mixed",
                         optimal=all(sp.solver.optimal for sp in subs), objective=part.step_time_s,
                         num_variables=sum(sp.solver.num_variables for sp in subs),
                         num_constraints=sum(sp.solver.num_constraints for sp in subs), phase_times_s=phases)
    model = ModelInfo(fingerprint=cap.fingerprint(), inputs=inputs, folded_layers={},
                      num_parameters=_num_params(cap), param_shapes={fqn: tuple(s) for fqn, s in cap.model_params})
    return Plan(mesh=mesh, cluster=profile, model=model, param_placements=params, node_shardings={},
                predicted=Predicted(step_time_s=part.step_time_s, time_breakdown=tb,
                                    peak_memory_bytes=int(part.rank_memory_bytes[peak_rank]),
                                    memory_breakdown={f"pp_rank_{r}": int(b)
                                                      for r, b in enumerate(part.rank_memory_bytes)}),
                solver=solver, pipeline=field)


def _num_params(cap) -> int:
    seen, total = set(), 0
    for fqns in cap.param_fqns.values():
        shape = cap.param_shapes[fqns[0]]
        if fqns[0] not in seen:
            seen.add(fqns[0])
            total += math.prod(shape)
    return total
