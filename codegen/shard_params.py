"""Shard parameters: every parameter becomes a DTensor on the mesh with the plan's placements.

From a full model each rank keeps only its block (a copy; the full tensor can be freed). From a
meta model each rank allocates only its block and the module's own initialization fills it
(``reset_parameters`` of every submodule, children first), never the full tensor. Tied
parameters stay tied (one DTensor under every FQN). Module-level (not a graph pass): it runs on
the module that owns the parameters.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from autopar.core.errors import PlanMismatchError, ShardingError
from autopar.core.placement import Shard
from autopar.core.plan import Plan
from autopar.ops.parallel_ops import local_chunk, local_shape, placements

log = logging.getLogger(__name__)


def mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def _owner(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    mod, _, name = fqn.rpartition(".")
    return (model.get_submodule(mod) if mod else model), name


def check_param_placements(model: nn.Module, plan: Plan) -> None:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    missing = [n for n in names if n not in plan.param_placements]
    extra = [n for n in plan.param_placements if n not in set(names)]
    if missing or extra:
        what = f"parameter {missing[0]!r} is not in the plan" if missing else \
            f"the plan places parameter {extra[0]!r}, which this model does not have"
        raise PlanMismatchError(f"plan made for another model: {what}; re-plan this model")
    shapes = plan.model.param_shapes
    for n, p in model.named_parameters(remove_duplicate=False):
        if shapes and n in shapes and list(p.shape) != list(shapes[n]):
            raise PlanMismatchError(f"parameter {n!r} has shape {list(p.shape)} but the plan was made for "
                                    f"{list(shapes[n])}; re-plan this model")
        sh = placements(" ".join(plan.param_placements[n]))
        for d, pl in enumerate(sh):
            if isinstance(pl, Shard):
                k = 1
                for d2, pl2 in enumerate(sh):
                    if pl2 == pl:
                        k *= plan.mesh.shape[d2]
                if pl.dim >= p.dim() or p.shape[pl.dim] % k:
                    raise ShardingError(f"parameter {n!r} of shape {list(p.shape)} cannot be split {pl} over "
                                        f"{k} ranks evenly; re-plan (the planner only chooses even splits)")


def shard_parameters(model: nn.Module, plan: Plan, mesh: DeviceMesh) -> None:
    """Requires: the model's FQNs and shapes match the plan. Ensures: every parameter is an
    nn.Parameter holding a DTensor on ``mesh`` with the plan's placements; buffers are materialized."""
    check_param_placements(model, plan)
    device = mesh_device(mesh)
    groups: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(fqn)
        params[id(p)] = p
    on_meta = any(p.is_meta for p in params.values())
    for pid, fqns in groups.items():
        p = params[pid]
        text = " ".join(plan.param_placements[fqns[0]])
        sh = placements(text)
        if p.is_meta:
            local = torch.empty(local_shape(tuple(p.shape), sh, tuple(mesh.shape)), dtype=p.dtype, device=device)
        else:
            local = local_chunk(p.detach(), sh, mesh).to(device).clone()
        dt = DTensor.from_local(local, mesh, sh, run_check=False, shape=p.shape, stride=_contiguous_stride(p.shape))
        new = nn.Parameter(dt, requires_grad=p.requires_grad)
        for fqn in fqns:
            owner, name = _owner(model, fqn)
            setattr(owner, name, new)
    for mod in model.modules():
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.is_meta or b.device != device:
                persistent = name not in mod._non_persistent_buffers_set
                new_b = torch.empty_like(b, device=device) if b.is_meta else b.to(device)
                mod.register_buffer(name, new_b, persistent=persistent)
    if on_meta:
        _initialize(model, mesh)


def _initialize(model: nn.Module, mesh: DeviceMesh) -> None:
    """Run the module's own initialization on the sharded parameters, children before parents.

    Each rank draws from its own stream (seeded from rank 0's torch seed and the rank's mesh
    coordinate), so different blocks of a sharded parameter are independent draws; then every
    replicated mesh dim broadcasts from its coordinate 0, so replicas are identical. Values follow the
    module's init distributions but differ from a single-device init with the same seed (DTensor's
    offset-based RNG, which reproduces it, exists only for CUDA-like devices).
    """

    seed = torch.tensor([torch.initial_seed() % (2**62)], dtype=torch.int64, device=mesh_device(mesh))
    if dist.is_initialized():
        dist.broadcast(seed, src=0)
    coord = mesh.get_coordinate() or [0] * mesh.ndim
    rank_index = 0
    for c, n in zip(coord, mesh.shape):
        rank_index = rank_index * n + c
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(seed.item()) + 1 + rank_index)
        for mod in reversed(list(model.modules())):
            fn = getattr(mod, "reset_parameters", None)
            if callable(fn):
                fn()
        seen = set()
        for p in model.parameters():
            if id(p) in seen or not isinstance(p.data, DTensor):
                continue
            seen.add(id(p))
            for d, pl in enumerate(p.placements):
                if not isinstance(pl, Shard) and mesh.size(d) > 1:
                    dist.broadcast(p.data._local_tensor, group=mesh.get_group(d), group_src=0)


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))
