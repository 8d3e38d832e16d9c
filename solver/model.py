"""The sharding ILP's model: its variables, rows, time and memory terms, and the graph they are about.

``ShardingModel`` is the one object the parts of the ILP write to (solver.ilp builds the node one-hots
and drives the order; solver.edges, solver.buckets, solver.remat, solver.zero_rows and solver.offload
add their variables and rows), through this public interface only:

  var / add_row                    a variable, a row of the PuLP problem
  add_time / time_terms            objective terms (coefficient, variable) by ``TimeCategory``
  add_mem / mem_terms / mem        memory terms by ``MemCategory``; ``replace_mem`` for a category that
                                   a decision rewrites (optimizer offload's O_dev)
  open_row / memory_exprs          the memory rows, built from ``ROWS`` (the one table saying which
                                   categories enter which row)
  settle_max / settle_product /    values of auxiliary variables after solving (the solver may leave a
  on_settle / settle               variable anywhere above its bound where no row binds; reports read them)
  position / block_list /          facts of the graph the parts share: a node's position, the repeated-
  opens_block / shard_factor       block list recompute is decided for, a block's first op

A category is an enum member, never a string: a term written under a category that does not exist
fails (KeyError / TypeError) instead of silently leaving a row. Memory variables are in MiB (``UNIT``):
bytes misled HiGHS presolve, GiB its tolerances on small models. This module imports autopar's core
and solver.cost, solver.categories and solver.keys only: the parts import it at module top, and it
imports none of them.
"""
from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import pulp

from autopar.cluster.profile import LinkSpec
from autopar.core.graph import GNode, GraphIndex
from autopar.core.mesh import MeshSpec
from autopar.solver import cost as C
from autopar.solver.categories import ACTIVATION_CATEGORIES, OPTIONAL_ROWS, ROWS, MemCategory, MemRow, TimeCategory
from autopar.solver.keys import KeyInfo

__all__ = ["ACTIVATION_CATEGORIES", "ROWS", "UNIT", "KeyInfo", "MemCategory", "MemRow", "ShardingModel", "TimeCategory",
           "value"]

UNIT = float(2 ** 20)   # memory rows in MiB


def value(v) -> float:
    """A solved variable's (or expression's) value; None (a constant term) counts 1."""
    if v is None:
        return 1.0
    val = v.value()
    return float(val) if val is not None else 0.0


Term = tuple[float, object]   # (coefficient, variable or expression; None: a constant)


def _check(cat, kind: type[enum.Enum]) -> None:
    if not isinstance(cat, kind):
        raise TypeError(f"a {kind.__name__} is needed, got {cat!r}")


class ShardingModel:
    """The PuLP problem with its terms by category and the graph facts its parts share (module docstring).
    ``x``: key -> its strategy one-hots (variables, or expressions for merged followers); ``merged``:
    follower key -> (producer key, output); ``edge_terms``: consumer key -> its resharding seconds' terms."""

    def __init__(self, gi: GraphIndex, keys: dict[str, KeyInfo], mesh: MeshSpec, links: tuple[LinkSpec, ...],
                 *, remat: bool) -> None:
        self.gi, self.keys, self.mesh, self.links = gi, keys, mesh, links
        self.remat = remat   # recompute decided for repeated blocks (block_list)
        self.prob = pulp.LpProblem("autopar_sharding", pulp.LpMinimize)
        self.x: dict[str, list] = {}
        self.merged: dict[str, tuple[str, int]] = {}
        self.edge_terms: dict[str, list[Term]] = defaultdict(list)
        self._time: dict[TimeCategory, list[Term]] = {c: [] for c in TimeCategory}
        self._mem: dict[MemCategory, list[Term]] = {c: [] for c in MemCategory}
        self._open = [r for r in MemRow if r not in OPTIONAL_ROWS]
        self._settlers: list[Callable[[], None]] = []
        self._positions = {name: i for i, name in enumerate(gi.nodes)}
        self._block_first: dict[tuple, int] = {}
        for n in gi.nodes.values():
            if n.kind == "op" and n.layer is not None:
                self._block_first.setdefault(n.layer, self._positions[n.name])
        self._shard_factors: dict[tuple, int] = {}
        self.blocks_end = max((i for i, n in enumerate(gi.nodes.values())
                               if n.layer is not None and n.layer[0] in gi.shared_lists), default=-1)

    # -- variables and rows ------------------------------------------------------------------
    def var(self, name: str, **kw) -> pulp.LpVariable:
        """A variable of the problem (``lowBound``, ``upBound``, ``cat`` as PuLP's)."""
        if hasattr(self.prob, "add_variable"):  # PuLP >= 3.3; LpVariable(...) is deprecated there
            return self.prob.add_variable(name, **kw)
        return pulp.LpVariable(name, **kw)

    def add_row(self, constraint: pulp.LpConstraint, name: str) -> None:
        self.prob += constraint, name

    # -- objective and memory terms by category ----------------------------------------------
    def add_time(self, cat: TimeCategory, terms: Iterable[Term]) -> None:
        _check(cat, TimeCategory)
        self._time[cat] += terms

    def time_terms(self, cat: TimeCategory) -> tuple[Term, ...]:
        _check(cat, TimeCategory)
        return tuple(self._time[cat])

    def add_mem(self, cat: MemCategory, terms: Iterable[Term]) -> None:
        _check(cat, MemCategory)
        self._mem[cat] += terms

    def replace_mem(self, cat: MemCategory, terms: Iterable[Term]) -> None:
        """Every term of ``cat`` replaced (optimizer offload: O_dev stands for O in every row)."""
        _check(cat, MemCategory)
        self._mem[cat] = list(terms)

    def mem_terms(self, cat: MemCategory) -> tuple[Term, ...]:
        _check(cat, MemCategory)
        return tuple(self._mem[cat])

    def mem(self, cats: Sequence[MemCategory]) -> pulp.LpAffineExpression:
        """Bytes of the given categories (in their order) as one expression."""
        for cat in cats:
            _check(cat, MemCategory)
        return pulp.lpSum(c * v if v is not None else c for cat in cats for c, v in self._mem[cat])

    def objective(self) -> pulp.LpAffineExpression:
        return pulp.lpSum(c * v for cat in TimeCategory for c, v in self._time[cat] if v is not None)

    def open_row(self, row: MemRow) -> None:
        if row not in self._open:
            self._open.append(row)

    def memory_exprs(self) -> dict[str, pulp.LpAffineExpression]:
        """Row name -> per-rank bytes at that peak: the categories ROWS puts in it (open rows only)."""
        return {row.value: self.mem([c for c, rows in ROWS.items() if row in rows])
                for row in MemRow if row in self._open}

    # -- after solving -----------------------------------------------------------------------
    def settle_max(self, v: pulp.LpVariable, groups: list[list[Term]]) -> None:
        """``v >= sum c x`` for each group: settled to the largest sum."""
        self.on_settle(lambda: setattr(v, "varValue", max((sum(c * value(x) for c, x in terms)
                                                          for terms in groups), default=0.0)))

    def settle_product(self, k: pulp.LpVariable, k_terms: list[Term], ws: list[tuple]) -> None:
        """``k = sum c x`` and ``w >= k beta`` per (beta, w) of ``ws``: settled to their exact products."""
        def settle() -> None:
            k.varValue = sum(c * value(x) for c, x in k_terms)
            for beta, w in ws:
                w.varValue = k.varValue * round(value(beta))
        self.on_settle(settle)

    def on_settle(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in ``settle``, after everything registered before it."""
        self._settlers.append(fn)

    def settle(self) -> None:
        for fn in self._settlers:
            fn()

    # -- the graph ---------------------------------------------------------------------------
    def position(self, node: GNode) -> int:
        return self._positions[node.name]

    def block_list(self, info: KeyInfo) -> str | None:
        """The repeated-block list an op belongs to, when recompute is decided for it."""
        node = info.node
        if not self.remat or node.kind != "op" or node.layer is None or node.layer[0] not in self.gi.shared_lists:
            return None
        return node.layer[0]

    def opens_block(self, node: GNode) -> bool:
        """The block's first op: collectives inserted before it run outside its checkpoint region."""
        return self._block_first.get(node.layer) == self.position(node)

    def shard_factor(self, placements: tuple) -> int:
        f = self._shard_factors.get(placements)
        if f is None:
            f = self._shard_factors[placements] = C.shard_factor(placements, self.mesh.shape)
        return f
