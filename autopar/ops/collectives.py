"""Autograd-aware collectives that change a local tensor's placements on a device mesh.

The parallel module computes on LOCAL tensors (plain ``torch.Tensor`` shards). Between ops,
:func:`redistribute` turns the local tensor of a tensor placed ``src`` on the mesh into its
local tensor under ``dst``. It runs exactly the steps of
:func:`autopar.core.placement.redistribute_steps` (same order, same kinds), which the planner's
cost model charges, one step per mesh dim ``d`` of size ``n`` at this rank's coordinate ``r``:

=================  =====================================================================
``all_gather``     S(i) -> R: concatenate the ``n`` equal chunks along dim ``i`` in rank order
``all_reduce``     P -> R: sum over the mesh dim (``P(avg)``: sum, then divide by ``n``)
``reduce_scatter`` P -> S(i): sum, keep chunk ``r`` along ``i`` (``P(avg)``: then divide by ``n``)
``all_to_all``     S(i) -> S(j): gather along ``i`` and keep chunk ``r`` along ``j``
``chunk``          R -> S(i): keep chunk ``r`` along ``i`` (no communication)
``zero``           R -> P(sum): keep the value on ``r == 0``, zeros elsewhere (no communication);
                   R -> P(avg): keep the value everywhere (the mean of ``n`` copies)
=================  =====================================================================

Nested shards follow DTensor: with ``(S(0), S(0))`` dim 0 is split over mesh dim 0 first and
each piece again over mesh dim 1. Only even shards are supported.

Gradients. Every redistribution is the identity on the global value, so its backward
redistributes the incoming local gradient from ``grad_dst`` to ``grad_src`` with the same
machinery. A gradient placement says how the local gradients make up the global gradient
``G``. Defaults: the gradient of a ``Shard``/``Replicate`` tensor is placed like the tensor;
the gradient of a ``Partial`` tensor is ``Replicate`` (every rank's partial contributes with
weight one, so each needs all of ``G``). Pass ``grad_dst`` when the consumer splits its work
(e.g. ``dst`` is ``R`` but every rank computes a part of the output: its local gradient is a
partial sum, ``grad_dst=P(sum)``) and ``grad_src`` when the producer wants its gradient
placed otherwise.

``P(avg)`` mesh dims scale gradients: ``full = mean_r(local_r)`` so d full / d local = 1/n.
The local gradient of a ``P(avg)`` tensor is therefore ``1/n`` times the representation of
``G`` under its gradient placement. Backward multiplies by ``n`` for every ``P(avg)`` dim of
``dst`` (recovering the representation of ``G`` under ``grad_dst``), redistributes, and divides
by ``n`` for every ``P(avg)`` dim of ``src``. The steps are linear, so this is applied as one factor
``RedistributePlan.grad_scale`` after them; when ``src`` and ``dst`` are both ``P(avg)`` on a dim the
two factors cancel. Gradient placements must shard exactly where the tensor does (a local
gradient has the local tensor's shape); only Replicate and Partial may be swapped.

Collectives: ``all_gather_single`` (``all_gather_into_tensor`` on older torch), ``all_reduce``,
``reduce_scatter_single`` and ``all_to_all_single``, on contiguous tensors. gloo in torch 2.13
has all four; if a backend lacks reduce_scatter or all_to_all (it raises before communicating),
the step falls back to all_reduce + chunk or all_gather + chunk, remembered per backend.
The input is never modified in place and results never alias a larger buffer.

Validation happens before any communication and depends only on the local shape, the
placements and the mesh shape, so every rank raises the same :class:`ShardingError` on bad
input instead of hanging in a collective. Backward is once-differentiable.

This module imports only torch and autopar's core (errors, placement).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from autopar.core.errors import MeshError, ShardingError
from autopar.core.placement import format_placement, redistribute_steps

__all__ = ["redistribute", "to_local_input", "to_global_output", "default_grad_placements", "plan_redistribute",
           "RedistributePlan"]

Step = tuple[int, str, Placement, Placement]
_REDUCE_OPS = ("sum", "avg")


# ----------------------------------------------------------------------------------------------- checks


def _fmt(sh: Sequence[Placement]) -> str:
    return "(" + ", ".join(format_placement(p) for p in sh) + ")"


def _normalize(sh, ndim: int, mesh_shape: tuple[int, ...], what: str) -> tuple[Placement, ...]:
    """Placements as a tuple with non-negative shard dims; raises ShardingError on anything unusable."""
    if isinstance(sh, Placement):
        sh = (sh,)
    try:
        sh = tuple(sh)
    except TypeError:
        raise ShardingError(f"{what}: expected a sequence of placements (one per mesh dim), got {sh!r}") from None
    if len(sh) != len(mesh_shape):
        raise ShardingError(f"{what} {sh!r} has {len(sh)} placements but the mesh {mesh_shape} has "
                            f"{len(mesh_shape)} dims; give one placement per mesh dim")
    out = []
    for d, p in enumerate(sh):
        if isinstance(p, Shard):
            i = p.dim + ndim if p.dim < 0 else p.dim
            if not 0 <= i < ndim:
                raise ShardingError(f"{what}: {format_placement(p)} on mesh dim {d} names a dim the "
                                    f"{ndim}-D tensor does not have")
            out.append(Shard(i))
        elif isinstance(p, Replicate):
            out.append(p)
        elif isinstance(p, Partial):
            if p.reduce_op not in _REDUCE_OPS:
                raise ShardingError(f"{what}: {format_placement(p)} on mesh dim {d} is not supported; "
                                    f"only P(sum) and P(avg) partials can be redistributed")
            out.append(p)
        else:
            raise ShardingError(f"{what}: {p!r} on mesh dim {d} is not a Shard, Replicate or Partial placement")
    return tuple(out)


def default_grad_placements(sh: Sequence[Placement]) -> tuple[Placement, ...]:
    """Gradient placements by default: Shard and Replicate keep theirs, Partial becomes Replicate."""
    return tuple(Replicate() if isinstance(p, Partial) else p for p in sh)


@functools.lru_cache(maxsize=4096)
def _steps(src: tuple[Placement, ...], dst: tuple[Placement, ...]) -> tuple[Step, ...]:
    return tuple(redistribute_steps(src, dst))


def _shard_divisors(state: Sequence[Placement]) -> dict[int, list[int]]:
    by_dim: dict[int, list[int]] = {}
    for d, p in enumerate(state):
        if isinstance(p, Shard):
            by_dim.setdefault(p.dim, []).append(d)
    return by_dim


def _check_even(global_shape: tuple[int, ...], state: Sequence[Placement], mesh_shape: tuple[int, ...],
                what: str) -> None:
    for i, dims in _shard_divisors(state).items():
        k = math.prod(mesh_shape[d] for d in dims)
        if global_shape[i] % k:
            sizes = " x ".join(str(mesh_shape[d]) for d in dims)
            raise ShardingError(
                f"{what}: tensor dim {i} of global shape {global_shape} has size {global_shape[i]}, which "
                f"does not divide evenly over mesh dim(s) {dims} of size {sizes} (mesh shape {mesh_shape}) "
                f"for placements {_fmt(state)}; only even shards are supported: pad dim {i} to a multiple "
                f"of {k} or shard another dim")


def _check_steps(steps: Sequence[Step], src, dst, global_shape, mesh_shape, what: str) -> None:
    """Simulate ``steps``: each must be executable and keep DTensor's nested-shard order."""
    cur = list(src)
    _check_even(global_shape, cur, mesh_shape, what)
    for d, kind, before, after in steps:
        if cur[d] != before:
            raise ShardingError(f"{what}: step {kind} on mesh dim {d} expects {format_placement(before)} but the "
                                f"tensor is {_fmt(cur)} there (redistribute_steps{_fmt(src)} -> {_fmt(dst)})")
        touched = {p.dim for p in (before, after) if isinstance(p, Shard)}
        inner = [e for e in range(d + 1, len(cur)) if isinstance(cur[e], Shard) and cur[e].dim in touched]
        if inner:
            raise ShardingError(
                f"{what}: redistribute_steps{_fmt(src)} -> {_fmt(dst)} asks for {kind} "
                f"{format_placement(before)}->{format_placement(after)} on mesh dim {d} while inner mesh dim(s) "
                f"{inner} still shard tensor dim(s) {sorted(touched)} (state {_fmt(cur)}); that would not give "
                f"the nested (outer-first) shard layout, so the runtime refuses it. This is a planner issue in "
                f"autopar.core.placement.redistribute_steps: the inner mesh dims must be gathered first")
        cur[d] = after
        _check_even(global_shape, cur, mesh_shape, what)
    if tuple(cur) != tuple(dst):
        raise ShardingError(f"{what}: redistribute_steps{_fmt(src)} -> {_fmt(dst)} ends at {_fmt(cur)}")


@dataclass(frozen=True)
class RedistributePlan:
    """Everything one redistribution does, fixed before any communication."""

    src: tuple[Placement, ...]
    dst: tuple[Placement, ...]
    grad_src: tuple[Placement, ...]
    grad_dst: tuple[Placement, ...]
    forward_steps: tuple[Step, ...]
    backward_steps: tuple[Step, ...]
    global_shape: tuple[int, ...]
    dst_avg_factor: int  # backward multiplies the incoming gradient by this (P(avg) dims of dst)
    src_avg_factor: int  # backward divides the outgoing gradient by this (P(avg) dims of src)

    @property
    def grad_scale(self) -> float:
        """Backward multiplies the gradient by this; scaling commutes with the (linear) steps."""
        return self.dst_avg_factor / self.src_avg_factor

    @property
    def is_identity(self) -> bool:
        return not self.forward_steps and not self.backward_steps and self.grad_scale == 1


def _mesh_shape(mesh) -> tuple[int, ...]:
    return tuple(int(mesh.size(d)) for d in range(mesh.ndim))


def _as_key(sh):
    if sh is None or isinstance(sh, Placement):
        return sh
    try:
        return tuple(sh)
    except TypeError:
        return sh


def plan_redistribute(local_shape: Sequence[int], src, dst, mesh_shape: Sequence[int], *, grad_src=None,
                      grad_dst=None) -> RedistributePlan:
    """Check a redistribution and return its steps; needs no process group. Raises ShardingError."""
    args = (tuple(int(s) for s in local_shape), _as_key(src), _as_key(dst), tuple(int(s) for s in mesh_shape),
            _as_key(grad_src), _as_key(grad_dst))
    try:
        return _plan_cached(*args)
    except TypeError as e:  # unhashable placements: plan without the cache (it raises a clear error)
        if "unhashable" not in str(e):
            raise
        return _plan(*args)


@functools.lru_cache(maxsize=4096)
def _plan_cached(local_shape, src, dst, mesh_shape, grad_src, grad_dst) -> RedistributePlan:
    return _plan(local_shape, src, dst, mesh_shape, grad_src, grad_dst)


def _plan(local_shape, src, dst, mesh_shape, grad_src, grad_dst) -> RedistributePlan:
    ndim = len(local_shape)
    src = _normalize(src, ndim, mesh_shape, "src")
    dst = _normalize(dst, ndim, mesh_shape, "dst")
    gsrc = default_grad_placements(src) if grad_src is None else _normalize(grad_src, ndim, mesh_shape, "grad_src")
    gdst = default_grad_placements(dst) if grad_dst is None else _normalize(grad_dst, ndim, mesh_shape, "grad_dst")
    for what, sh, gsh in (("grad_src", src, gsrc), ("grad_dst", dst, gdst)):
        for d, (p, gp) in enumerate(zip(sh, gsh)):
            if (isinstance(p, Shard) or isinstance(gp, Shard)) and p != gp:
                raise ShardingError(
                    f"{what} {_fmt(gsh)} does not fit the tensor's placements {_fmt(sh)}: on mesh dim {d} "
                    f"{format_placement(gp)} vs {format_placement(p)}; a local gradient has the local tensor's "
                    f"shape, so it is sharded exactly where the tensor is (Replicate and Partial may differ)")
    global_shape = list(local_shape)
    for d, p in enumerate(src):
        if isinstance(p, Shard):
            global_shape[p.dim] *= mesh_shape[d]
    global_shape = tuple(global_shape)
    fwd, bwd = _steps(src, dst), _steps(gdst, gsrc)
    _check_steps(fwd, src, dst, global_shape, mesh_shape, "redistribute")
    _check_steps(bwd, gdst, gsrc, global_shape, mesh_shape, "redistribute (gradient)")
    avg = lambda sh: math.prod(mesh_shape[d] for d, p in enumerate(sh)  # noqa: E731
                               if isinstance(p, Partial) and p.reduce_op == "avg")
    return RedistributePlan(src, dst, gsrc, gdst, fwd, bwd, global_shape, avg(dst), avg(src))


# ------------------------------------------------------------------------------------------ collectives

# torch 2.13 deprecates all_gather_into_tensor for all_gather_single (same arguments); older torch has only the former
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_UNSUPPORTED: set[tuple[str, str]] = set()  # (backend, collective) found unsupported at run time


def _backend(group) -> str:
    try:
        return str(dist.get_backend(group))
    except Exception:  # pragma: no cover - exotic groups
        return "?"


def _try_native(name: str, group, call) -> bool:
    """Run ``call()`` unless the group's backend is known not to have ``name``; False means fall back.

    A backend that lacks a collective raises before communicating, on every rank alike, so the
    fallback cannot desynchronize the ranks.
    """
    key = (_backend(group), name)
    if key in _UNSUPPORTED:
        return False
    try:
        call()
        return True
    except (RuntimeError, NotImplementedError, ValueError) as e:
        text = str(e).lower()
        if "support" in text or "not implemented" in text:
            _UNSUPPORTED.add(key)
            return False
        raise


def _all_gather(x: torch.Tensor, dim: int, n: int, group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    all_gather_single(out, x, group=group)
    parts = out.view((n,) + tuple(x.shape))
    return parts[0].clone() if n == 1 else torch.cat(parts.unbind(0), dim=dim)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    y = x.clone(memory_format=torch.contiguous_format)  # never modify the caller's tensor in place
    dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
    return y


def _chunk(x: torch.Tensor, dim: int, n: int, r: int) -> torch.Tensor:
    c = x.shape[dim] // n
    # A compact copy: a view would keep the whole (e.g. just all-reduced) tensor alive.
    return x.narrow(dim, r * c, c).clone(memory_format=torch.contiguous_format)


def _reduce_scatter(x: torch.Tensor, dim: int, n: int, r: int, group) -> torch.Tensor:
    xm = x.movedim(dim, 0).contiguous()
    out = xm.new_empty((xm.shape[0] // n,) + tuple(xm.shape[1:]))
    if _try_native("reduce_scatter", group, lambda: _reduce_scatter_single(out, xm, group=group)):
        return out.movedim(0, dim).contiguous()
    return _chunk(_all_reduce(x, group), dim, n, r)


def _all_to_all(x: torch.Tensor, i: int, j: int, n: int, r: int, group) -> torch.Tensor:
    inp = torch.stack(x.chunk(n, dim=j), 0).contiguous()  # inp[k]: my piece for rank k (its chunk k along j)
    out = torch.empty_like(inp)
    if _try_native("all_to_all", group, lambda: dist.all_to_all_single(out, inp, group=group)):
        return torch.cat(out.unbind(0), dim=i)  # out[k]: rank k's shard (k along i) of my chunk along j
    return _chunk(_all_gather(x, i, n, group), j, n, r)


def _execute(x: torch.Tensor, steps: Sequence[Step], mesh) -> torch.Tensor:
    for d, kind, before, after in steps:
        n, r = mesh.size(d), mesh.get_local_rank(d)
        if kind == "all_gather":
            x = _all_gather(x, before.dim, n, mesh.get_group(d))
        elif kind == "all_reduce":
            x = _all_reduce(x, mesh.get_group(d))
            if before.reduce_op == "avg":
                x = x.div_(n)
        elif kind == "reduce_scatter":
            x = _reduce_scatter(x, after.dim, n, r, mesh.get_group(d))
            if before.reduce_op == "avg":
                x = x.div_(n)
        elif kind == "all_to_all":
            x = _all_to_all(x, before.dim, after.dim, n, r, mesh.get_group(d))
        elif kind == "chunk":
            x = _chunk(x, after.dim, n, r)
        elif kind == "zero":
            if after.reduce_op == "sum" and r != 0:
                x = torch.zeros_like(x)
        else:  # pragma: no cover - redistribute_steps only emits the kinds above
            raise ShardingError(f"unknown redistribution step kind {kind!r} on mesh dim {d}")
    return x


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: RedistributePlan, mesh) -> torch.Tensor:
        ctx.plan, ctx.mesh = plan, mesh
        return _execute(x, plan.forward_steps, mesh)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        plan: RedistributePlan = ctx.plan
        g = _execute(g, plan.backward_steps, ctx.mesh)
        if plan.grad_scale != 1:
            g = g * plan.grad_scale
        return g, None, None


# ---------------------------------------------------------------------------------------------- public


def _check_mesh(mesh) -> None:
    if mesh.get_coordinate() is None:
        raise MeshError(f"rank {dist.get_rank()} is not part of the mesh {mesh}; run redistribute only on "
                        f"the mesh's ranks")


def redistribute(x: torch.Tensor, src, dst, *, mesh, grad_src=None, grad_dst=None) -> torch.Tensor:
    """The local tensor under placements ``dst`` of the tensor whose local tensor is ``x`` under ``src``.

    ``src``/``dst``/``grad_src``/``grad_dst`` are sequences of placements, one per dim of ``mesh``
    (a torch ``DeviceMesh``). Runs ``redistribute_steps(src, dst)`` forward and
    ``redistribute_steps(grad_dst, grad_src)`` on the gradient (see the module docstring for the
    defaults and the P(avg) scaling). Raises :class:`ShardingError` before communicating when a
    shard would be uneven or the placements are unusable.
    """
    if not isinstance(x, torch.Tensor):
        raise ShardingError(f"redistribute expects a local torch.Tensor, got {type(x).__name__}")
    _check_mesh(mesh)
    plan = plan_redistribute(x.shape, src, dst, _mesh_shape(mesh), grad_src=grad_src, grad_dst=grad_dst)
    if plan.is_identity:
        return x
    return _Redistribute.apply(x, plan, mesh)


def to_local_input(x_global: torch.Tensor, dst, mesh, *, grad_dst=None) -> torch.Tensor:
    """This rank's local tensor under ``dst`` of a full tensor every rank holds (no communication).

    Shard dims keep this rank's chunk; ``P(sum)`` dims keep the value on coordinate 0 and zeros
    elsewhere; ``P(avg)`` dims keep the value everywhere. Backward gathers the gradient so that
    ``x_global.grad`` is the full gradient on every rank, as on a single device.
    """
    ndim = getattr(mesh, "ndim", None) or len(_mesh_shape(mesh))
    return redistribute(x_global, (Replicate(),) * ndim, dst, mesh=mesh, grad_dst=grad_dst)


def to_global_output(x_local: torch.Tensor, src, mesh, *, grad_src=None) -> torch.Tensor:
    """The full tensor (replicated on every rank) of the local tensor ``x_local`` placed ``src``.

    Backward hands each rank its gradient under ``grad_src`` (default: see module docstring).
    """
    ndim = getattr(mesh, "ndim", None) or len(_mesh_shape(mesh))
    return redistribute(x_local, src, (Replicate(),) * ndim, mesh=mesh, grad_src=grad_src)
