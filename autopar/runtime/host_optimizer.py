"""Optimizer offload (ZeRO-Offload style): optimizer states, fp32 master weights and the step on the host CPU.

``HostOptimizer(params, torch.optim.AdamW, lr=...)`` wraps any standard torch optimizer. It keeps an
fp32 host copy ("master") of each parameter's local tensor (a DTensor parameter's shard) and builds
the torch optimizer over the masters, so the optimizer's states are created on the host. ``step()``
copies each gradient's local tensor down to the host, runs the torch optimizer there, and copies
the updated masters back into the device parameters. ``zero_grad``, ``state_dict`` and
``load_state_dict`` act on the device gradients and the inner optimizer (whose state dict has the
same layout as a device optimizer's, by parameter index); an LR scheduler takes ``.optimizer``.
``make_optimizer(module, cls, **kw)`` returns a HostOptimizer when the module's plan says
``optimizer_offload`` and ``cls(module.parameters(), **kw)`` otherwise.

Host memory: on CUDA pinned CPU tensors, copied with ``non_blocking`` and one synchronize before the
CPU step. On CPU the host copies are other CPU tensors made inside ``autopar.memory.host_allocations()``
so that ``autopar.memory`` counts them (and the optimizer states) as host, not device (the same
convention as ``codegen.offload_activations``). Gradient copies are serial with the step (not
overlapped with backward); the planner's cost (solver/offload.py) models it that way. Must not be
imported by the solver or codegen.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from autopar.core.errors import ConfigError
from autopar.runtime import memory, zero

__all__ = ["HostOptimizer", "make_optimizer"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise)."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


class HostOptimizer(torch.optim.Optimizer):
    """A torch optimizer run on host (CPU) copies of the parameters; see the module docstring.

    A ``torch.optim.Optimizer`` itself (LR schedulers, ``isinstance`` checks and MemTracker take it): its
    ``param_groups``, ``defaults`` and ``state`` are the inner optimizer's, over the host masters."""

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict], optimizer_cls: type = torch.optim.AdamW,
                 **kwargs) -> None:
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise ConfigError(f"HostOptimizer(params, optimizer_cls): optimizer_cls must be a torch.optim.Optimizer "
                              f"class such as torch.optim.AdamW, got {optimizer_cls!r}")
        groups = list(params)
        if not groups:
            raise ConfigError("HostOptimizer got an empty parameter list; pass module.parameters()")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []   # (device parameter, host master)
        host_groups = []
        for g in groups:
            if not isinstance(g, dict) or "params" not in g:
                raise ConfigError("HostOptimizer: parameter groups are dicts with a 'params' list, as in torch.optim")
            masters = []
            for p in g["params"]:
                if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                    raise ConfigError(f"HostOptimizer: expected floating-point parameters, got {type(p).__name__}")
                m = self._to_host(_local(p).detach(), torch.float32)
                m.requires_grad_(True)
                self.pairs.append((p, m))
                masters.append(m)
            host_groups.append({**g, "params": masters})
        with memory.host_allocations():
            self.optimizer = optimizer_cls(host_groups, **kwargs)
        super().__init__(host_groups, dict(self.optimizer.defaults))   # torch's step hooks and bookkeeping
        self._share()

    def _share(self) -> None:
        """One set of groups and states: the inner optimizer's (schedulers change its lr)."""
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    @staticmethod
    def _to_host(t: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        cuda = t.device.type == "cuda"
        with memory.host_allocations():
            if out is None:
                out = torch.empty(t.shape, dtype=dtype, device="cpu", pin_memory=cuda)
            out.copy_(t, non_blocking=cuda)
        return out

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """Gradients down, the torch optimizer's step on the host, parameters up."""
        if closure is not None:
            raise ConfigError("HostOptimizer.step does not take a closure (the step runs on host copies); call "
                              "forward/backward before step()")
        any_cuda = False
        for p, m in self.pairs:
            if p.grad is None:
                m.grad = None
                continue
            g = _local(p.grad)
            any_cuda |= g.device.type == "cuda"
            m.grad = self._to_host(g, torch.float32, m.grad)
        if any_cuda:
            torch.cuda.synchronize()   # the non_blocking copies into pinned memory are done
        with memory.host_allocations():
            self.optimizer.step()
        for p, m in self.pairs:
            if m.grad is not None:
                dst = _local(p)
                dst.copy_(m, non_blocking=dst.device.type == "cuda")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _ in self.pairs:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        with memory.host_allocations():
            self.optimizer.load_state_dict(state_dict)
        self._share()

    def host_tensors(self) -> list[torch.Tensor]:
        """Every host tensor this optimizer holds: masters, their gradient copies, optimizer states."""
        out = []
        for _, m in self.pairs:
            out.append(m)
            if m.grad is not None:
                out.append(m.grad)
        for st in self.optimizer.state.values():
            out += [v for v in st.values() if isinstance(v, torch.Tensor)]
        return out

    def __repr__(self) -> str:
        return f"HostOptimizer({type(self.optimizer).__name__}, {len(self.pairs)} parameters on the host)"


def make_optimizer(module: nn.Module, optimizer_cls: type = torch.optim.AdamW, **kwargs):
    """The optimizer the module's plan asks for: a HostOptimizer where ``plan.optimizer_offload`` is set,
    autopar.zero's ZeroOptimizer where it shards optimizer states (ZeRO-1/2: an ``optimizer_cls`` instance
    too, over the module's parameters), else ``optimizer_cls(module.parameters(), **kwargs)`` (also for a
    module without a plan)."""
    plan = getattr(module, "plan", None)
    if plan is not None and getattr(plan, "optimizer_offload", False):
        if getattr(plan, "optimizer_sharding", None):
            raise ConfigError("the plan both shards optimizer states (ZeRO-1/2) and moves them to the host; the "
                              "planner never chooses both: re-plan, or edit one of optimizer_sharding / "
                              "optimizer_offload out of the plan")
        return HostOptimizer(module.parameters(), optimizer_cls, **kwargs)
    return zero.optimizer(module, optimizer_cls, **kwargs)
