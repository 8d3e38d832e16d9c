"""Pipeline parallelism: plan stages (inter-op DP + intra-op ILP per stage) and run them on
``torch.distributed.pipelining``.

Planning (``plan_pipeline``, called by ``autopar.plan(..., pipeline=...)`` on a mesh with a dim
named ``"pp"``): the blocks of the model's repeated-layer list are partitioned by
``autopar.solver.pipeline`` from unit costs the intra-op ILP gives on the non-pp sub-mesh (one
folded solve per micro-batch size); the chosen partition is cut by ``codegen.split_stages`` and
each stage gets its own intra-op plan on the sub-mesh. The result is one ``Plan`` whose
``pipeline`` field holds every stage (see ``pipeline_field``) and can be applied without solving.

Running (``apply_pipeline`` -> ``PipelineModule``): each rank builds only its stages (stage ``s``
on pp rank ``s mod p``), applies their plans with ``autopar.apply`` on the sub-mesh, wraps them
in ``PipelineStage`` and drives them with torch's ``ScheduleGPipe`` / ``Schedule1F1B`` /
``ScheduleInterleaved1F1B``; no schedule is written here. ``forward_backward`` runs one step for
any module autopar made. Like ``api.py`` this is front end: it wires capture, solver and codegen.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

import torch
import torch.distributed as dist
from torch import nn

from autopar.capture import ExampleInputs, _foldable_lists, capture, normalize_inputs
from autopar.errors import ConfigError, MeshError, PlanMismatchError, ShardingError
from autopar.mesh import MeshSpec
from autopar.plan import ModelInfo, Plan, Predicted, SolverStats
from autopar.profile import ClusterProfile

log = logging.getLogger(__name__)

PP_DIM = "pp"


# ------------------------------------------------------------------------------------------- planning


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
    from autopar.placement import Replicate, parse_sharding

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


def _batch_size(args: tuple, kwargs: dict) -> int:
    sizes = {t.shape[0] for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ConfigError(f"pipelining splits every input along dim 0 into micro-batches, but the inputs' first "
                          f"dims are {sorted(sizes)}; give inputs that share one batch dim")
    return sizes.pop()


def microbatch_inputs(example_inputs: ExampleInputs, m: int) -> tuple[tuple, dict]:
    """The first of ``m`` micro-batches of the inputs (dim 0 split evenly)."""
    args, kwargs = normalize_inputs(example_inputs)
    b = _batch_size(args, kwargs)
    if b % m:
        raise ConfigError(f"{m} micro-batches do not divide the batch of {b}; choose a divisor of {b}")
    cut = lambda t: t[: b // m] if isinstance(t, torch.Tensor) else t  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _as_inputs(args: tuple, kwargs: dict) -> ExampleInputs:
    if args and kwargs:
        raise ConfigError("give example inputs either positionally (a tuple) or by keyword (a dict), not both")
    return kwargs if kwargs else args


def choose_partition(model: nn.Module, example_inputs: ExampleInputs, mesh: MeshSpec, profile: ClusterProfile,
                     budget: float | None, pipeline, *, nodes: int | None = None, backend: str = "auto",
                     time_limit: float = 60.0, fold_layers: bool = True, fix: dict | None = None,
                     prefer: dict | None = None):
    """The inter-op decision alone: (Partition, layer list, UnitCosts per micro-batch count). ``fix`` /
    ``prefer`` are sub-mesh placements (``sub_mesh_patterns``)."""
    from autopar.solver.pipeline import PipelineConfig, search, unit_costs

    cfg = PipelineConfig.parse(pipeline)
    p, sub, sub_profile, pp_link = split_mesh(mesh, profile, nodes)
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
    batch = _batch_size(args, kwargs)
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
            from autopar.solver.pipeline import TIGHTEN_FACTOR
            bound = budget * p * TIGHTEN_FACTOR ** tighten if budget is not None else None
            cache[(m, tighten)] = unit_costs(caps[m], layer_list, cost_mesh, cost_profile, cost_links, budget=bound,
                                             backend=backend, time_limit=time_limit,
                                             fix=fix if sub is not None else None,
                                             prefer=prefer if sub is not None else None)
        return cache[(m, tighten)]

    part = search(costs_for, batch=batch, p=p, dp=dp, config=cfg, budget=budget, link=pp_link)
    return part, layer_list, cache


def plan_pipeline(model: nn.Module, example_inputs: ExampleInputs, mesh: MeshSpec, profile: ClusterProfile,
                  budget: float | None, pipeline, *, nodes: int | None = None, backend: str = "auto",
                  time_limit: float = 60.0, fold_layers: bool = True, phase_times: dict | None = None,
                  fix: dict | None = None, prefer: dict | None = None) -> Plan:
    """A Plan with stages: the partition, then each stage's intra-op plan on the sub-mesh.

    ``fix`` / ``prefer`` (placements for the whole mesh, ``R`` on ``pp``) apply to every stage and to the
    unit costs the partition is chosen from; keys are shared by identical stages (``blocks.*/...``), a
    stage's inputs are ``input:<name>`` with the names of ``pipeline.stages[i].inputs``. A pattern that
    matches nothing in any stage is an error."""
    from autopar.codegen.split_stages import split_stages
    from autopar.graph import index_graph
    from autopar.solver import plan_graph
    from autopar.solver.pipeline import matching_patterns

    split_mesh(mesh, profile, nodes)   # a mesh without a pp dim fails here, before the patterns are read
    fix, prefer = sub_mesh_patterns(fix, mesh, "fix"), sub_mesh_patterns(prefer, mesh, "prefer")
    t0 = time.perf_counter()
    part, layer_list, _ = choose_partition(model, example_inputs, mesh, profile, budget, pipeline, nodes=nodes,
                                           backend=backend, time_limit=time_limit, fold_layers=fold_layers,
                                           fix=fix, prefer=prefer)
    t1 = time.perf_counter()
    p, sub, sub_profile, _ = split_mesh(mesh, profile, nodes)
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
    for st, scap, (sfix, sprefer) in zip(stages, scaps, patterns):
        if sub is None:
            stage_plans.append(None)
            continue
        # the stage ILP sees one micro-batch's activations: leave room for the others in flight
        room = budget - part.stage_extra_inflight_bytes[st.index] if budget is not None else None
        # zero=0: pipeline stages step their parameters with a plain optimizer (no ZeRO shards at run time yet)
        stage_plans.append(plan_graph(scap, sub, sub_profile, budget=room if room is None or room > 0 else budget,
                                      fix=sfix or None, prefer=sprefer or None, backend=backend,
                                      time_limit=time_limit, offload=False, zero=0))
    t2 = time.perf_counter()
    phases = dict(phase_times or {})
    phases.update({"pipeline_partition": t1 - t0, "stage_plans": t2 - t1})
    return _assemble(cap, mesh, profile, part, layer_list, stages, stage_plans, phases, example_inputs)


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
              example_inputs) -> Plan:
    k = mesh.dim_names.index(PP_DIM)
    args, kwargs = normalize_inputs(example_inputs)
    full = {i.name: i for i in cap.user_inputs}
    inputs = tuple({"name": i.name, "shape": [part.microbatches * i.shape[0], *i.shape[1:]], "dtype": i.dtype,
                    "arg": i.arg} for i in full.values())
    params: dict[str, tuple[str, ...]] = {}
    rows = []
    for st, sp in zip(stages, stage_plans):
        for fqn in st.param_fqns:
            sub = list(sp.param_placements[fqn]) if sp is not None else []
            params[fqn] = tuple(sub[:k] + ["R"] + sub[k:])
        rows.append({"index": st.index, "pp_rank": st.index % part.pp,
                     "layers": [f"{layer_list}.{i}" for i in st.layers], "params": list(st.param_fqns),
                     "inputs": list(st.inputs), "outputs": list(st.outputs),
                     "time_s": part.stage_time_s[st.index], "memory_bytes": int(part.stage_memory_bytes[st.index]),
                     "plan": json.loads(sp.to_json()) if sp is not None else None})   # plain JSON values
    field = {"pp_dim": PP_DIM, "layer_list": layer_list, "num_layers": sum(len(s.layers) for s in stages),
             "schedule": part.schedule, "microbatches": part.microbatches, "virtual_stages": part.virtual_stages,
             "predicted_bubble_fraction": part.bubble_fraction, "predicted_accum_s": part.accum_s, "stages": rows}
    comm = part.comm_s
    tb = {"compute_s": part.step_time_s - part.bubble_s - comm, "comm_s": comm, "recompute_s": 0.0,
          "offload_s": 0.0, "bubble_s": part.bubble_s}
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


# -------------------------------------------------------------------------------------------- runtime


SCHEDULE_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}


class PipelineModule(nn.Module):
    """This rank's pipeline stages. ``named_parameters()`` are its stages' parameters under their
    original FQNs (DTensors on the sub-mesh when the stages are sharded). Run a step with
    ``autopar.forward_backward``; calling the module directly is not supported (a pipeline runs a
    whole batch through every rank at once)."""

    def __init__(self, plan: Plan, mesh, submesh, stage_modules: dict[int, nn.Module], stage_io: dict,
                 pp_group, tied: dict[str, list[int]]):
        super().__init__()
        self.__dict__["stage_io"] = stage_io
        self.__dict__["plan"] = plan
        self.__dict__["mesh"] = mesh
        self.__dict__["submesh"] = submesh
        self.__dict__["_schedules"] = {}
        self.__dict__["stage_modules"] = stage_modules
        self.__dict__["pp_group"] = pp_group
        self.__dict__["tied"] = tied
        pipe = plan.pipeline
        self.num_stages = len(pipe["stages"])
        self.pp = mesh.shape[mesh.mesh_dim_names.index(PP_DIM)] if mesh is not None else 1
        self.microbatches = pipe["microbatches"]
        self.schedule_name = pipe["schedule"]
        seen: dict[str, nn.Parameter] = {}
        for s in sorted(stage_modules):
            for fqn, prm in stage_modules[s].named_parameters(remove_duplicate=False):
                if fqn in seen and seen[fqn] is not prm:
                    raise PlanMismatchError(f"parameter {fqn!r} is used by two stages on one rank; pipelining "
                                            f"cannot keep two copies in step: plan with other stages")
                seen[fqn] = prm
        for fqn, prm in seen.items():   # a tree of plain modules: original FQNs, shared Parameter objects
            *path, leaf = fqn.split(".")
            mod = self
            for part in path:
                if part not in mod._modules:
                    mod.add_module(part, nn.Module())
                mod = mod._modules[part]
            mod.register_parameter(leaf, prm)

    def stage_param(self, fqn: str) -> nn.Parameter | None:
        """This rank's copy of a parameter (None when none of its stages uses it)."""
        try:
            return self.get_parameter(fqn)
        except AttributeError:
            return None

    def forward(self, *args, **kwargs):
        raise ConfigError("a pipelined module runs whole steps: call autopar.forward_backward(module, inputs)")

    def extra_repr(self) -> str:
        return (f"stages={sorted(self.stage_modules)} of {self.num_stages}, schedule={self.schedule_name!r}, "
                f"microbatches={self.microbatches}")


def apply_pipeline(model: nn.Module, plan: Plan, mesh) -> PipelineModule:
    """Build this rank's stages of a pipelined plan on ``mesh`` (a DeviceMesh with a ``pp`` dim)."""
    from autopar.api import apply
    from autopar.codegen.split_stages import split_stages

    pipe = plan.pipeline
    names = tuple(mesh.mesh_dim_names or ())
    if PP_DIM not in names:
        raise MeshError(f"the plan pipelines over a {PP_DIM!r} dim but the DeviceMesh's dims are {names}; "
                        f"build it with mesh_dim_names={plan.mesh.dim_names}")
    if names != tuple(plan.mesh.dim_names):
        raise MeshError(f"the plan is for mesh dims {plan.mesh.dim_names} but the DeviceMesh has {names}")
    p = mesh.shape[names.index(PP_DIM)]
    pp_rank = mesh.get_local_rank(PP_DIM)
    rest = tuple(n for n in names if n != PP_DIM)
    submesh = mesh[rest] if rest else None
    specs = {i["arg"] or i["name"]: i for i in plan.model.inputs}
    m = pipe["microbatches"]
    mb = {k: torch.zeros([s["shape"][0] // m, *s["shape"][1:]], dtype=getattr(torch, s["dtype"]))
          for k, s in specs.items()}
    cap = capture(model, mb, fold_layers=False)
    if cap.fingerprint() != plan.model.fingerprint:
        raise PlanMismatchError("this model (parameter names/shapes or input shapes) is not the one the plan was "
                                "made for; re-plan it with autopar.plan")
    rows = pipe["stages"]
    stages = split_stages(cap, pipe["layer_list"], [[int(x.rsplit(".", 1)[1]) for x in r["layers"]] for r in rows])
    mine: dict[int, nn.Module] = {}
    io = {}
    for st, row in zip(stages, rows):
        if st.index % p != pp_rank:
            continue
        io[st.index] = stage_io(st.module)
        if row["plan"] is not None:
            # several backwards per step (one per micro-batch): reduce DP gradients inside each one
            mine[st.index] = apply(st.module, Plan.from_dict(row["plan"]), submesh, defer_param_grads=False)
        else:
            mine[st.index] = st.module
    holders: dict[str, set[int]] = {}
    for st in stages:
        for fqn in st.param_fqns:
            holders.setdefault(fqn, set()).add(st.index % p)
    tied = {fqn: sorted(r) for fqn, r in holders.items() if len(r) > 1}
    return PipelineModule(plan, mesh, submesh, mine, io, mesh.get_group(PP_DIM), tied)


def _output_is_loss(output, target):
    """The model computed its loss itself (labels among the inputs): the last stage's output is it."""
    if not isinstance(output, torch.Tensor) or output.numel() != 1:
        raise ConfigError("the model's output is not a scalar loss; pass loss_fn= and target= to "
                          "autopar.forward_backward")
    return output.reshape(())


def forward_backward(module: nn.Module, inputs: ExampleInputs, target: torch.Tensor | None = None,
                     loss_fn=None) -> torch.Tensor:
    """One forward and backward over ``inputs`` (a dict of keyword or a tuple of positional inputs).

    The loss is the module's output (a model that computes its loss from labels among the inputs) or
    ``loss_fn(output, target)``. Gradients are left in the parameters' ``.grad`` (accumulated, as
    with ``loss.backward()``); the loss is returned (detached) on every rank. On a pipelined module the
    step runs the plan's schedule over its micro-batches (mean of the micro-batch losses, gradients
    of that mean); otherwise plain autograd.
    """
    if (target is None) != (loss_fn is None):
        raise ConfigError("give target= and loss_fn= together (or neither, when the model returns its loss)")
    args, kwargs = normalize_inputs(inputs)
    if not isinstance(module, PipelineModule):
        out = module(*args, **kwargs)
        loss = loss_fn(out, target) if loss_fn is not None else _output_is_loss(out, None)
        loss.backward()
        return loss.detach()
    return _pipeline_step(module, args, kwargs, target, loss_fn)


def _pipeline_step(pm: PipelineModule, args: tuple, kwargs: dict, target, loss_fn) -> torch.Tensor:
    import torch.distributed.pipelining as pipelining

    batch = _batch_size(args, kwargs)
    planned = pm.plan.model.inputs[0]["shape"][0]
    if batch != planned:
        raise PlanMismatchError(f"the batch has {batch} samples but the pipeline was planned for {planned} "
                                f"({pm.microbatches} micro-batches); re-plan for this batch")
    # The first stage takes every input positionally, in the captured order.
    order = [i["arg"] or i["name"] for i in pm.plan.model.inputs]
    if kwargs:
        missing = [n for n in order if n not in kwargs]
        if missing:
            raise PlanMismatchError(f"input {missing[0]!r} was planned but not given")
        args = tuple(kwargs[n] for n in order)
    fn = loss_fn if loss_fn is not None else _output_is_loss
    if target is None:   # the schedules hand every loss_fn call a target: give one that splits like the batch
        target = torch.zeros(batch, 0)
    sched = pm._schedules.get(fn)
    if sched is None:    # stages and schedule are built once per loss function and reused every step
        device = torch.device("cpu") if pm.mesh.device_type == "cpu" else \
            torch.device("cuda", torch.cuda.current_device())
        # static metadata: the shapes are the plan's (inferring them would run stages on uninitialized data)
        stages = [pipelining.PipelineStage(mod, s, pm.num_stages, device, group=pm.pp_group,
                                           input_args=_examples(pm.stage_io[s][0], device, s > 0),
                                           output_args=_examples(pm.stage_io[s][1], device, True))
                  for s, mod in sorted(pm.stage_modules.items())]
        cls = getattr(pipelining, SCHEDULE_CLASSES[pm.schedule_name])
        sched = cls(stages if pm.schedule_name == "interleaved" else stages[0], n_microbatches=pm.microbatches,
                    loss_fn=fn)
        pm._schedules[fn] = sched
    holds_last = (pm.num_stages - 1) in pm.stage_modules
    losses: list[torch.Tensor] = []
    is_first = 0 in pm.stage_modules
    base = _tied_grads(pm)
    sched.step(*(args if is_first else ()), target=target if holds_last else None, losses=losses,
               return_outputs=False)
    _sync_tied_grads(pm, base)
    loss = (torch.stack([x.detach().reshape(()) for x in losses]).mean() if holds_last
            else torch.zeros((), dtype=torch.float32))
    last_rank = (pm.num_stages - 1) % pm.pp
    dist.broadcast(loss, group=pm.pp_group, group_src=last_rank)
    return loss


def _examples(metas: list[tuple[list[int], torch.dtype]], device, grad: bool) -> tuple[torch.Tensor, ...]:
    """Example tensors for a stage's static metadata; floating ones carry gradients between stages."""
    return tuple(torch.zeros(shape, dtype=dtype, device=device).requires_grad_(grad and dtype.is_floating_point)
                 for shape, dtype in metas)


def stage_io(gm) -> tuple[list, list]:
    """(shape, dtype) of a stage graph's inputs and outputs, from the captured metadata."""
    ins = [(list(n.meta["val"].shape), n.meta["val"].dtype) for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outs = [(list(o.meta["val"].shape), o.meta["val"].dtype) for o in (out if isinstance(out, (tuple, list)) else (out,))]
    return ins, outs


def _full_grad(pm: PipelineModule, fqn: str) -> torch.Tensor | None:
    prm = pm.stage_param(fqn)
    if prm is None or prm.grad is None:
        return None
    g = prm.grad
    return (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()


def _tied_grads(pm: PipelineModule) -> dict[str, torch.Tensor | None]:
    """The gradients tied weights hold before a step (accumulation: only this step's part is summed)."""
    return {fqn: _full_grad(pm, fqn) for fqn in sorted(pm.tied)}


def _sync_tied_grads(pm: PipelineModule, base: dict[str, torch.Tensor | None]) -> None:
    """A weight used by stages on several pp ranks (tied embedding and LM head) gets one gradient per
    rank: sum this step's parts over the pp group so every copy takes the same step."""
    from autopar.parallel_ops import local_chunk

    for fqn in sorted(pm.tied):
        prm = pm.stage_param(fqn)
        full = _full_grad(pm, fqn)
        before = base.get(fqn)
        delta = torch.zeros(pm.plan.model.param_shapes[fqn]) if full is None else \
            full - before if before is not None else full
        delta = delta.contiguous()
        dist.all_reduce(delta, group=pm.pp_group)
        if prm is None:
            continue
        total = delta + before if before is not None else delta
        g = prm.grad
        if g is None:
            continue
        if hasattr(g, "_local_tensor"):
            # this stage's own placements: the stages holding a tied weight may place it differently
            g._local_tensor.copy_(local_chunk(total, tuple(g.placements), pm.submesh))
        else:
            g.copy_(total)


# ---------------------------------------------------------------------------------------- mesh layout


def plan_layouts(model: nn.Module, example_inputs: ExampleInputs, layouts: list[tuple[tuple[int, ...], tuple[str, ...]]],
                 *, cluster="h100-sxm", memory_budget=None, nodes: int | None = None, pipeline="auto",
                 backend: str = "auto", time_limit: float = 60.0) -> list[tuple[MeshSpec, float | None, str]]:
    """Compare mesh layouts of the same devices: each (shape, dim names) is planned (with pipeline stages
    when it has a ``pp`` dim, ``pipeline`` as in autopar.plan) and ranked by predicted step time.

    Returns ``(mesh, predicted step time or None, note)`` fastest first; a layout that does not fit the
    memory budget (or whose ILP found no plan within ``time_limit``) gets None and the reason; the note of
    a layout without a pipeline says whether its
    ILP was solved to proven optimality (else its time is an upper bound on that layout's best plan).
    Only the inter-op decision is made for pipelined layouts (no per-stage plans): enough to choose,
    e.g., whether the pipeline, DP or TP crosses the nodes.
    """
    from autopar.api import parse_bytes, plan as plan_fn
    from autopar.errors import InfeasiblePlanError
    from autopar.profile import load_cluster

    profile = load_cluster(cluster)
    budget = parse_bytes(memory_budget)
    if budget is None:
        budget = profile.device.memory_capacity
    out = []
    for shape, names in layouts:
        mesh = MeshSpec.make(shape, names)
        try:
            if PP_DIM in names:
                part, _, _ = choose_partition(model, example_inputs, mesh, profile, budget, pipeline, nodes=nodes,
                                              backend=backend, time_limit=time_limit)
                out.append((mesh, part.step_time_s, f"{part.schedule}, {part.microbatches} micro-batches, "
                                                     f"bubble {part.bubble_fraction:.1%}"))
            else:
                p = plan_fn(model, example_inputs, mesh_shape=shape, mesh_dim_names=names, cluster=profile,
                            memory_budget=budget, nodes=nodes, backend=backend, time_limit=time_limit,
                            pipeline=False)
                proven = "optimal" if p.solver.optimal else "not proven optimal (time limit): an upper bound"
                out.append((mesh, p.predicted.step_time_s, f"no pipeline, {proven}"))
        except InfeasiblePlanError as e:
            out.append((mesh, None, str(e).split(";")[0]))
        except ShardingError as e:     # not solved in time: unknown, not infeasible
            out.append((mesh, None, str(e)))
    return sorted(out, key=lambda r: (r[1] is None, r[1] or 0.0))
