"""Tensor-parallel layouts of the explicit front ends (``TensorParallel`` 1D / 2D / 2.5D / 3D) as placements
per graph key: which linears are column / row (``block_roles``), the mesh dims of a mode (``tp_sizes``), the
placements a mode pins (``tp_layout``), the checks that they split evenly (``check_divisible``) and the
layout carried through the ops between the pinned ones (``propagate``). Pure functions of a captured graph;
nothing here plans, applies or touches a process group (``autopar.frontend.explicit`` does).

Tensor-parallel layouts, per mesh dim of the mode (``S(d)`` shard tensor dim d, ``R`` replicate,
``P`` partial sum; ``h`` the last dim of an activation ``[batch, seq, h]``; a weight is ``[out, in]``).
Which linears of a repeated block are "column" (their output feeds another linear, e.g. QKV, MLP up) and
which are "row" (their output returns to the residual stream, e.g. attention out, MLP down) is read from
the captured graph: a linear is column when a path from its output reaches another linear without
passing a normalization. The residual stream is every value a block's norm reads.

* **1D** (Megatron, dim ``tp``): column weights ``S(0)`` (and biases ``S(0)``), row weights ``S(1)``,
  biases ``R``; the residual stream and the norms' outputs ``R``, so attention heads and the MLP hidden
  are split and each row linear's partial sums are all-reduced once per linear. The embedding is
  vocab-parallel (weight ``S(0)``, its partial sums all-reduced into the stream) and so is the LM head
  (weight ``S(0)``, logits split on the vocabulary into the vocab-parallel cross-entropy).
* **2D** (SUMMA, ``q x q``, dims ``tp_row``, ``tp_col``): activations ``(S(0), S(h))`` (batch over rows,
  hidden over columns), every weight ``(S(1), S(0))`` (input over rows, output over columns), every linear's
  output ``(S(0), S(h))``. The matmul gathers the input's hidden over ``tp_col`` and the weight's input dim
  over ``tp_row`` (SUMMA's broadcasts of all panels at once, not panel by panel), and backward
  reduce-scatters the weight gradient over ``tp_row`` and the input gradient over ``tp_col`` (its reduces).
* **2.5D** (Tesseract, ``q x q x d``, dims ``tp_dep``, ``tp_row``, ``tp_col``): the 2D layout in each depth
  layer, the batch split over depth too: activations ``(S(0), S(0), S(h))``, weights ``(R, S(1), S(0))``.
* **3D** (``q x q x q``, dims ``tp_x``, ``tp_y``, ``tp_z``; Agarwal et al. / Bian et al.): the matmul's rows
  (tokens) are split over ``tp_z`` (batch) and over the gather dim (sequence), the contraction over one of
  ``tp_x``/``tp_y`` and the output over the other, with the two roles turning from a column to a row
  linear. Column linears read ``(S(1), S(h), S(0))`` and write ``(S(h), P, S(0))``; row linears read
  ``(S(h), S(1), S(0))`` and write ``(P, S(h), S(0))``; column weights ``(S(0), S(1), S(0))``, row
  weights ``(S(1), S(0), S(0))`` (the output dim further split over ``tp_z``). Each linear all-gathers its
  input over the gather dim and its weight over ``tp_z`` (its gradient reduce-scattered back over ``tp_z``:
  a nested shard, ``autopar.core.placement.redistribute_steps``), and its output is reduce-scattered over
  the contraction dim into the next layer's layout: a row linear's into the stream, a column linear's into
  the MLP activation ``(S(h), S(1), S(0))`` (pinned where only pointwise ops lie between the column and the
  row linears). Attention needs the whole sequence of keys and values, so q / k / v are all-reduced over
  the contraction dim instead (the splits the algorithm spreads over the token rows are the batch and the
  sequence here, so no tensor dim is split by two dims that change roles).

Norms, embeddings, LM head. In 2D / 2.5D / 3D every norm reads and writes the hidden-split stream: its
statistics are reduced over the hidden-splitting dim (``solver.strategies.norm``: local sums, one all-reduce
of them forward and one backward) and its weight and bias are split like the hidden dim. The embedding's
weight is split on the hidden dim like the stream (no communication), the LM head's on the vocabulary
(``tp_col``; 3D: ``tp_x`` and ``tp_y``) with the logits split alike into the vocab-parallel cross-entropy;
a weight tied between them takes the head's split. An embedding or head whose sizes do not divide keeps
its weight replicated (``tp_layout(sizes=)``).

Between the pinned tensors, the layout is carried through the blocks' other ops (views, attention, pointwise)
by pinning each op whose strategy can read its inputs as they are (``propagate``); what cannot (a fused QKV
split) stays the solver's.

Imports autopar's core and the solver's strategy rules.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from autopar.core.errors import ConfigError
from autopar.core.graph import GraphIndex
from autopar.core.placement import format_sharding, parse_sharding
from autopar.solver.strategies import strategies_for

__all__ = ["MODES", "TP_DIMS", "BlockRoles", "ExplicitParallelError", "block_roles", "check_divisible",
           "literal", "propagate", "tp_input_placements", "tp_layout", "tp_sizes", "unliteral"]

aten = torch.ops.aten
MODES = ("1D", "2D", "2.5D", "3D")
TP_DIMS = {"1D": ("tp",), "2D": ("tp_row", "tp_col"), "2.5D": ("tp_dep", "tp_row", "tp_col"),
           "3D": ("tp_x", "tp_y", "tp_z")}
_NORMS = {aten.layer_norm.default, aten.rms_norm.default, aten.native_layer_norm.default,
          aten.group_norm.default}
_STOPS = _NORMS | {aten.cross_entropy_loss.default}


class ExplicitParallelError(ConfigError):
    """An explicit front end cannot do what it was asked (wrong device count for the mode, a size that does
    not divide, front ends that conflict)."""


# ------------------------------------------------------------------------------------------------ graph

@dataclass
class BlockRoles:
    """What the tensor-parallel layouts need to know of a captured graph."""

    column: dict[str, str] = field(default_factory=dict)    # linear op key -> its weight key
    row: dict[str, str] = field(default_factory=dict)
    biases: dict[str, str] = field(default_factory=dict)    # linear op key -> its bias key
    stream: set[str] = field(default_factory=set)           # op keys the norms read (the residual stream)
    norms: set[str] = field(default_factory=set)
    heads: dict[str, int] = field(default_factory=dict)     # column linear key -> heads its output is viewed as
    out_ndim: dict[str, int] = field(default_factory=dict)  # op key -> rank of its output
    # row linear key -> key of the op feeding it, where that op is reached from column linears through
    # pointwise ops only (an MLP's activation, not attention)
    row_inputs: dict[str, str] = field(default_factory=dict)
    norm_params: dict[str, list[str]] = field(default_factory=dict)   # norm op key -> its weight / bias keys
    outer_norms: set[str] = field(default_factory=set)     # norms outside the repeated blocks (the final norm)
    embeddings: dict[str, str] = field(default_factory=dict)   # embedding op key -> its weight key
    lm_heads: dict[str, str] = field(default_factory=dict)     # linears outside the blocks -> their weight key


def _is_linear(g, gi: GraphIndex) -> bool:
    return g.kind == "op" and g.target == aten.linear.default and gi.nodes[g.inputs[1].src].kind == "param"


def _fed_pointwise(gi: GraphIndex, name: str, column: set[str]) -> bool:
    """Whether the op ``name`` is computed from column linears' outputs through pointwise ops only."""
    todo, seen, reached = [name], set(), False
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        g = gi.nodes[n]
        if g.kind != "op":
            continue
        if g.key in column:
            reached = True
            continue
        if not (isinstance(g.target, torch._ops.OpOverload) and torch.Tag.pointwise in g.target.tags):
            return False
        todo.extend(r.src for r in g.inputs)
    return reached


def block_roles(gi: GraphIndex) -> BlockRoles:
    """Column / row linears, biases, residual stream and norms of the repeated blocks (every linear when the
    model has no repeated blocks). Column: a path from its output reaches another linear without passing a
    norm (or the loss)."""
    users: dict[str, list[str]] = {n: [] for n in gi.nodes}
    for name, g in gi.nodes.items():
        for ref in g.inputs:
            users[ref.src].append(name)
    linears = [n for n, g in gi.nodes.items() if _is_linear(g, gi)]
    in_blocks = [n for n in linears if gi.nodes[n].layer is not None]
    roles = BlockRoles()
    for name in in_blocks or linears:
        g = gi.nodes[name]
        seen, todo, column = {name}, deque(users[name]), False
        while todo and not column:
            u = todo.popleft()
            if u in seen:
                continue
            seen.add(u)
            gu = gi.nodes[u]
            if _is_linear(gu, gi):
                column = True
            elif gu.target not in _STOPS:
                todo.extend(users[u])
        wkey = gi.nodes[g.inputs[1].src].key
        (roles.column if column else roles.row)[g.key] = wkey
        if len(g.inputs) > 2:
            roles.biases[g.key] = gi.nodes[g.inputs[2].src].key
        if column:   # a view of the output as [b, t, heads, head_dim] right after the linear: its heads
            for u in users[name]:
                gu = gi.nodes[u]
                out = gu.outputs[0] if gu.outputs else None
                if gu.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and out \
                        is not None and len(out.shape) == len(g.outputs[0].shape) + 1:
                    roles.heads[g.key] = out.shape[-2]
    for name in in_blocks or linears:
        g = gi.nodes[name]
        if g.key in roles.row and _fed_pointwise(gi, g.inputs[0].src, set(roles.column)):
            roles.row_inputs[g.key] = gi.nodes[g.inputs[0].src].key
    for name, g in gi.nodes.items():
        if g.kind == "op" and g.outputs and g.outputs[0] is not None:
            roles.out_ndim[g.key] = len(g.outputs[0].shape)
        if g.kind == "op" and g.target in _NORMS and (g.layer is not None or not in_blocks):
            roles.norms.add(g.key)
            src = gi.nodes[g.inputs[0].src]
            if src.kind == "op":
                roles.stream.add(src.key)
        elif g.kind == "op" and g.target in _NORMS:
            roles.outer_norms.add(g.key)
        if g.kind == "op" and g.target in _NORMS:
            roles.norm_params[g.key] = [gi.nodes[r.src].key for r in g.inputs[1:] if gi.nodes[r.src].kind == "param"]
        if g.kind == "op" and g.target == aten.embedding.default and gi.nodes[g.inputs[0].src].kind == "param":
            roles.embeddings[g.key] = gi.nodes[g.inputs[0].src].key
    if in_blocks:
        for name in linears:
            if gi.nodes[name].layer is None:
                roles.lm_heads[gi.nodes[name].key] = gi.nodes[gi.nodes[name].inputs[1].src].key
    return roles


# ------------------------------------------------------------------------------------------- layouts

def _sh(*ps: str) -> tuple[str, ...]:
    return tuple(ps)


def tp_sizes(mode: str, size: int, depth: int | None = None) -> tuple[int, ...]:
    """The mesh dims of tensor-parallel ``mode`` on ``size`` devices, or an ExplicitParallelError."""
    if mode not in MODES:
        raise ExplicitParallelError(f"parallel_mode={mode!r} is not one of {MODES}")
    if mode == "1D":
        return (size,)
    if mode == "2D":
        q = math.isqrt(size)
        if q * q != size:
            raise ExplicitParallelError(f"2D tensor parallelism (SUMMA) needs a square number of devices q x q, got "
                                        f"{size}; use 4, 9, 16, ... devices for it (or mode '1D')")
        return (q, q)
    if mode == "3D":
        q = round(size ** (1 / 3))
        if q ** 3 != size:
            raise ExplicitParallelError(f"3D tensor parallelism needs a cube number of devices q x q x q, got {size}; "
                                        f"use 8, 27, 64, ... devices for it (or mode '1D')")
        return (q, q, q)
    if depth is not None:
        q = math.isqrt(size // depth) if size % depth == 0 else 0
        if q < 1 or q * q * depth != size:
            raise ExplicitParallelError(f"2.5D tensor parallelism needs q x q x depth devices; {size} devices are not "
                                        f"a square times depth={depth}")
        return (depth, q, q)
    layers = [q for q in range(math.isqrt(size), 1, -1) if size % (q * q) == 0]
    deep = [q for q in layers if size // (q * q) >= 2]
    if not layers:
        raise ExplicitParallelError(f"2.5D tensor parallelism needs q x q x depth devices with q >= 2; {size} has no "
                                    f"square factor q x q; use e.g. 4, 8, 16, 18, ... devices")
    q = (deep or layers)[0]   # the largest layer with some depth, else the largest (depth 1: the 2D layout)
    return (size // (q * q), q, q)


def tp_layout(mode: str, roles: BlockRoles, gi: GraphIndex, sizes: tuple[int, ...] | None = None
              ) -> dict[str, tuple[str, ...]]:
    """{graph key: placements on the mode's mesh dims} for the parameters and activations the mode pins.
    ``sizes`` (the mode's mesh dims): an embedding or LM head whose vocabulary / hidden size does not divide
    (e.g. 50257) keeps its weight replicated over the tensor-parallel dims instead of failing the mode."""
    out: dict[str, tuple[str, ...]] = {}
    nd = len(TP_DIMS[mode])
    rep = ("R",) * nd
    last = lambda key: f"S({roles.out_ndim[key] - 1})"
    if mode == "1D":
        for lin, w in roles.column.items():
            out[w] = _sh("S(0)")
            if lin in roles.biases:
                out[roles.biases[lin]] = _sh("S(0)")
            out[lin] = _sh(last(lin))
        for lin, w in roles.row.items():
            out[w] = _sh("S(1)")
            if lin in roles.biases:
                out[roles.biases[lin]] = rep
            out[lin] = _sh("P(sum)")
        for key in roles.stream | roles.norms:
            out[key] = rep
    elif mode in ("2D", "2.5D"):
        dep = ("S(0)",) if mode == "2.5D" else ()
        wdep = ("R",) if mode == "2.5D" else ()
        for lin, w in {**roles.column, **roles.row}.items():
            out[w] = wdep + _sh("S(1)", "S(0)")
            if lin in roles.biases:
                out[roles.biases[lin]] = wdep + _sh("R", "S(0)")
            out[lin] = dep + _sh("S(0)", last(lin))
        for key in roles.stream:
            out[key] = dep + _sh("S(0)", last(key))
    else:   # 3D
        for lin, w in roles.column.items():
            out[w] = _sh("S(0)", "S(1)", "S(0)")
            if lin in roles.biases:
                out[roles.biases[lin]] = _sh("S(0)", "R", "R")
            out[lin] = _sh(last(lin), "P(sum)", "S(0)")
        for lin, w in roles.row.items():
            out[w] = _sh("S(1)", "S(0)", "S(0)")
            if lin in roles.biases:
                out[roles.biases[lin]] = _sh("R", "S(0)", "R")
            out[lin] = _sh("P(sum)", last(lin), "S(0)")
        for key in roles.stream:
            out[key] = _sh("S(1)", last(key), "S(0)")
        for key in roles.row_inputs.values():   # the column outputs reduce-scattered over tp_y (their rows)
            out[key] = _sh(last(key), "S(1)", "S(0)")
    shapes = _shapes(gi)
    fits = lambda key, pls: sizes is None or not _uneven(shapes[key], pls, sizes)
    out.update(_outer_layout(mode, roles, out, last, fits))
    return out


# the norms' parameters (split like the hidden dim they scale), the embedding's and the LM head's weight [vocab,
# hidden] per mode: Megatron's vocab-parallel embedding and head in 1D; in 2D / 2.5D / 3D the embedding split on
# the hidden dim as the residual stream is (a tied one, and the head, on the vocabulary)
_NORM_PARAM = {"1D": ("R",), "2D": ("R", "S(0)"), "2.5D": ("R", "R", "S(0)"), "3D": ("R", "S(0)", "R")}
_EMBED = {"1D": ("S(0)",), "2D": ("R", "S(1)"), "2.5D": ("R", "R", "S(1)"), "3D": ("R", "S(1)", "R")}
_HEAD = {"1D": ("S(0)",), "2D": ("R", "S(0)"), "2.5D": ("R", "R", "S(0)"), "3D": ("S(0)", "S(0)", "R")}
_LOGITS = {"1D": ("V",), "2D": ("S(0)", "V"), "2.5D": ("S(0)", "S(0)", "V"), "3D": ("V", "V", "S(0)")}  # V: vocab


def _outer_layout(mode: str, roles: BlockRoles, out: dict[str, tuple[str, ...]], last, fits
                  ) -> dict[str, tuple[str, ...]]:
    """Norms (statistics over the hidden split, solver.strategies.norm), embeddings and LM heads."""
    extra: dict[str, tuple[str, ...]] = {}
    key = next((k for k in sorted(roles.stream) if k in out), None)
    if mode != "1D" and key is not None:
        stream, hidden = out[key], out[key].index(last(key))
        for norm in roles.norms | roles.outer_norms:
            extra[norm] = tuple(last(norm) if i == hidden else p for i, p in enumerate(stream))
            for param in roles.norm_params.get(norm, []):
                extra[param] = _NORM_PARAM[mode]
    heads = set(roles.lm_heads.values())
    for emb, weight in roles.embeddings.items():
        pls = _HEAD[mode] if weight in heads else _EMBED[mode]
        if not fits(weight, pls):
            continue
        extra[weight] = pls
        if mode == "1D":   # vocab-parallel: each rank looks up its rows, the partial sums all-reduced after
            extra[emb] = ("P(sum)",)
    for head, weight in roles.lm_heads.items():   # the logits split on the vocabulary like the weight
        if fits(weight, _HEAD[mode]):
            extra[weight] = _HEAD[mode]
            extra[head] = tuple(last(head) if p == "V" else p for p in _LOGITS[mode])
    return extra


def tp_input_placements(mode: str) -> tuple[str, ...]:
    return {"1D": ("R",), "2D": ("S(0)", "R"), "2.5D": ("S(0)", "S(0)", "R"), "3D": ("R", "R", "S(0)")}[mode]


def _shapes(gi: GraphIndex) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for g in gi.nodes.values():
        if g.outputs and g.outputs[0] is not None:
            shapes.setdefault(g.key, tuple(g.outputs[0].shape))
    return shapes


def _uneven(shape: tuple[int, ...], pls: tuple[str, ...], sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    split = [1] * len(shape)
    for p, n in zip(pls, sizes):
        if p.startswith("S("):
            split[int(p[2:-1])] *= n
    return [(d, shape[d], k) for d, k in enumerate(split) if shape[d] % k]


def check_divisible(mode: str, sizes: tuple[int, ...], layout: dict[str, tuple[str, ...]], roles: BlockRoles,
                    gi: GraphIndex) -> None:
    """Every pinned tensor splits evenly, and 1D splits whole attention heads; else ExplicitParallelError."""
    shapes = _shapes(gi)
    for key, pls in layout.items():
        shape = shapes[key]
        bad = _uneven(shape, pls, sizes)
        if bad:
            d, s, k = bad[0]
            what = "hidden size" if d == len(shape) - 1 else f"dim {d}"
            raise ExplicitParallelError(
                f"TensorParallel {mode} on {'x'.join(map(str, sizes))} devices splits {key} {list(shape)} into {k} "
                f"parts along its {what}, but {s} is not divisible by {k}; choose sizes (hidden, heads, FFN, "
                f"batch, sequence) divisible by the mode's splits, or another mode / device count")
    if mode == "1D":
        for lin, h in roles.heads.items():
            if h % sizes[0]:
                raise ExplicitParallelError(
                    f"TensorParallel 1D on {sizes[0]} devices splits attention heads, but {lin} gives {h} heads, "
                    f"not divisible by {sizes[0]}; use a tensor-parallel size dividing every head count")


# ---------------------------------------------------------------------------------------- propagation

def propagate(gi: GraphIndex, fix: dict[str, tuple[str, ...]], inputs, params, mesh_shape
               ) -> dict[str, tuple[str, ...]]:
    """The layout carried through the ops of the repeated blocks between the pinned ones: in graph order, an op
    whose inputs' placements are known gets the output of the strategy that reads them as they are (no
    collective), pinned too; where no strategy does, the op (and what follows from it) stays the solver's.
    Keeps the mode's layout inside attention and the MLP, and the ILP small on 3-D meshes."""
    known: dict[tuple[str, int], tuple] = {}
    pinned = {unliteral(k): v for k, v in fix.items()}
    out: dict[str, tuple[str, ...]] = {}
    for name, g in gi.nodes.items():
        key_pls = pinned.get(g.key) or out.get(g.key)
        if g.kind == "param":
            key_pls = key_pls or params
        elif g.kind == "input":
            key_pls = key_pls or inputs
        elif g.kind == "buffer":
            key_pls = key_pls or ("R",) * len(mesh_shape)
        if key_pls is not None:
            known[(name, 0)] = tuple(parse_sharding(list(key_pls), field=g.key))
            continue
        if g.kind != "op" or g.layer is None or not g.outputs or g.outputs[0] is None:
            continue
        ins = [known.get((r.src, r.out)) for r in g.inputs]
        if any(i is None for i in ins):
            continue
        strategies, _ = strategies_for(g, gi.nodes, tuple(mesh_shape))
        match = [s for s in strategies if list(s.inputs) == ins and s.outputs[0] is not None]
        if not match:
            continue
        s = match[0]
        for j, o in enumerate(s.outputs):
            if o is not None:
                known[(name, j)] = o
        out[g.key] = tuple(format_sharding(s.outputs[0]))
    return {literal(k): v for k, v in out.items()}


def unliteral(pattern: str) -> str:
    return pattern.replace("[*]", "*").replace("[?]", "?").replace("[[]", "[")


def literal(key: str) -> str:
    """A graph key as an fnmatch pattern matching only itself (folded keys hold ``*``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in key)
