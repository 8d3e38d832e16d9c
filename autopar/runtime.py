"""ParallelModule: the module ``autopar.apply`` returns.

It owns the original module's children (so parameter FQNs are unchanged; parameters are DTensors
with the plan's placements) and runs the rewritten graph on local shards. By default it takes the
same global inputs as the original on every rank and returns the same (replicated) outputs;
``input_mode="local"`` takes each rank's input shard instead (for efficient data loading).
This module imports autopar's core only; the graph it runs is built by codegen.
"""
from __future__ import annotations

import inspect

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh

from autopar.capture import CapturedModel
from autopar.errors import ConfigError, PlanMismatchError
from autopar.grad_sync import GradReducer
from autopar.collectives import to_local_input
from autopar.parallel_ops import local_chunk, placements
from autopar.plan import Plan


class ParallelModule(nn.Module):
    def __init__(self, model: nn.Module, gm: fx.GraphModule, cap: CapturedModel, plan: Plan, mesh: DeviceMesh,
                 input_shardings: dict[str, str], buffer_shardings: dict[str, str], input_mode: str = "global"):
        super().__init__()
        if input_mode not in ("global", "local"):
            raise ConfigError(f"input_mode must be 'global' or 'local', got {input_mode!r}")
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
        gm.mesh = mesh
        self.__dict__["graph_module"] = gm          # not a submodule: keeps FQNs those of the model
        self.__dict__["plan"] = plan
        self.__dict__["mesh"] = mesh
        self.__dict__["_signature"] = inspect.signature(model.forward)
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
            else:
                order.append(("input", n.name))
        self._order = order
        self._inputs = {i.arg or i.name: i for i in cap.user_inputs}          # forward() argument -> spec
        self._arg_of = {i.name: i.arg or i.name for i in cap.user_inputs}    # placeholder -> argument
        self._input_shardings = input_shardings
        self._buffer_shardings = buffer_shardings
        deferred = gm.meta.get("autopar_deferred_grads", {})
        position = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        node = {n.name: n for n in gm.graph.nodes}
        # gradients become ready in reverse order of a parameter's last use in forward
        ready_order = sorted(deferred, key=lambda name: -max((position[u.name] for u in node[name].users), default=0))
        params = [(self.get_parameter(cap.param_fqns[name][0]), deferred[name]) for name in ready_order]
        self.__dict__["grad_reducer"] = GradReducer(params, mesh) if params else None

    def extra_repr(self) -> str:
        return f"mesh={tuple(self.mesh.shape)}, input_mode={self.input_mode!r}"

    def _bind(self, args, kwargs) -> dict[str, torch.Tensor]:
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise PlanMismatchError(f"inputs do not fit the model's forward: {e}") from None
        given = {k: v for k, v in bound.arguments.items() if v is not None}
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
        if self.grad_reducer is not None and torch.is_grad_enabled():
            self.grad_reducer.prepare()
        flat = []
        for kind, name in self._order:
            if kind == "param":
                p = self.get_parameter(name)
                flat.append(p.to_local() if hasattr(p, "to_local") else p)
            elif kind == "buffer":
                flat.append(local_chunk(self.get_buffer(name), self._buffer_shardings[name], self.mesh))
            else:
                x = given[self._arg_of[name]]
                # global inputs: this rank's block; the backward gathers an input's gradient in full, as on one device
                flat.append(x if self.input_mode == "local" else
                            to_local_input(x, placements(self._input_shardings[name]), self.mesh))
        out = self.graph_module(*flat)
        return pytree.tree_unflatten(list(out), self._out_spec)

    def code(self) -> str:
        """The rewritten module's Python source."""
        return self.graph_module.code


def _local(shape: list[int], sharding: str, mesh_shape: tuple[int, ...]) -> list[int]:
    from autopar.parallel_ops import local_shape
    return local_shape(tuple(shape), sharding, mesh_shape)
