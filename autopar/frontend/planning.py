"""``autopar.plan``: capture a model and solve its plan (no process group needed).

Wires capture -> solver (and codegen's fusion recognition, so the plan costs the kernels codegen will
substitute); a mesh with a ``pp`` dim goes to ``autopar.frontend.pipeline``. Options arrive as
``PlanOptions`` (``autopar.core.options``), validated there once.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.distributed.tensor import DTensor

from autopar.cluster.profile import ClusterProfile, load_cluster
from autopar.codegen.fuse_kernels import find_fusions
from autopar.core.capture import CapturedModel, ExampleInputs, capture
from autopar.core.errors import ConfigError, PlanMismatchError
from autopar.core.graph import folding_problem, index_graph
from autopar.core.mesh import PP_DIM, MeshSpec
from autopar.core.options import PlanOptions
from autopar.core.plan import Plan
from autopar.frontend.pipeline import plan_pipeline
from autopar.solver import plan_graph

log = logging.getLogger(__name__)

__all__ = ["capture_exact", "check_coverage", "default_fuse", "fusible_groups", "plan", "solve_captured"]


def plan(model: nn.Module, example_inputs: ExampleInputs, *, mesh_shape: tuple[int, ...] | list[int] | str,
         mesh_dim_names: tuple[str, ...] | list[str] | str | None = None,
         cluster: str | Path | ClusterProfile = "h100-sxm", options: PlanOptions | None = None,
         **kwargs) -> Plan:
    """Capture ``model`` on ``example_inputs`` and solve a sharding plan for a mesh of ``mesh_shape``.

    ``cluster``: a preset name (``h100-sxm``, ``h200-sxm``, ``a100-80g-sxm``, ``cpu-gloo``) or a profile
    JSON path. The options are :class:`autopar.PlanOptions`' fields, given as ``options=`` or as keywords
    (not both): ``memory_budget`` (bytes per device, int or ``"40GiB"``; default the device capacity),
    ``fix`` {key or FQN glob: placements} pins placements (e.g. ``{"input:*": ["S(0)", "R"]}``),
    ``prefer`` {key glob: placements} pins op outputs where the op has such a strategy (others stay free),
    ``backend`` ("auto" = HiGHS when installed, else CBC; "highs"; "cbc"), ``time_limit`` seconds,
    ``nodes`` (how many nodes the mesh spans), ``fold_layers`` (capture 2 of N identical blocks),
    ``precision`` ("bf16" / "fp16" / "fp32" or a dict of plan.precision: compute under autocast with
    fp32 master weights; fp16 adds dynamic loss scaling, see autopar.runtime.precision.grad_scaler),
    ``fuse`` (cost the ops codegen's fuse_kernels would replace by one runtime_kernels kernel as that
    kernel's traffic, and list them in ``plan.fusions``; default: on for a GPU cluster profile, where
    ``apply`` on a CUDA mesh substitutes the kernels, off for ``cpu-gloo`` or a CPU-measured profile),
    ``offload`` (default: the ILP may move activations and optimizer states to host memory where
    the host is not the device; False keeps everything on the device, e.g. when host memory is short).
    Memory decisions are the solver's unless told: ``recompute`` ("none" / "selective" / "full": every
    repeated block; "offload": every repeated block's saved activations to host memory, where the host is
    not the device), ``zero`` (0 none, 1 optimizer states sharded over each parameter's replicated mesh
    dims, 2 gradients too, wherever a tensor dim divides; ZeRO-3 is ``fix={"param:*": [...]}``).
    ``pipeline``: on a mesh with a dim named ``"pp"``, ``"auto"`` (the default there) partitions the
    layers into pipeline stages and picks schedule and micro-batches; a dict fixes some of ``stages``,
    ``schedule`` ("gpipe" | "1f1b" | "interleaved"), ``microbatches``, ``virtual_stages``; ``False``
    plans without stages (see autopar.frontend.pipeline). An option pipeline stages cannot honour
    (fuse, lower precision, recompute, zero, offload) is a ConfigError there.
    ``training=False`` plans inference, the forward alone (no gradients, optimizer states or memory
    decisions; ``kv_cache_bytes`` the KV cache the engine holds, charged by the attention's head split; see
    solver.forward_memory); the plan's ``mode`` is then ``"inference"``.
    """
    if options is not None and kwargs:
        raise ConfigError(f"give the plan options either as options=PlanOptions(...) or as keywords, not both "
                          f"(got options= and {sorted(kwargs)})")
    opts = options if options is not None else PlanOptions.from_kwargs(**kwargs)
    if not isinstance(opts, PlanOptions):
        raise ConfigError(f"options must be an autopar.PlanOptions, got {type(opts).__name__}")
    _check_dtypes(model, example_inputs)
    mesh = MeshSpec.make(mesh_shape, mesh_dim_names)
    profile = load_cluster(cluster)
    budget = opts.memory_budget if opts.memory_budget is not None else profile.device.memory_capacity
    pipeline = opts.pipeline
    if pipeline is None:
        pipeline = "auto" if PP_DIM in mesh.dim_names else False
    if pipeline is not False:
        opts.check_pipeline()
        return plan_pipeline(model, example_inputs, mesh, profile, budget, pipeline, nodes=opts.nodes,
                             backend=opts.backend, time_limit=opts.time_limit, fold_layers=opts.fold_layers,
                             fix=opts.fix_dict(), prefer=opts.prefer_dict(), precision=opts.precision,
                             recompute=opts.recompute)
    t0 = time.perf_counter()
    cap = capture_exact(model, example_inputs, fold_layers=opts.fold_layers)
    return solve_captured(cap, mesh, profile, opts, budget=budget, phase_times={"capture": time.perf_counter() - t0})


def capture_exact(model: nn.Module, example_inputs: ExampleInputs, *, fold_layers: bool = True) -> CapturedModel:
    """``capture``, with repeated blocks folded only where folding stands for the whole model; otherwise the
    model is captured again with every block. Folding must pass ``graph.folding_problem`` on the capture with
    two blocks (after a list's head, see ``graph``), and with three the graph outside the blocks and the lists'
    heads must be the same (a model whose code outside its layer list loops over the layers, e.g. building one
    mask per layer, fails this)."""
    cap = capture(model, example_inputs, fold_layers=fold_layers)
    if not cap.folded_layers:
        return cap
    gi = index_graph(cap)
    problem = folding_problem(cap, gi)
    if problem is None and min(cap.folded_layers.values()) > 3:
        three = index_graph(capture(model, example_inputs, fold_layers=True, fold_blocks=3))
        outside = lambda g: {n.key for n in g.nodes.values() if n.layer is None}   # noqa: E731
        if outside(three) != outside(gi):
            problem = "the graph outside the repeated blocks changes with the number of blocks"
        elif any(lst not in three.shared_lists or three.heads.get(lst) != gi.heads.get(lst) for lst in cap.folded_layers):
            problem = "a third captured block differs from the two before it"
    if problem is not None:
        log.info("planning every block (no folding): %s", problem)
        cap = capture(model, example_inputs, fold_layers=False)
    return cap


def check_coverage(plan: Plan, cap: CapturedModel) -> None:
    """A plan places every parameter of the model (under every FQN a tied parameter has), or planning fails
    here, naming what it misses, instead of at apply time (or not at all)."""
    missing = [fqn for fqn, _ in cap.model_params if fqn not in plan.param_placements]
    if missing:
        raise PlanMismatchError(f"the plan misses {len(missing)} of {len(cap.model_params)} parameters, e.g. "
                                f"{missing[:3]}: the captured graph does not stand for the whole model (folded "
                                f"blocks that differ?); plan with fold_layers=False, or report this model")


def solve_captured(cap: CapturedModel, mesh: MeshSpec, profile: ClusterProfile, opts: PlanOptions, *,
                   budget: float | None = None, phase_times: dict[str, float] | None = None) -> Plan:
    """The plan of an already captured model (no pipeline stages) under ``opts``; ``budget`` overrides
    ``opts.memory_budget`` (memory sweeps solve one capture at many budgets)."""
    if budget is None:
        budget = opts.memory_budget if opts.memory_budget is not None else profile.device.memory_capacity
    fusions = fusible_groups(cap) if (default_fuse(profile) if opts.fuse is None else opts.fuse) else None
    out = plan_graph(cap, mesh, profile, nodes=opts.nodes, budget=budget, fix=opts.fix_dict(),
                     prefer=opts.prefer_dict(), fusions=fusions, backend=opts.backend, time_limit=opts.time_limit,
                     phase_times=phase_times, offload=opts.offload is not False, recompute=opts.recompute,
                     zero=opts.zero, precision=opts.precision, training=opts.training,
                     kv_cache_bytes=opts.kv_cache_bytes)
    check_coverage(out, cap)
    return out if opts.precision is None else dataclasses.replace(out, precision=dict(opts.precision))


def default_fuse(profile: ClusterProfile) -> bool:
    """Plan with fused kernels by default on a GPU cluster: the presets for GPUs and profiles measured
    on CUDA (``apply`` fuses on a CUDA mesh); not on ``cpu-gloo`` or a CPU-measured profile."""
    return not profile.device.name.lower().startswith("cpu")


def fusible_groups(cap) -> list[dict]:
    """The captured graph's groups of ops that codegen's fuse_kernels would run as one kernel, as the
    planner takes them: ``[{"kind", "nodes": [fx node names, root last]}]`` (recognition only)."""
    return [{"kind": f.kind, "nodes": [n.name for n in f.members()]} for f in find_fusions(cap.program.graph_module)]


def _check_dtypes(model: nn.Module, example_inputs: ExampleInputs) -> None:
    """Parameters and floating inputs must be float64/32/16 or bfloat16 (complex and float8 are not planned)."""
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
