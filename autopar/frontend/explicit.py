"""Explicit parallel front ends: ``DataParallel``, ``TensorParallel`` (1D / 2D / 2.5D / 3D),
``PipelineParallel``, ``convert_to_amp`` and ``ZeroOptimizer`` as constraints on the planner.

None of them is a second runtime. Each front end claims mesh dims and says how tensors are placed on them;
together they become ``PlanOptions`` (``fix=`` placements per parameter and activation key, ``pipeline=``,
``precision=``, ``zero=``) and the model goes through the normal ``autopar.plan`` -> ``autopar.apply``
path: the same capture, codegen, runtime, checkpoints and cost model. What the front ends leave open
stays the solver's (the ops between the pinned activations, memory decisions).

``model = TensorParallel(model, "1D")`` (and the others) returns an :class:`ExplicitParallel`, an
``nn.Module`` with the model's FQNs that plans and applies itself on its first forward (or on
``model.materialize(example_inputs)``) under the process group, on a mesh made from the world size:
``pp`` (PipelineParallel), then ``dp`` (DataParallel), then the tensor-parallel dims of the mode. Front
ends compose by wrapping: ``DataParallel(TensorParallel(model, "1D", size=2))``.

Tensor-parallel layouts, per mesh dim of the mode (``S(d)`` shard tensor dim d, ``R`` replicate,
``P`` partial sum; ``h`` the last dim of an activation ``[batch, seq, h]``; a weight is ``[out, in]``).
Which linears of a repeated block are "column" (their output feeds another linear, e.g. QKV, MLP up) and
which are "row" (their output returns to the residual stream, e.g. attention out, MLP down) is read from
the captured graph: a linear is column when a path from its output reaches another linear without
passing a normalization. The residual stream is every value a block's norm reads.

* **1D** (Megatron, dim ``tp``): column weights ``S(0)`` (and biases ``S(0)``), row weights ``S(1)``,
  biases ``R``; the residual stream and the norms' outputs ``R``, so attention heads and the MLP hidden
  are split and each row linear's partial sums are all-reduced once per linear.
* **2D** (SUMMA, ``q x q``, dims ``tp_row``, ``tp_col``): activations ``(S(0), S(h))`` (batch over rows,
  hidden over columns), every weight ``(S(1), S(0))`` (input over rows, output over columns), every linear's
  output ``(S(0), S(h))``. The matmul gathers the input's hidden over ``tp_col`` and the weight's input dim
  over ``tp_row`` (SUMMA's broadcasts of all panels at once), and backward reduce-scatters the weight
  gradient over ``tp_row`` and the input gradient over ``tp_col`` (its reduces).
* **2.5D** (Tesseract, ``q x q x d``, dims ``tp_dep``, ``tp_row``, ``tp_col``): the 2D layout in each depth
  layer, the batch split over depth too: activations ``(S(0), S(0), S(h))``, weights ``(R, S(1), S(0))``.
* **3D** (``q x q x q``, dims ``tp_x``, ``tp_y``, ``tp_z``; Agarwal et al. / Bian et al.): the matmul's rows
  (tokens) are split over ``tp_z`` (batch) and over the gather dim (sequence), the contraction over one of
  ``tp_x``/``tp_y`` and the output over the other, with the two roles turning from a column to a row
  linear. Column linears read ``(S(1), S(h), S(0))`` and write ``(S(h), P, S(0))``; row linears read
  ``(S(h), S(1), S(0))`` and write ``(P, S(h), S(0))``; column weights ``(S(0), S(1), S(0))``, row
  weights ``(S(1), S(0), S(0))`` (the output dim further split over ``tp_z``). Each linear all-gathers its
  input over the gather dim and its weight over ``tp_z`` and its output is reduce-scattered over the
  contraction dim into the next layer's layout (the splits the algorithm spreads over the token rows are
  the batch and the sequence here, so no tensor dim is split by two dims that change roles).

Between the pinned tensors, the layout is carried through the blocks' other ops (views, attention, pointwise)
by pinning each op whose strategy can read its inputs as they are (``_propagate``); what cannot (a fused QKV
split, a norm over a split hidden dim) stays the solver's. The norms' parameters, the embeddings and the LM
head are replicated over the tensor-parallel dims (the modes define the transformer layers).

Optimizers. A torch optimizer built over the model's parameters before the plan is made is rebound to the
parallel parameters when it first steps (a global optimizer step pre-hook; one with state is refused), or at
once when it went through ``convert_to_amp``. ``ZeroOptimizer(optimizer, model)`` returns a new optimizer of
the same class that is also an ``autopar.zero.ZeroOptimizer``, initialized over the parallel module (with the
given optimizer's hyper-parameters and parameter groups) when the model materializes. Normalizations over a split hidden dim are the solver's (it gathers
the hidden dim before them). Imports autopar's core, runtime and frontend.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.optim.optimizer import register_optimizer_step_pre_hook

from autopar.core.errors import AutoparError, ConfigError, MeshError
from autopar.core.graph import GraphIndex, index_graph
from autopar.core.mesh import PP_DIM
from autopar.core.options import PipelineOptions, PlanOptions
from autopar.core.placement import format_sharding, parse_sharding
from autopar.frontend.applying import parallelize
from autopar.frontend.planning import capture_exact
from autopar.frontend.planning import plan as autopar_plan
from autopar.runtime import zero as zero_rt
from autopar.runtime.pipeline import forward_backward
from autopar.solver.strategies import strategies_for

__all__ = ["MODES", "DataParallel", "ExplicitParallel", "PipelineParallel", "TensorParallel", "ZeroOptimizer",
           "compare_modes", "convert_to_amp", "mode_constraints", "tp_layout"]

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


def _is_linear(g, gi: GraphIndex) -> bool:
    return g.kind == "op" and g.target == aten.linear.default and gi.nodes[g.inputs[1].src].kind == "param"


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
    for name, g in gi.nodes.items():
        if g.kind == "op" and g.outputs and g.outputs[0] is not None:
            roles.out_ndim[g.key] = len(g.outputs[0].shape)
        if g.kind == "op" and g.target in _NORMS and (g.layer is not None or not in_blocks):
            roles.norms.add(g.key)
            src = gi.nodes[g.inputs[0].src]
            if src.kind == "op":
                roles.stream.add(src.key)
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


def tp_layout(mode: str, roles: BlockRoles, gi: GraphIndex) -> dict[str, tuple[str, ...]]:
    """{graph key: placements on the mode's mesh dims} for the parameters and activations the mode pins."""
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
    return out


def tp_input_placements(mode: str) -> tuple[str, ...]:
    return {"1D": ("R",), "2D": ("S(0)", "R"), "2.5D": ("S(0)", "S(0)", "R"), "3D": ("R", "R", "S(0)")}[mode]


def check_divisible(mode: str, sizes: tuple[int, ...], layout: dict[str, tuple[str, ...]], roles: BlockRoles,
                    gi: GraphIndex) -> None:
    """Every pinned tensor splits evenly, and 1D splits whole attention heads; else ExplicitParallelError."""
    shapes = {}
    for g in gi.nodes.values():
        if g.outputs and g.outputs[0] is not None:
            shapes.setdefault(g.key, g.outputs[0].shape)
    for key, pls in layout.items():
        shape = shapes[key]
        split = [1] * len(shape)
        for p, n in zip(pls, sizes):
            if p.startswith("S("):
                split[int(p[2:-1])] *= n
        bad = [(d, shape[d], k) for d, k in enumerate(split) if shape[d] % k]
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


# ------------------------------------------------------------------------------------------- front ends

@dataclass(frozen=True)
class _DimClaim:
    """One front end's mesh dims and its placements on them."""

    kind: str                                   # "dp" | "tp" | "pp"
    names: tuple[str, ...]
    size: int | None                            # devices in all (None: what is left of the world)
    mode: str | None = None
    depth: int | None = None

    def sizes(self, size: int) -> tuple[int, ...]:
        if self.kind == "tp":
            return tp_sizes(self.mode, size, self.depth)
        return (size,)


@dataclass
class _Spec:
    claims: list[_DimClaim] = field(default_factory=list)
    precision: str | None = None
    zero: int | None = None
    microbatches: int | None = None
    schedule: str | None = None

    def add(self, claim: _DimClaim) -> None:
        for c in self.claims:
            if c.kind == claim.kind:
                what = {"dp": "DataParallel", "tp": "TensorParallel", "pp": "PipelineParallel"}[c.kind]
                detail = f" ({c.mode} and {claim.mode})" if c.kind == "tp" else ""
                raise ExplicitParallelError(f"{what} is applied twice to this model{detail}: the two ask for "
                                            f"conflicting placements of the same tensors; keep one")
        self.claims.append(claim)


class ExplicitParallel(nn.Module):
    """A model under explicit front ends: plans and applies itself on the first forward (or
    :meth:`materialize`), then runs as the ``ParallelModule`` (``.parallel_module``, ``.plan``) it became.
    Parameters keep the model's FQNs; before materializing they are the model's own tensors, after it
    the plan's DTensors (optimizers made before are rebound on their next step, see module docs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"the front ends take an nn.Module, got {type(model).__name__}")
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            raise ExplicitParallelError("this model is already parallel (its parameters are DTensors); apply the "
                                        "front ends to the original model")
        self.__dict__["spec"] = _Spec()
        self.__dict__["model"] = model
        self.__dict__["parallel_module"] = None
        self.__dict__["_optimizers"] = []
        self._adopt(model)

    def _adopt(self, m: nn.Module) -> None:
        self._modules.clear()
        self._parameters.clear()
        self._buffers.clear()
        for name, child in m.named_children():
            self._modules[name] = child
        for name, p in m.named_parameters(recurse=False):
            self._parameters[name] = p
        for name, b in m.named_buffers(recurse=False):
            self._buffers[name] = b
        self.train(m.training)

    # ------------------------------------------------------------------------------ constraints

    @property
    def plan(self):
        return None if self.parallel_module is None else self.parallel_module.plan

    def mesh_layout(self, world_size: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(mesh shape, dim names) of the front ends on ``world_size`` devices: pp, dp, then the TP dims."""
        claims = {c.kind: c for c in self.spec.claims}
        if not claims:
            raise ExplicitParallelError("convert_to_amp / ZeroOptimizer alone do not say how to split the model; "
                                        "wrap it in DataParallel, TensorParallel or PipelineParallel too")
        given = math.prod(c.size for c in claims.values() if c.size is not None)
        free = [c for c in claims.values() if c.size is None]
        if world_size % given:
            sizes = [(c.kind, c.size) for c in claims.values() if c.size]
            raise ExplicitParallelError(f"the front ends ask for {given} devices (sizes {sizes}), which does not "
                                        f"divide the world size {world_size}")
        left = world_size // given
        if len(free) > 1:
            raise ExplicitParallelError(f"{' and '.join(c.kind for c in free)} both take 'the rest of the devices'; "
                                        f"give size= to all but one of them")
        if not free and left != 1:
            raise ExplicitParallelError(f"the front ends use {given} of {world_size} devices; give sizes whose product "
                                        f"is the world size (or leave one size unset)")
        shape: list[int] = []
        names: list[str] = []
        for kind in ("pp", "dp", "tp"):
            c = claims.get(kind)
            if c is None:
                continue
            sizes = c.sizes(c.size if c.size is not None else left)
            shape += sizes
            names += c.names
        return tuple(shape), tuple(names)

    def plan_options(self, example_inputs, world_size: int, **extra) -> tuple[tuple[int, ...], tuple[str, ...],
                                                                               PlanOptions]:
        """(mesh shape, names, PlanOptions) the front ends ask for on ``world_size`` devices; ``extra`` are
        further plan options (a ``fix`` of yours may not pin what a front end pins)."""
        shape, names = self.mesh_layout(world_size)
        fix = self._fix(example_inputs, shape, names, extra.get("fold_layers", True))
        user_fix = dict(extra.pop("fix", None) or {})
        keys = [_unliteral(k) for k in fix]
        clash = sorted({pat for pat in user_fix for k in keys
                        if fnmatch.fnmatchcase(k, pat) or fnmatch.fnmatchcase(k.removeprefix("param:"), pat)})
        if clash:
            raise ExplicitParallelError(f"fix= pattern(s) {clash[:3]} pin tensors the front ends pin already (two "
                                        f"placements for one tensor); drop them from fix=")
        opts: dict = {"fix": {**user_fix, **fix}}
        for name, val in (("precision", self.spec.precision), ("zero", self.spec.zero)):
            if val is not None:
                if extra.get(name) not in (None, val):
                    raise ExplicitParallelError(f"{name}={extra[name]!r} conflicts with the front ends' {val!r}")
                opts[name] = val
        pp = next((c for c in self.spec.claims if c.kind == "pp"), None)
        if pp is not None:
            stages = shape[names.index(PP_DIM)]
            opts["pipeline"] = PipelineOptions(stages=stages, microbatches=self.spec.microbatches,
                                               schedule=self.spec.schedule)
        elif PP_DIM in names:
            opts["pipeline"] = False
        try:
            options = PlanOptions.from_kwargs(**{**extra, **opts})
            if pp is not None:
                options.check_pipeline()
            return shape, names, options
        except ConfigError as e:
            raise ExplicitParallelError(f"these front ends conflict: {e}") from None

    def _fix(self, example_inputs, shape, names, fold_layers: bool) -> dict[str, tuple[str, ...]]:
        claims = {c.kind: c for c in self.spec.claims}
        dims = dict(zip(names, shape))
        tp = claims.get("tp")
        layout: dict[str, tuple[str, ...]] = {}
        if "dp" not in claims and "tp" not in claims:
            return {}   # pipeline stages only: placements are the solver's
        if "pp" in claims and tp is not None:
            raise ExplicitParallelError("TensorParallel inside PipelineParallel is not supported yet (each stage is "
                                        "captured apart); plan a (pp, tp) mesh with autopar.plan instead")
        gi = index_graph(capture_exact(self.model, example_inputs, fold_layers=fold_layers))
        roles = block_roles(gi)
        if tp is not None:
            if not roles.column and not roles.row:
                raise ExplicitParallelError("TensorParallel found no nn.Linear (aten.linear with a parameter weight) to "
                                            "split in this model")
            layout = tp_layout(tp.mode, roles, gi)
            check_divisible(tp.mode, tuple(dims[n] for n in tp.names), layout, roles, gi)
        elif "pp" not in claims:   # data parallel alone: the residual stream and every linear's output on the batch
            layout = {k: () for k in (*roles.stream, *roles.norms, *roles.column, *roles.row)}
        per_kind: dict[str, dict[str, str]] = {}   # default placement per kind: {dim name: placement}
        for kind in ("param", "input", "op"):
            d: dict[str, str] = {}
            for c in self.spec.claims:
                if c.kind == "dp":
                    d["dp"] = "R" if kind == "param" else "S(0)"
                elif c.kind == "pp":
                    d[PP_DIM] = "R"
                elif kind == "input":
                    d.update(zip(c.names, tp_input_placements(c.mode)))
            per_kind[kind] = d
        fix: dict[str, tuple[str, ...]] = {}
        for key, pls in layout.items():
            kind = "param" if key.startswith("param:") else "op"
            full = {**per_kind[kind], **(dict(zip(TP_DIMS[tp.mode], pls)) if tp is not None else {})}
            fix[_literal(key)] = tuple(full[n] for n in names)
        inputs = tuple(per_kind["input"][n] for n in names) if all(n in per_kind["input"] for n in names) else None
        params = tuple(per_kind["param"].get(n, "R") for n in names)
        if tp is not None:
            fix.update(_propagate(gi, fix, inputs, params, shape))
        if inputs is not None:
            fix["input:*"] = inputs
        fix["param:*"] = params
        return fix

    # ------------------------------------------------------------------------------ running

    def materialize(self, example_inputs, *, cluster=None, **plan_options) -> nn.Module:
        """Plan (rank 0, shared) and apply under the process group; returns the parallel module."""
        if self.parallel_module is not None:
            return self.parallel_module
        if not dist.is_initialized():
            raise MeshError("the front ends run under a process group: call torch.distributed.init_process_group "
                            "(or run under torchrun) before the first forward")
        shape, names, opts = self.plan_options(example_inputs, dist.get_world_size(), **plan_options)
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device, shape, mesh_dim_names=names)
        olds = {fqn: p for fqn, p in self.model.named_parameters(remove_duplicate=False)}
        pm = parallelize(self.model, mesh, example_inputs, cluster=cluster, options=opts)
        self.__dict__["parallel_module"] = pm
        self._adopt(pm)
        new = dict(pm.named_parameters(remove_duplicate=False)) if not hasattr(pm, "stage_param") else \
            {fqn: pm.stage_param(fqn) for fqn in olds}
        for key in [k for k, (ref, _) in _REPLACED.items() if ref() is None]:
            del _REPLACED[key]
        for fqn, p in olds.items():
            _REPLACED[id(p)] = (weakref.ref(p), None if new.get(fqn) is None else weakref.ref(new[fqn]))
        _install_rebind_hook()
        for opt in self._optimizers:
            if isinstance(opt, zero_rt.ZeroOptimizer):
                _rebuild_zero(opt, pm)
            else:
                _rebind(opt)
        return pm

    def forward(self, *args, **kwargs):
        if self.parallel_module is None:
            if args and kwargs:
                raise ConfigError("the first call plans the model on its inputs: give them all as keywords or all "
                                  "positionally (or call model.materialize(example_inputs) first)")
            self.materialize(kwargs if kwargs else args)
        if any(c.kind == "pp" for c in self.spec.claims):
            raise ConfigError("a PipelineParallel model runs whole steps: loss = model.forward_backward(inputs)")
        return self.parallel_module(*args, **kwargs)

    def forward_backward(self, inputs, target=None, loss_fn=None) -> torch.Tensor:
        """One forward and backward (``autopar.forward_backward``; the pipeline schedule for PipelineParallel)."""
        if self.parallel_module is None:
            self.materialize(inputs)
        return forward_backward(self.parallel_module, inputs, target, loss_fn)


def _propagate(gi: GraphIndex, fix: dict[str, tuple[str, ...]], inputs, params, mesh_shape
               ) -> dict[str, tuple[str, ...]]:
    """The layout carried through the ops of the repeated blocks between the pinned ones: in graph order, an op
    whose inputs' placements are known gets the output of the strategy that reads them as they are (no
    collective), pinned too; where no strategy does, the op (and what follows from it) stays the solver's.
    Keeps the mode's layout inside attention and the MLP, and the ILP small on 3-D meshes."""
    known: dict[tuple[str, int], tuple] = {}
    pinned = {_unliteral(k): v for k, v in fix.items()}
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
    return {_literal(k): v for k, v in out.items()}


def _unliteral(pattern: str) -> str:
    return pattern.replace("[*]", "*").replace("[?]", "?").replace("[[]", "[")


def _literal(key: str) -> str:
    """A graph key as an fnmatch pattern matching only itself (folded keys hold ``*``)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in key)


def _wrap(model: nn.Module) -> ExplicitParallel:
    if isinstance(model, ExplicitParallel):
        if model.parallel_module is not None:
            raise ExplicitParallelError("this model was planned and applied already (its first forward ran); apply "
                                        "every front end before the first forward")
        return model
    return ExplicitParallel(model)


def _size(size, what: str) -> int | None:
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ExplicitParallelError(f"{what} size must be a positive int, got {size!r}")
    return size


def DataParallel(model: nn.Module, *, size: int | None = None) -> ExplicitParallel:
    """Data parallelism over a mesh dim ``dp`` of ``size`` devices (default: those no other front end takes):
    every parameter replicated on it, every input split along dim 0; gradients all-reduced (bucketed)."""
    m = _wrap(model)
    m.spec.add(_DimClaim("dp", ("dp",), _size(size, "DataParallel")))
    return m


def TensorParallel(model: nn.Module, parallel_mode: str = "1D", *, size: int | None = None,
                   depth: int | None = None) -> ExplicitParallel:
    """Tensor parallelism of ``parallel_mode`` ('1D' Megatron, '2D' SUMMA q x q, '2.5D' Tesseract q x q x depth,
    '3D' q x q x q) over ``size`` devices (default: those no other front end takes); layouts in the module
    docs. ``depth``: 2.5D's depth (default: the largest square layer)."""
    mode = str(parallel_mode).upper()
    if mode not in MODES:
        raise ExplicitParallelError(f"parallel_mode={parallel_mode!r} is not one of {MODES}")
    if depth is not None and mode != "2.5D":
        raise ExplicitParallelError(f"depth= is 2.5D's; parallel_mode {mode!r} does not take it")
    if size is not None:
        tp_sizes(mode, _size(size, "TensorParallel"), _size(depth, "2.5D depth"))   # fails early on a bad count
    m = _wrap(model)
    m.spec.add(_DimClaim("tp", TP_DIMS[mode], size, mode, depth))
    return m


def PipelineParallel(model: nn.Module, num_stages: int = 2, *, num_microbatches: int | None = None,
                     schedule: str = "1f1b") -> ExplicitParallel:
    """Pipeline parallelism over a mesh dim ``pp`` of ``num_stages`` devices, one stage each (the planner cuts
    the blocks; ``schedule`` 'gpipe' or '1f1b'; ``num_microbatches`` fixes the micro-batches, default the
    planner's). Run a step with ``model.forward_backward(inputs)``."""
    if schedule not in ("gpipe", "1f1b"):
        raise ExplicitParallelError(f"PipelineParallel schedule={schedule!r}: 'gpipe' or '1f1b' (one stage per "
                                    f"device; the interleaved schedule is autopar.plan's pipeline= option)")
    m = _wrap(model)
    m.spec.add(_DimClaim("pp", (PP_DIM,), _size(num_stages, "PipelineParallel num_stages")))
    m.spec.microbatches = _size(num_microbatches, "num_microbatches")
    m.spec.schedule = schedule
    return m


def convert_to_amp(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, criterion=None, *,
                   dtype: str = "bf16"):
    """Mixed precision: the module runs under autocast in ``dtype`` ('bf16' or 'fp16', which adds dynamic loss
    scaling: autopar.precision.grad_scaler) with fp32 master weights. Returns (model, optimizer, criterion);
    the optimizer is rebound to the parallel parameters when the model materializes."""
    if dtype not in ("bf16", "fp16"):
        raise ExplicitParallelError(f"convert_to_amp dtype={dtype!r}: use 'bf16' or 'fp16'")
    m = _wrap(model)
    if m.spec.precision not in (None, dtype):
        raise ExplicitParallelError(f"convert_to_amp asks for {dtype} but the model is converted to "
                                    f"{m.spec.precision} already")
    m.spec.precision = dtype
    if optimizer is not None:
        _register(m, optimizer)
    return m, optimizer, criterion


def ZeroOptimizer(optimizer: torch.optim.Optimizer, model: nn.Module, *, stage: int = 1
                  ) -> torch.optim.Optimizer:
    """ZeRO ``stage`` 1 (optimizer states sharded over each parameter's replicated mesh dims) or 2 (gradients
    too) as a plan constraint. Returns an optimizer of ``type(optimizer)`` (an ``autopar.zero.ZeroOptimizer``
    too) with its hyper-parameters, which steps the shards once the model materializes."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"ZeroOptimizer(optimizer, model): optimizer must be a torch optimizer, got "
                          f"{type(optimizer).__name__}")
    if stage not in (1, 2):
        raise ExplicitParallelError(f"ZeroOptimizer stage={stage!r}: 1 or 2 (ZeRO-3 is parameters sharded: "
                                    f"fix={{'param:*': ...}} on autopar.plan)")
    m = _wrap(model)
    if m.spec.zero not in (None, stage):
        raise ExplicitParallelError(f"ZeroOptimizer stage {stage} conflicts with stage {m.spec.zero} given before")
    if optimizer.state:
        raise ExplicitParallelError("ZeroOptimizer takes an optimizer that has not stepped yet (its state is not "
                                    "empty)")
    m.spec.zero = stage
    if m._optimizers and optimizer in m._optimizers:
        m._optimizers.remove(optimizer)
    cls = zero_rt.ZeroOptimizer.for_class(type(optimizer))
    new = object.__new__(cls)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
              for g in optimizer.param_groups]
    torch.optim.Optimizer.__init__(new, groups, dict(optimizer.defaults))
    new.__dict__["_explicit_defaults"] = dict(optimizer.defaults)
    _register(m, new)
    return new


def _register(m: ExplicitParallel, opt: torch.optim.Optimizer) -> None:
    if opt not in m._optimizers:
        m._optimizers.append(opt)


# ------------------------------------------------------------------------- optimizers made before the plan

_REPLACED: dict[int, tuple[weakref.ref, weakref.ref | None]] = {}   # id(old) -> (old, its parallel successor)
_HOOK: list = []


def _rebind(opt: torch.optim.Optimizer) -> None:
    """Point ``opt``'s parameter groups at the parallel parameters of the tensors the plan replaced."""
    for group in opt.param_groups:
        ps = []
        for p in group["params"]:
            hit = _REPLACED.get(id(p))
            if hit is not None and hit[0]() is p:
                if p in opt.state:
                    raise ExplicitParallelError("an optimizer stepped before the model was planned holds state for "
                                                "the replaced parameters; build it before stepping")
                if hit[1] is None:
                    continue   # not on this rank (another pipeline stage's)
                p = hit[1]()
                if p is None:
                    raise ExplicitParallelError("this optimizer holds parameters of a parallel model that no longer "
                                                "exists; build the optimizer over the live model's parameters")
            ps.append(p)
        group["params"] = ps


def _install_rebind_hook() -> None:
    if _HOOK:
        return
    def hook(opt, args, kwargs):
        if any(id(p) in _REPLACED for g in opt.param_groups for p in g["params"]):
            _rebind(opt)
    _HOOK.append(register_optimizer_step_pre_hook(hook))


def _rebuild_zero(opt, pm: nn.Module) -> None:
    """Initialize a ZeroOptimizer made before the plan, now over the parallel module."""
    if getattr(pm, "zero", None) is None:
        raise ExplicitParallelError("ZeroOptimizer needs a non-pipelined plan (pipeline stages do not take ZeRO yet)")
    _rebind(opt)
    groups = [dict(g) for g in opt.param_groups]
    defaults = opt.__dict__.pop("_explicit_defaults")
    algo = type(opt)._algorithm_class
    accepted = inspect.signature(algo.__init__).parameters
    kw = {k: v for k, v in defaults.items() if k in accepted and k != "params"}
    zero_rt.ZeroOptimizer.__init__(opt, pm, algo, params=groups, **kw)


# ------------------------------------------------------------------------------------------- compare

def mode_constraints(model: nn.Module, mode: str, n_devices: int, *, data_parallel: int = 1,
                     zero: int | None = None, precision: str | None = None):
    """An ExplicitParallel of ``model`` for one explicit mode ('DP', '1D', '2D', '2.5D', '3D'), for planning
    without a process group (``plan_options``). ``data_parallel``: devices of a dp dim beside tensor
    parallelism."""
    m = ExplicitParallel(model)
    if mode == "DP":
        m.spec.add(_DimClaim("dp", ("dp",), n_devices))
    else:
        tp = n_devices // data_parallel
        if data_parallel > 1:
            m.spec.add(_DimClaim("dp", ("dp",), data_parallel))
        m.spec.add(_DimClaim("tp", TP_DIMS[mode], tp, mode))
        tp_sizes(mode, tp)
    m.spec.zero, m.spec.precision = zero, precision
    return m


def compare_modes(model: nn.Module, example_inputs, n_devices: int, *, cluster="h100-sxm",
                  modes: Iterable[str] = ("DP", "1D", "2D", "2.5D", "3D"), free=None, free_on_mode_mesh: bool = False,
                  **plan_options) -> list[dict]:
    """Plan ``model`` on ``n_devices`` under each explicit mode (DP alone, or tensor parallelism alone) and
    freely; one row per plan: mode, mesh, predicted step time, comm and peak memory, and the plan, or the
    error that rules the mode out. ``free``: the solver's own plan if made already (else solved here on a 1-D
    mesh of the devices); ``free_on_mode_mesh``: also solve freely on each mode's own mesh (the row's
    ``free_on_mesh_*`` fields); ``plan_options`` (e.g. ``memory_budget``) apply to every plan."""
    rows = []
    for mode in modes:
        row = {"mode": mode}
        try:
            m = mode_constraints(model, mode, n_devices)
            shape, names, opts = m.plan_options(example_inputs, n_devices, **plan_options)
            p = autopar_plan(model, example_inputs, mesh_shape=shape, mesh_dim_names=names, cluster=cluster,
                             options=opts)
            row.update(_row(p, shape, names))
        except AutoparError as e:
            row.update(mesh=None, error=f"{type(e).__name__}: {e}")
        if free_on_mode_mesh and "error" not in row:   # the solver unconstrained on the same mesh
            try:
                f = autopar_plan(model, example_inputs, mesh_shape=shape, mesh_dim_names=names, cluster=cluster,
                                 **plan_options)
                row.update(free_on_mesh_step_time_s=f.predicted.step_time_s,
                           free_on_mesh_peak_memory_bytes=f.predicted.peak_memory_bytes)
            except AutoparError as e:
                row.update(free_on_mesh_error=f"{type(e).__name__}: {e}")
        rows.append(row)
    if free is None:
        free = autopar_plan(model, example_inputs, mesh_shape=(n_devices,), mesh_dim_names=("d",), cluster=cluster,
                            **plan_options)
    rows.append({"mode": "free", **_row(free, tuple(free.mesh.shape), tuple(free.mesh.dim_names))})
    return rows


def _row(p, shape, names) -> dict:
    return {"mesh": "x".join(f"{n}={s}" for n, s in zip(names, shape)), "step_time_s": p.predicted.step_time_s,
            "peak_memory_bytes": p.predicted.peak_memory_bytes, "comm_s": p.predicted.time_breakdown.get("comm_s"),
            "plan": p}

