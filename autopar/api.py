"""The front end: ``autopar.plan`` (no process group needed) and ``autopar.parallelize`` / ``apply``.

Wires capture -> solver -> codegen; the only module besides the CLI that imports both floors.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from pathlib import Path

from torch import nn

from autopar.capture import ExampleInputs, capture
from autopar.errors import AutoparError, ConfigError
from autopar.mesh import MeshSpec
from autopar.plan import Plan
from autopar.profile import ClusterProfile, load_cluster

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
PLAN_OPTIONS = {"fix", "prefer", "backend", "time_limit", "nodes", "fold_layers", "precision", "fuse", "offload",
                "recompute", "zero"}
_PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float32": "float32",
               "bfloat16": "bfloat16", "float16": "float16"}


def parse_bytes(value: int | float | str | None) -> int | None:
    """``40GiB``, ``80GB``, ``1.5e9`` or an int -> bytes (None stays None); must be positive."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"memory budget {value!r} is not a size; write bytes (int) or e.g. '40GiB', '80GB'")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n > 0:
        raise ConfigError(f"memory budget must be positive, got {value!r}")
    return int(n)


def plan(model: nn.Module, example_inputs: ExampleInputs, *, mesh_shape: tuple[int, ...] | list[int] | str,
         mesh_dim_names: tuple[str, ...] | list[str] | str | None = None,
         cluster: str | Path | ClusterProfile = "h100-sxm", memory_budget: int | str | None = None,
         pipeline: str | bool | dict | None = None, **options) -> Plan:
    """Capture ``model`` on ``example_inputs`` and solve a sharding plan for a mesh of ``mesh_shape``.

    ``cluster``: a preset name (``h100-sxm``, ``h200-sxm``, ``a100-80g-sxm``, ``cpu-gloo``) or a profile
    JSON path. ``memory_budget``: bytes per device (int or ``"40GiB"``); default the device capacity.
    Options: ``fix`` {key or FQN glob: placements} pins placements (e.g. ``{"input:*": ["S(0)", "R"]}``),
    ``prefer`` {key glob: placements} pins op outputs where the op has such a strategy (others stay free),
    ``backend`` ("auto" = HiGHS when installed, else CBC; "highs"; "cbc"), ``time_limit`` seconds,
    ``nodes`` (how many nodes the mesh spans), ``fold_layers`` (capture 2 of N identical blocks),
    ``precision`` ("bf16" / "fp16" / "fp32" or a dict of plan.precision: compute under autocast with
    fp32 master weights; fp16 adds dynamic loss scaling, see autopar.precision.grad_scaler),
    ``fuse`` (cost the ops codegen's fuse_kernels would replace by one runtime_kernels kernel as that
    kernel's traffic, and list them in ``plan.fusions``; default: on for a GPU cluster profile, where
    ``apply`` on a CUDA mesh substitutes the kernels, off for ``cpu-gloo`` or a CPU-measured profile),
    ``offload`` (default True: the ILP may move activations and optimizer states to host memory where
    the host is not the device; False keeps everything on the device, e.g. when host memory is short).
    Memory decisions are the solver's unless told: ``recompute`` ("none" / "selective" / "full": every
    repeated block; "offload": every repeated block's saved activations to host memory, where the host is
    not the device), ``zero`` (0 none, 1 optimizer states sharded over each parameter's replicated mesh
    dims, 2 gradients too, wherever a tensor dim divides; ZeRO-3 is ``fix={"param:*": [...]}``).
    ``pipeline``: on a mesh with a dim named ``"pp"``, ``"auto"`` (the default there) partitions the
    layers into pipeline stages and picks schedule and micro-batches; a dict fixes some of ``stages``,
    ``schedule`` ("gpipe" | "1f1b" | "interleaved"), ``microbatches``, ``virtual_stages``; ``False``
    plans without stages (see autopar.pipeline).
    """
    unknown = set(options) - PLAN_OPTIONS
    if unknown:
        raise ConfigError(f"unknown plan option(s) {sorted(unknown)}; known: {sorted(PLAN_OPTIONS)}")
    _check_dtypes(model, example_inputs)
    mesh = MeshSpec.make(mesh_shape, mesh_dim_names)
    profile = load_cluster(cluster)
    budget = parse_bytes(memory_budget)
    if budget is None:
        budget = profile.device.memory_capacity
    if pipeline is None:
        pipeline = "auto" if "pp" in mesh.dim_names else False
    fuse = options.get("fuse")
    if fuse is not None and not isinstance(fuse, bool):
        raise ConfigError(f"fuse must be True, False or None (None: on for a GPU cluster), got {fuse!r}")
    if pipeline is not False:
        from autopar.pipeline import plan_pipeline
        if fuse:
            raise ConfigError("fuse=True is not supported with pipeline stages yet (stages are costed unfused); "
                              "drop it or pass pipeline=False")
        if options.get("precision") not in (None, "fp32", "float32"):
            raise ConfigError("precision= is not supported with pipeline stages yet (stages run in fp32); "
                              "drop it or pass pipeline=False")
        return plan_pipeline(model, example_inputs, mesh, profile, budget, pipeline, nodes=options.get("nodes"),
                             backend=options.get("backend", "auto"), time_limit=float(options.get("time_limit", 60.0)),
                             fold_layers=options.get("fold_layers", True), fix=options.get("fix"),
                             prefer=options.get("prefer"))
    precision = _precision(options.get("precision"))
    t0 = time.perf_counter()
    cap = capture(model, example_inputs, fold_layers=options.get("fold_layers", True))
    t1 = time.perf_counter()
    from autopar.solver import plan_graph
    fusions = fusible_groups(cap) if (default_fuse(profile) if fuse is None else fuse) else None
    out = plan_graph(cap, mesh, profile, nodes=options.get("nodes"), budget=budget, fix=options.get("fix"),
                     prefer=options.get("prefer"), fusions=fusions,
                     backend=options.get("backend", "auto"), time_limit=float(options.get("time_limit", 60.0)),
                     phase_times={"capture": t1 - t0}, offload=_offload_option(options.get("offload", True)),
                     recompute=options.get("recompute"), zero=options.get("zero"))
    return out if precision is None else dataclasses.replace(out, precision=precision)


def default_fuse(profile: ClusterProfile) -> bool:
    """Plan with fused kernels by default on a GPU cluster: the presets for GPUs and profiles measured
    on CUDA (``apply`` fuses on a CUDA mesh); not on ``cpu-gloo`` or a CPU-measured profile."""
    return not profile.device.name.lower().startswith("cpu")


def fusible_groups(cap) -> list[dict]:
    """The captured graph's groups of ops that codegen's fuse_kernels would run as one kernel, as the
    planner takes them: ``[{"kind", "nodes": [fx node names, root last]}]`` (recognition only)."""
    from autopar.codegen.fuse_kernels import find_fusions

    return [{"kind": f.kind, "nodes": [n.name for n in f.members()]} for f in find_fusions(cap.program.graph_module)]


def _offload_option(value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"offload must be True or False, got {value!r}")
    return value


def _precision(value) -> dict | None:
    """The ``precision`` option as plan.precision: "bf16" / "fp16" / "fp32" (or the torch dtype names),
    or a dict of plan.precision's fields. None: fp32."""
    from autopar.precision import check_precision

    if value is None:
        return None
    if isinstance(value, str):
        if value not in _PRECISIONS:
            raise ConfigError(f"precision={value!r} is not one of {sorted(_PRECISIONS)}")
        value = {"compute_dtype": _PRECISIONS[value]}
    if not isinstance(value, dict):
        raise ConfigError(f"precision must be a string like 'bf16' or a dict, got {type(value).__name__}")
    try:
        return check_precision(value)
    except AutoparError as e:
        raise ConfigError(f"precision option: {e}") from None


def _check_dtypes(model: nn.Module, example_inputs: ExampleInputs) -> None:
    """Parameters and floating inputs must be float64/32/16 or bfloat16 (complex and float8 are not planned)."""
    import torch
    import torch.utils._pytree as pytree
    from torch.distributed.tensor import DTensor

    ok = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    named = [(f"parameter {n!r}", p) for n, p in model.named_parameters()] if isinstance(model, nn.Module) else []
    named += [(f"input {i}", x) for i, x in enumerate(pytree.tree_leaves(example_inputs)) if isinstance(x, torch.Tensor)]
    for what, t in named:
        if isinstance(t, DTensor):
            raise ConfigError(f"{what} is already a DTensor: this model was parallelized before (autopar or "
                              f"torch.distributed.tensor); plan a fresh copy of the original model")
        if (t.is_complex() or t.is_floating_point()) and t.dtype not in ok:
            raise ConfigError(f"{what} has dtype {str(t.dtype).removeprefix('torch.')}, which autopar does not "
                              f"plan; use float32, bfloat16, float16 or float64 (complex and float8 are unsupported)")


def _example_inputs_for(model: nn.Module, plan: Plan) -> dict:
    """Tensors of the planned input shapes and dtypes (zeros), on the model's device."""
    import torch

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    out = {}
    for spec in plan.model.inputs:
        dtype = getattr(torch, spec["dtype"])
        out[spec.get("arg") or spec["name"]] = torch.zeros(spec["shape"], dtype=dtype, device=device)
    return out


def apply(model: nn.Module, plan: Plan, mesh, *, input_mode: str = "global",
          defer_param_grads: bool = True) -> nn.Module:
    """Rewrite ``model`` for ``plan`` on ``mesh`` (a torch DeviceMesh); needs an initialized process group.

    Returns a ParallelModule with the original parameter FQNs, every parameter a DTensor with the
    plan's placements, and ``.plan``. The model's parameters are replaced in place (each rank keeps
    only its shards). A plan with pipeline stages gives an ``autopar.pipeline.PipelineModule`` (run it
    with ``autopar.forward_backward``). ``defer_param_grads=False`` reduces data-parallel gradients
    inside each backward instead of in overlapped buckets (pipeline stages: several backwards per step).
    """
    import torch.distributed as dist

    from autopar.codegen import build_parallel_graph
    from autopar.codegen.emit import place_factories
    from autopar.codegen.shard_params import check_param_placements, mesh_device, shard_parameters
    from autopar.errors import MeshError, PlanMismatchError
    from autopar.faults import check_same_plan
    from autopar.runtime import ParallelModule

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
        from autopar.pipeline import apply_pipeline
        return apply_pipeline(model, plan, mesh)
    check_param_placements(model, plan)
    cap = capture(model, _example_inputs_for(model, plan), fold_layers=False)
    if cap.fingerprint() != plan.model.fingerprint:
        raise PlanMismatchError("this model (parameter names/shapes or input shapes) is not the one the plan was "
                                "made for; re-plan it with autopar.plan")
    # fused Triton kernels where the module runs on CUDA; the torch reference path elsewhere
    gm, ctx = build_parallel_graph(cap, plan, defer_param_grads=defer_param_grads,
                                   fuse=mesh_device(mesh).type == "cuda")
    place_factories(gm, str(mesh_device(mesh)))  # a meta-captured graph creates its tensors on the mesh's device
    inputs = {i.name: ctx.output_sharding(i.name) for i in cap.user_inputs}
    buffers = {fqn: ctx.output_sharding(name) for name, fqn in (*cap.buffer_fqns.items(), *cap.constant_fqns.items())}
    shard_parameters(model, plan, mesh)
    return ParallelModule(model, gm, cap, plan, mesh, inputs, buffers, input_mode=input_mode)


def parallelize(model: nn.Module, mesh, example_inputs: ExampleInputs, *, plan: Plan | None = None,
                cluster: str | Path | ClusterProfile | None = None, memory_budget: int | str | None = None,
                input_mode: str = "global", **options) -> nn.Module:
    """Plan (on rank 0, shared with every rank as JSON) and apply; with ``plan=`` only apply.

    ``cluster`` defaults to ``cpu-gloo`` on a CPU mesh and ``h100-sxm`` otherwise.
    """
    import torch.distributed as dist

    if plan is None:
        if cluster is None:
            cluster = "cpu-gloo" if mesh.device_type == "cpu" else "h100-sxm"
        text = [None]
        failed: BaseException | None = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                p = autopar_plan(model, example_inputs, mesh_shape=tuple(mesh.shape),
                                 mesh_dim_names=mesh.mesh_dim_names, cluster=cluster, memory_budget=memory_budget,
                                 **options)
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


autopar_plan = plan


def _planning_error(d: dict) -> AutoparError:
    """On ranks other than 0: the error planning raised on rank 0, as the same autopar error class."""
    from autopar import errors
    cls = getattr(errors, d["planning_error"], None)
    msg = d["message"]
    if cls is errors.InfeasiblePlanError:
        return cls(msg, min_feasible_bytes=d.get("min_feasible_bytes"))
    if isinstance(cls, type) and issubclass(cls, AutoparError) and cls is not errors.RankFailureError:
        return cls(msg)
    return AutoparError(f"planning failed on rank 0 with {d['planning_error']}: {msg}")
