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
ends compose by wrapping: ``DataParallel(TensorParallel(model, "1D", size=2))``. The tensor-parallel
layouts (which linears are column / row, the placements of each mode) are ``autopar.frontend.tp_layouts``.

Optimizers. A torch optimizer built over the model's parameters before the plan is made is rebound to the
parallel parameters when it first steps (a global optimizer step pre-hook; one with state is refused), or at
once when it went through ``convert_to_amp``. ``ZeroOptimizer(optimizer, model)`` returns a new optimizer of
the same class that is also an ``autopar.zero.ZeroOptimizer``, initialized over the parallel module (with the
given optimizer's hyper-parameters and parameter groups) when the model materializes. Imports autopar's core,
runtime and frontend.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.optim.optimizer import register_optimizer_step_pre_hook

from autopar.core.errors import AutoparError, ConfigError, MeshError
from autopar.core.graph import index_graph
from autopar.core.mesh import PP_DIM
from autopar.core.options import PipelineOptions, PlanOptions
from autopar.frontend.applying import parallelize
from autopar.frontend.planning import capture_exact
from autopar.frontend.planning import plan as autopar_plan
from autopar.frontend.tp_layouts import (
    MODES,
    TP_DIMS,
    BlockRoles,
    ExplicitParallelError,
    block_roles,
    check_divisible,
    literal,
    propagate,
    tp_input_placements,
    tp_layout,
    tp_sizes,
    unliteral,
)
from autopar.runtime import zero as zero_rt
from autopar.runtime.pipeline import forward_backward

__all__ = ["MODES", "TP_DIMS", "BlockRoles", "DataParallel", "ExplicitParallel", "ExplicitParallelError",
           "PipelineParallel", "TensorParallel", "ZeroOptimizer", "block_roles", "compare_modes", "convert_to_amp",
           "mode_constraints", "tp_layout", "tp_sizes"]


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
        keys = [unliteral(k) for k in fix]
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
            sizes = tuple(dims[n] for n in tp.names)
            layout = tp_layout(tp.mode, roles, gi, sizes)
            check_divisible(tp.mode, sizes, layout, roles, gi)
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
            fix[literal(key)] = tuple(full[n] for n in names)
        inputs = tuple(per_kind["input"][n] for n in names) if all(n in per_kind["input"] for n in names) else None
        params = tuple(per_kind["param"].get(n, "R") for n in names)
        if tp is not None:
            fix.update(propagate(gi, fix, inputs, params, shape))
        if inputs is not None:
            fix["input:*"] = inputs
        pinned = {unliteral(k) for k in fix}
        if any(g.kind == "param" and g.key not in pinned for g in gi.nodes.values()):
            fix["param:*"] = params   # the rest (every parameter the layout leaves open)
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

