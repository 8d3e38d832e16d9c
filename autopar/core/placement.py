"""The one printer/parser pair for placements: ``S(d)``, ``R``, ``P(sum)``, ``P(avg)``.

A sharding is a tuple of DTensor placements, one per mesh dimension. This module imports
nothing of autopar's own beyond errors.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from autopar.core.errors import PlanFormatError

__all__ = ["Placement", "Shard", "Replicate", "Partial", "Sharding", "R", "format_placement",
           "parse_placement", "format_sharding", "parse_sharding"]

Sharding = tuple[Placement, ...]
R = Replicate()
_SHARD = re.compile(r"^S\((-?\d+)\)$")
_PARTIAL = re.compile(r"^P\((sum|avg|max|min)\)$")


def format_placement(p: Placement) -> str:
    if isinstance(p, Shard):
        return f"S({p.dim})"
    if isinstance(p, Replicate):
        return "R"
    if isinstance(p, Partial):
        return f"P({p.reduce_op})"
    raise PlanFormatError(f"cannot print placement {p!r}: only Shard, Replicate and Partial are used")


def parse_placement(text: str, *, field: str = "placement") -> Placement:
    s = text.strip()
    if s == "R":
        return Replicate()
    m = _SHARD.match(s)
    if m:
        return Shard(int(m.group(1)))
    m = _PARTIAL.match(s)
    if m:
        return Partial(m.group(1))
    raise PlanFormatError(f"{field}: {text!r} is not a placement; write S(<dim>), R or P(sum)")


def format_sharding(sh: Iterable[Placement]) -> list[str]:
    return [format_placement(p) for p in sh]


def parse_sharding(items: Sequence[str], *, field: str = "sharding") -> Sharding:
    if not isinstance(items, (list, tuple)):
        raise PlanFormatError(f"{field}: expected a list of placements like [\"S(0)\", \"R\"], got {items!r}")
    return tuple(parse_placement(x, field=f"{field}[{i}]") if isinstance(x, str) else _bad(field, i, x)
                 for i, x in enumerate(items))


def _bad(field: str, i: int, x: object) -> Placement:
    raise PlanFormatError(f"{field}[{i}]: expected a string like \"S(0)\", got {x!r}")


def sharding_str(sh: Iterable[Placement]) -> str:
    """Short one-line form for logs and tables: ``S(0)·R``."""
    return "·".join(format_placement(p) for p in sh)


def redistribute_steps(src: Sharding, dst: Sharding) -> list[tuple[int, str, Placement, Placement]]:
    """The per-mesh-dim steps that turn placements ``src`` into ``dst``; planner and runtime share them.

    Phase 1, innermost mesh dim first: shards and partials are undone (``all_gather``,
    ``all_reduce``), or moved directly (``all_to_all`` S(i)->S(j), ``reduce_scatter`` P->S(i)) when
    no other mesh dim shards the tensor dims involved (for P->S(i): or only outer mesh dims that keep their
    S(i), so the piece reduce-scattered is the nested one). Phase 2, outermost first: replicated dims
    become their target locally (``chunk`` for Shard, ``zero`` for Partial: only coordinate 0
    keeps the value). Each step is (mesh dim, kind, placement before, placement after).
    """
    cur = list(src)
    steps: list[tuple[int, str, Placement, Placement]] = []
    ndim = len(src)

    def others_shard(d: int, dims: set[int]) -> bool:
        return any(isinstance(p, Shard) and p.dim in dims for i, p in enumerate(list(cur) + list(dst))
                   if i % ndim != d)

    def outer_shards(state, d: int, dim: int) -> list[int]:
        return [i for i in range(d) if state[i] == Shard(dim)]

    def nested_inner(d: int, dim: int) -> bool:
        # P -> S(dim) on mesh dim d where only outer mesh dims shard ``dim``, each already as it ends (3D tensor
        # parallelism's weight gradients): reduce-scattering the local piece gives DTensor's outer-first nesting
        others = {i % ndim for i, p in enumerate(list(cur) + list(dst))
                  if i % ndim != d and isinstance(p, Shard) and p.dim == dim}
        return all(i < d and cur[i] == dst[i] == Shard(dim) for i in others)

    for d in reversed(range(ndim)):
        s, t = cur[d], dst[d]
        if isinstance(s, Shard) and s == t and outer_shards(cur, d, s.dim) != outer_shards(dst, d, s.dim):
            # a nested shard keeps its place only if the outer mesh dims split that tensor dim the same way
            steps.append((d, "all_gather", s, Replicate()))
            cur[d] = Replicate()
            continue
        if s == t or isinstance(s, Replicate):
            continue
        if isinstance(s, Shard):
            if isinstance(t, Shard) and t != s and not others_shard(d, {s.dim, t.dim}):
                steps.append((d, "all_to_all", s, t))
                cur[d] = t
            else:
                steps.append((d, "all_gather", s, Replicate()))
                cur[d] = Replicate()
        elif isinstance(s, Partial):
            if isinstance(t, Shard) and (not others_shard(d, {t.dim}) or nested_inner(d, t.dim)):
                steps.append((d, "reduce_scatter", s, t))
                cur[d] = t
            else:
                steps.append((d, "all_reduce", s, Replicate()))
                cur[d] = Replicate()
    for d in range(ndim):
        if cur[d] != dst[d]:
            steps.append((d, "chunk" if isinstance(dst[d], Shard) else "zero", cur[d], dst[d]))
            cur[d] = dst[d]
    return steps


def zero_sharding(shape: Sequence[int], sharding: Sharding, mesh_shape: Sequence[int]) -> Sharding | None:
    """Where ZeRO-1/2 keep a parameter's optimizer state (and, for ZeRO-2, its gradient): ``sharding``
    with every replicated mesh dim of size > 1 (its data-parallel dims) sharding one tensor dim that no
    other mesh dim shards, the first whose local size divides evenly. None when no mesh dim replicates
    the parameter or no tensor dim divides (the parameter then keeps its state whole).

    Solver and runtime share this rule: the ILP prices exactly the sharding the runtime builds."""
    zero_dims = [i for i, (p, n) in enumerate(zip(sharding, mesh_shape)) if isinstance(p, Replicate) and n > 1]
    if not zero_dims:
        return None
    ways = 1
    for i in zero_dims:
        ways *= mesh_shape[i]
    taken = {p.dim for p in sharding if isinstance(p, Shard)}
    for d, size in enumerate(shape):
        if d in taken or size % ways:
            continue
        return tuple(Shard(d) if i in zero_dims else p for i, p in enumerate(sharding))
    return None
