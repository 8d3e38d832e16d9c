"""ParallelModule: the module ``autopar.apply`` returns.

It owns the original module's children (so parameter FQNs are unchanged; parameters are DTensors
with the plan's placements) and runs the rewritten graph on local shards. By default it takes the
same global inputs as the original on every rank and returns the same (replicated) outputs;
``input_mode="local"`` takes each rank's input shard instead (for efficient data loading).
This module imports autopar's core only; the graph it runs is built by codegen.

Gradients. The graph takes each DTensor parameter's local tensor directly (not through
``to_local()``, whose autograd node and DTensor-typed gradient accumulation appeared per parameter
and step in profiles of the data-parallel benchmark): the local tensor is made a leaf that requires grad, autograd accumulates
plain local gradients into it, and a post-accumulate hook publishes them as ``param.grad``, a
DTensor with the parameter's spec sharing the local gradient's storage. Before each forward the
local gradients are re-synchronized with ``param.grad`` (``zero_grad(set_to_none=True)`` sets it to
None; a gradient assigned by the user is adopted), so accumulation, zeroing and optimizers behave
exactly as with ``to_local()``. Gradients the bucketed reducer sums (``autopar.runtime.grad_sync``) are
published by the reducer instead, once they are views of its bucket. A ZeRO-2 parameter's gradient is
reduce-scattered by ``autopar.runtime.zero`` into ``param.grad`` (this rank's shard, a DTensor with the
gradient-sharding placements and the global shape); its local leaf's ``.grad`` stays None between backward calls.
"""
from __future__ import annotations

import functools

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from autopar.core.capture import CapturedModel, bind_inputs, forward_signature
from autopar.core.errors import ConfigError, PlanMismatchError
from autopar.core.options import ApplyOptions
from autopar.core.plan import Plan
from autopar.ops.collectives import to_local_input
from autopar.ops.parallel_ops import local_chunk, local_shape, placements
from autopar.runtime.grad_sync import GradReducer
from autopar.runtime.precision import check_precision, compute_dtype
from autopar.runtime.zero import ZeroShards


class ParallelModule(nn.Module):
    def __init__(self, model: nn.Module, gm: fx.GraphModule, cap: CapturedModel, plan: Plan, mesh: DeviceMesh,
                 input_shardings: dict[str, str], buffer_shardings: dict[str, str], input_mode: str = "global"):
        super().__init__()
        ApplyOptions(input_mode=input_mode)   # validated in one place (autopar.core.options)
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        gm.mesh = mesh
        check_precision(plan.precision)             # a bad precision field fails here, naming the field
        self.__dict__["_compute_dtype"] = compute_dtype(plan)
        self.__dict__["graph_module"] = gm          # not a submodule: keeps FQNs those of the model
        self.__dict__["plan"] = plan
        self.__dict__["mesh"] = mesh
        self.__dict__["_signature"] = forward_signature(model)   # a call is bound to it (capture.bind_inputs)
        # non-tensor inputs (flags such as use_cache) were baked into the graph when it was captured
        self.__dict__["_planned_values"] = {k: v for k, v in bind_inputs(self._signature, cap.args, cap.kwargs).items()
                                            if not isinstance(v, torch.Tensor)}
        self.__dict__["_out_spec"] = cap.program.call_spec.out_spec
        self.input_mode = input_mode
        order = []   # (kind, name) per placeholder of the rewritten graph
        for n in gm.graph.nodes:
            if n.op != "placeholder":
                continue
            if n.name in cap.param_fqns:
                order.append(("param", cap.param_fqns[n.name][0]))
            elif n.name in cap.buffer_fqns:
                order.append(("buffer", cap.buffer_fqns[n.name]))
            elif n.name in cap.constant_fqns:
                order.append(("constant", cap.constant_fqns[n.name]))
            else:
                order.append(("input", n.name))
        self._order = order
        # tensors the model makes in forward from constants (torch.tensor(...)), lifted by torch.export
        constants = {}
        for kind, name in order:
            if kind == "constant":
                c = cap.program.constants[name]
                if c.device.type == "meta":
                    raise ConfigError(f"the model's forward makes the constant tensor {name!r}, which was captured on "
                                      f"the meta device; capture (plan) the model on a real device to apply it")
                constants[name] = local_chunk(c.to(mesh.device_type), buffer_shardings[name], mesh)
        self.__dict__["_constants"] = constants
        self._inputs = {i.arg or i.name: i for i in cap.user_inputs}          # forward() argument -> spec
        self._arg_of = {i.name: i.arg or i.name for i in cap.user_inputs}    # placeholder -> argument
        self._input_shardings = input_shardings
        self._buffer_shardings = buffer_shardings
        deferred = gm.meta.get("autopar_deferred_grads", {})
        position = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        node = {n.name: n for n in gm.graph.nodes}
        # gradients become ready in reverse order of a parameter's last use in forward
        ready_order = sorted(deferred, key=lambda name: -max((position[u.name] for u in node[name].users), default=0))
        self.__dict__["_leaves"] = {}   # FQN -> (param, its local tensor as a grad-requiring leaf)
        self.__dict__["_owners"] = {}   # FQN -> (module holding the parameter, attribute name)
        # ZeRO-2 parameters reduce-scatter their own gradients (autopar.zero); the reducer all-reduces the rest
        fqn_of = {name: cap.param_fqns[name][0] for name in deferred}
        reduced = [(fqn_of[name], deferred[name]) for name in ready_order
                   if fqn_of[name] not in plan.gradient_sharding]
        self.__dict__["_reduced"] = {fqn for fqn, _ in reduced}   # their gradients are published by the reducer
        # ZeRO-2: param.grad is this rank's reduced shard, put there by autopar.zero's hook (not published, not adopted)
        self.__dict__["_zero2"] = set(plan.gradient_sharding)
        for kind, name in order:
            if kind == "param":
                self._leaf(name)
        params = [(self._leaf(fqn), dims, self._publisher(fqn)) for fqn, dims in reduced]
        self.__dict__["grad_reducer"] = GradReducer(params, mesh) if params else None
        self.__dict__["zero"] = ZeroShards(self, plan, mesh, {fqn_of[n]: d for n, d in deferred.items()}) \
            if plan.optimizer_sharding else None

    def _leaf(self, fqn: str) -> torch.Tensor:
        """The local tensor the graph takes for parameter ``fqn`` (set up once per local tensor)."""
        owner = self._owners.get(fqn)
        if owner is None:                      # resolve the FQN's module once; a replaced parameter is still seen
            mod, _, attr = fqn.rpartition(".")
            owner = self._owners[fqn] = (self.get_submodule(mod), attr)
        p = owner[0]._parameters.get(owner[1])
        if p is None:
            p = self.get_parameter(fqn)        # raises the usual error, naming the parameter
        local = getattr(p, "_local_tensor", None)
        if local is None:                      # a plain tensor parameter (not sharded by autopar)
            return p
        entry = self._leaves.get(fqn)
        if entry is not None and entry[0] is p and entry[1] is local:
            return local
        if p.requires_grad:
            local.requires_grad_(True)
            if fqn in self._zero2:             # autopar.zero reduce-scatters it into p.grad
                pass
            elif fqn not in self._reduced:     # the reducer publishes once the gradient is in its bucket
                local.register_post_accumulate_grad_hook(functools.partial(_publish_grad, p))
            elif entry is not None and self.__dict__.get("grad_reducer") is not None:   # a replaced parameter
                self.grad_reducer.replace(entry[1], local, functools.partial(_publish_grad, p))
        zero = self.__dict__.get("zero")
        if entry is not None and zero is not None and zero.key(fqn) is not None:   # a replaced ZeRO parameter
            zero.attach(fqn, p, local)
        self._leaves[fqn] = (p, local)
        return local

    def _publisher(self, fqn: str):
        """What the reducer calls once the local gradient of ``fqn`` sits in its bucket (None: plain parameter)."""
        entry = self._leaves.get(fqn)
        return None if entry is None else functools.partial(_publish_grad, entry[0])

    def extra_repr(self) -> str:
        return f"mesh={tuple(self.mesh.shape)}, input_mode={self.input_mode!r}"

    def _bind(self, args, kwargs) -> dict[str, torch.Tensor]:
        try:
            if self._signature is not None:
                self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise PlanMismatchError(f"inputs do not fit the model's forward: {e}") from None
        named = bind_inputs(self._signature, args, kwargs)
        given = {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}
        for k, v in named.items():
            if isinstance(v, torch.Tensor):
                continue
            param = self._signature.parameters.get(k) if self._signature is not None else None
            default = param.default if param is not None and param.default is not param.empty else None
            planned = self._planned_values.get(k, default)
            if not _same_value(v, planned):
                raise PlanMismatchError(f"input {k!r} is {v!r} but the model was captured with {planned!r} (a "
                                        f"non-tensor input is part of the planned graph); re-plan with this value")
        unplanned = [k for k in given if k not in self._inputs]
        if unplanned:
            raise PlanMismatchError(f"input {unplanned[0]!r} was not given when the model was planned; "
                                    f"planned inputs: {sorted(self._inputs)}")
        for name, spec in self._inputs.items():
            if name not in given:
                raise PlanMismatchError(f"input {name!r} was planned but not given")
            x = given[name]
            want = list(spec.shape)
            have = list(x.shape)
            if self.input_mode == "local":
                want = _local(want, self._input_shardings[spec.name], tuple(self.mesh.shape))
            if have != want:
                raise PlanMismatchError(
                    f"input {name!r} has shape {have} but the plan was made for {want} ({self.input_mode} shape); "
                    f"shapes are static: re-plan for this shape (dynamic batch is not supported)")
        return given

    def forward(self, *args, **kwargs):
        given = self._bind(args, kwargs)
        grad = torch.is_grad_enabled()
        flat = []
        for kind, name in self._order:
            if kind == "param":
                local = self._leaf(name)
                if grad and local.requires_grad and name not in self._zero2:
                    _adopt_grad(self._leaves[name][0], local)
                flat.append(local)
            elif kind == "buffer":
                flat.append(local_chunk(self.get_buffer(name), self._buffer_shardings[name], self.mesh))
            elif kind == "constant":
                flat.append(self._constants[name])
            else:
                x = given[self._arg_of[name]]
                # global inputs: this rank's block; the backward gathers an input's gradient in full, as on one device
                flat.append(x if self.input_mode == "local" else
                            to_local_input(x, placements(self._input_shardings[name]), self.mesh))
        if self.grad_reducer is not None and grad:
            self.grad_reducer.prepare()
        if self._compute_dtype == torch.float32:
            out = self.graph_module(*flat)
        else:                                       # the plan's compute dtype, fp32 master weights
            with torch.autocast(device_type=self.mesh.device_type, dtype=self._compute_dtype):
                out = self.graph_module(*flat)
        return pytree.tree_unflatten(list(out), self._out_spec)

    def code(self) -> str:
        """The rewritten module's Python source."""
        return self.graph_module.code


def _same_value(a, b) -> bool:
    try:
        return bool(a == b) if type(a) is type(b) else (a is None and b is None)
    except Exception:   # values without a plain equality: only the same object counts
        return a is b


def _adopt_grad(p: torch.Tensor, local: torch.Tensor) -> None:
    """Make the local leaf's ``.grad`` the local tensor of ``p.grad`` (None when the user cleared it)."""
    g = p.grad
    want = None if g is None else getattr(g, "_local_tensor", g)
    if local.grad is not want:
        local.grad = want


def _publish_grad(p: torch.Tensor, local: torch.Tensor) -> None:
    """Post-accumulate hook of a local leaf: ``p.grad`` is a DTensor view of the local gradient."""
    g = local.grad
    held = p.grad
    if held is None or held._local_tensor is not g:
        p.grad = DTensor(g, p._spec, requires_grad=False)


def _local(shape: list[int], sharding: str, mesh_shape: tuple[int, ...]) -> list[int]:
    return local_shape(tuple(shape), sharding, mesh_shape)
