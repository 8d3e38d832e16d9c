"""The one printer/parser pair for placements: ``S(d)``, ``R``, ``P(sum)``, ``P(avg)``.

A sharding is a tuple of DTensor placements, one per mesh dimension. This module imports
nothing of autopar's own beyond errors.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from autopar.errors import PlanFormatError

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
