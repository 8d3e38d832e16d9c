"""``autopar.apply`` and ``autopar.parallelize``: turn a plan into a module running on ``torch.distributed``.

``apply`` checks the plan against the model and mesh, runs codegen's passes on a fresh capture, shards the
parameters and wraps the graph in the runtime's ParallelModule (or builds this rank's pipeline stages).
``parallelize`` plans on rank 0 (``autopar.frontend.planning``), shares the plan as JSON and applies it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from autopar.cluster.profile import ClusterProfile
from autopar.codegen import build_parallel_graph
from autopar.codegen.emit import place_factories
from autopar.codegen.shard_params import check_param_placements, mesh_device, shard_parameters
from autopar.codegen.split_stages import split_stages
from autopar.core import errors
from autopar.core.capture import ExampleInputs, capture
from autopar.core.errors import AutoparError, ConfigError, MeshError, PlanMismatchError
from autopar.core.mesh import PP_DIM
from autopar.core.options import ApplyOptions, PlanOptions
from autopar.core.plan import Plan
from autopar.frontend.planning import plan as autopar_plan
from autopar.ops.parallel_ops import local_shape
from autopar.runtime.faults import check_same_plan
from autopar.runtime.module import ParallelModule
from autopar.runtime.pipeline import PipelineModule, stage_io

__all__ = ["apply", "apply_pipeline", "parallelize"]


def _example_inputs_for(model: nn.Module, plan: Plan) -> dict:
    """Tensors of the planned input shapes and dtypes (zeros), on the model's device."""
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    out = {}
    for spec in plan.model.inputs:
        dtype = getattr(torch, spec["dtype"])
        out[spec.get("arg") or spec["name"]] = torch.zeros(spec["shape"], dtype=dtype, device=device)
    return out


def apply(model: nn.Module, plan: Plan, mesh, *, input_mode: str = "global",
          defer_param_grads: bool = True, output_shardings: list[list[str]] | None = None) -> nn.Module:
    """Rewrite ``model`` for ``plan`` on ``mesh`` (a torch DeviceMesh); needs an initialized process group.

    Returns a ParallelModule with the original parameter FQNs, every parameter a DTensor with the
    plan's placements, and ``.plan``. The model's parameters are replaced in place (each rank keeps
    only its shards). A plan with pipeline stages gives an ``autopar.runtime.pipeline.PipelineModule`` (run it
    with ``autopar.forward_backward``). ``defer_param_grads=False`` reduces data-parallel gradients
    inside each backward instead of in overlapped buckets. An inference plan (``plan.mode == "inference"``,
    ``autopar.plan(training=False)``) gives a module for inference: its parameters do not require grad and no
    gradient is synchronized (no reducer, no hooks). ``output_shardings`` (per flattened output, placements on
    ``mesh``; used for pipeline stages, which return what they send on in its send placements): outputs are
    returned as local tensors under those placements instead of replicated.
    """
    ApplyOptions(input_mode=input_mode, defer_param_grads=defer_param_grads)   # validated before any work
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan must be an autopar.Plan (Plan.from_json(path) loads one), got {type(plan).__name__}")
    if not hasattr(mesh, "mesh_dim_names") or not hasattr(mesh, "get_group"):
        raise MeshError("mesh must be a torch DeviceMesh, e.g. init_device_mesh('cpu', (2, 2))")
    if tuple(mesh.shape) != tuple(plan.mesh.shape):
        raise MeshError(f"the plan is for mesh {tuple(plan.mesh.shape)} but the DeviceMesh is {tuple(mesh.shape)}; "
                        f"plan again for this mesh or build the mesh the plan expects")
    if dist.is_initialized() and mesh._get_root_mesh() is mesh:   # a sub-mesh (pipeline stage) is part of the world
        plan.mesh.check_world_size(dist.get_world_size())
        check_same_plan(plan, mesh_device(mesh))   # a collective: every rank must hold the same plan
    if plan.pipeline is not None:
        return apply_pipeline(model, plan, mesh)
    check_param_placements(model, plan)
    cap = capture(model, _example_inputs_for(model, plan), fold_layers=False)
    if cap.fingerprint() != plan.model.fingerprint:
        raise PlanMismatchError("this model (parameter names/shapes or input shapes) is not the one the plan was "
                                "made for; re-plan it with autopar.plan")
    # fused Triton kernels where the module runs on CUDA; the torch reference path elsewhere
    gm, ctx = build_parallel_graph(cap, plan, defer_param_grads=defer_param_grads and plan.training,
                                   fuse=mesh_device(mesh).type == "cuda", output_shardings=output_shardings)
    place_factories(gm, str(mesh_device(mesh)))  # a meta-captured graph creates its tensors on the mesh's device
    inputs = {i.name: ctx.output_sharding(i.name) for i in cap.user_inputs}
    buffers = {fqn: ctx.output_sharding(name) for name, fqn in (*cap.buffer_fqns.items(), *cap.constant_fqns.items())}
    shard_parameters(model, plan, mesh)
    if not plan.training:   # inference: no gradients, so no reducer and no publishing hooks (ParallelModule)
        model.requires_grad_(False)
    return ParallelModule(model, gm, cap, plan, mesh, inputs, buffers, input_mode=input_mode)


def parallelize(model: nn.Module, mesh, example_inputs: ExampleInputs, *, plan: Plan | None = None,
                cluster: str | Path | ClusterProfile | None = None, input_mode: str = "global",
                options: PlanOptions | None = None, **kwargs) -> nn.Module:
    """Plan (on rank 0, shared with every rank as JSON) and apply; with ``plan=`` only apply.

    ``cluster`` defaults to ``cpu-gloo`` on a CPU mesh and ``h100-sxm`` otherwise; ``options`` (or their
    keywords, e.g. ``memory_budget=``) as ``autopar.plan``. With ``plan=`` nothing is planned, so a
    cluster or a plan option alongside it is a ConfigError (re-plan instead, or drop them).
    """
    if plan is not None and (cluster is not None or options is not None or kwargs):
        given = (["cluster"] if cluster is not None else []) + (["options"] if options is not None else []) + \
            sorted(kwargs)
        raise ConfigError(f"parallelize(plan=...) applies that plan as it is; {given} would only matter when "
                          f"planning: drop them, or leave out plan= to plan with them")
    if options is None:
        options = PlanOptions.from_kwargs(**kwargs)   # bad options fail on every rank, before any collective
    elif kwargs:
        raise ConfigError(f"give the plan options either as options=PlanOptions(...) or as keywords, not both "
                          f"(got options= and {sorted(kwargs)})")
    if plan is None:
        if cluster is None:
            cluster = "cpu-gloo" if mesh.device_type == "cpu" else "h100-sxm"
        text = [None]
        failed: BaseException | None = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                p = autopar_plan(model, example_inputs, mesh_shape=tuple(mesh.shape),
                                 mesh_dim_names=mesh.mesh_dim_names, cluster=cluster, options=options)
                text = [p.to_json()]
            except Exception as e:     # every rank raises it, none waits in the broadcast for a plan
                failed = e
                text = [json.dumps({"planning_error": type(e).__name__, "message": str(e),
                                    "min_feasible_bytes": getattr(e, "min_feasible_bytes", None)})]
        if dist.is_initialized():
            dist.broadcast_object_list(text, src=0)
        if failed is not None:
            raise failed
        if text[0].startswith('{"planning_error"'):
            raise _planning_error(json.loads(text[0]))
        plan = Plan.from_json(text[0])
    return apply(model, plan, mesh, input_mode=input_mode)


def _planning_error(d: dict) -> AutoparError:
    """On ranks other than 0: the error planning raised on rank 0, as the same autopar error class."""
    cls = getattr(errors, d["planning_error"], None)
    msg = d["message"]
    if cls is errors.InfeasiblePlanError:
        return cls(msg, min_feasible_bytes=d.get("min_feasible_bytes"))
    if isinstance(cls, type) and issubclass(cls, AutoparError) and cls is not errors.RankFailureError:
        return cls(msg)
    return AutoparError(f"planning failed on rank 0 with {d['planning_error']}: {msg}")


def apply_pipeline(model: nn.Module, plan: Plan, mesh) -> PipelineModule:
    """Build this rank's stages of a pipelined plan on ``mesh`` (a DeviceMesh with a ``pp`` dim)."""
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
    received = {}
    for st, row in zip(stages, rows):
        if st.index % p != pp_rank:
            continue
        # boundaries sent per rank: each rank sends its piece in the placements the plan gives them
        # (send_placements) to its peer in the next stage, which takes it so; without them, whole (replicated)
        sends = row.get("send_placements") if row["plan"] is not None else None
        recv = rows[st.index - 1].get("send_placements") if st.index > 0 and row["plan"] is not None else None
        ins, outs = stage_io(st.module)
        if row["plan"] is not None:
            splan = Plan.from_dict(row["plan"])
            # the bucketed reducer's gradients: summed once per step after the schedule
            # (autopar.runtime.pipeline.StepReducer takes the reducer over), not in each micro-batch's backward
            mine[st.index] = apply(st.module, splan, submesh, input_mode="local" if recv is not None else "global",
                                   output_shardings=sends)
            if recv is not None:
                takes = [" ".join(splan.node_shardings[f"input:{name}"].outputs[0]) for name in st.inputs]
                received[st.index] = list(zip((" ".join(sh) for sh in recv), takes))
                ins = [(local_shape(shape, " ".join(sh), tuple(submesh.shape)), dt) for (shape, dt), sh in
                       zip(ins, recv)]
            if sends is not None:
                outs = [(local_shape(shape, " ".join(sh), tuple(submesh.shape)), dt) for (shape, dt), sh in
                        zip(outs, sends)]
        else:
            mine[st.index] = st.module
        io[st.index] = (ins, outs)
    holders: dict[str, set[int]] = {}
    for st in stages:
        for fqn in st.param_fqns:
            holders.setdefault(fqn, set()).add(st.index % p)
    tied = {fqn: sorted(r) for fqn, r in holders.items() if len(r) > 1}
    return PipelineModule(plan, mesh, submesh, mine, io, mesh.get_group(PP_DIM), tied, received)
