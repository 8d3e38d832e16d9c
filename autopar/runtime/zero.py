"""ZeRO-1 and ZeRO-2 at run time: optimizer states (and gradients) sharded over data-parallel mesh dims.

A plan's ``optimizer_sharding`` (FQN -> placements, from ``placement.zero_sharding``) names the
parameters whose optimizer states are sharded (ZeRO-1); ``gradient_sharding`` those whose gradients
are sharded too (ZeRO-2). Parameters themselves keep the plan's placements (``param_placements``:
ZeRO-3 is parameters sharded there) and their FQNs. Semantics as DeepSpeed / FSDP:

- ZeRO-1: gradients are all-reduced as without ZeRO (``autopar.runtime.grad_sync``); each rank steps only its
  shard of the parameter (a view of the parameter's local tensor: no second copy of the weights) with
  its shard of the optimizer state, then the parameter is all-gathered.
- ZeRO-2: each gradient is reduce-scattered as soon as it is accumulated in backward (a
  post-accumulate hook; the full gradient is freed), the shard is accumulated across backward calls,
  the step runs on the shard, the parameter is all-gathered.

Every collective is a DTensor ``redistribute`` (Partial -> Shard is torch's reduce-scatter, Shard ->
Replicate its all-gather). :class:`ZeroShards` lives on the ParallelModule (``module.zero``); the
optimizer a user builds with :func:`optimizer` steps the shards. Imports autopar's core only.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial
from torch.optim.optimizer import register_optimizer_step_pre_hook

from autopar.core.errors import ConfigError, PlanMismatchError
from autopar.core.placement import Sharding, parse_sharding, zero_sharding

__all__ = ["ZeroShards", "ZeroOptimizer", "optimizer"]


class ZeroShards:
    """The ZeRO-sharded view of every parameter the plan names: ``shards[fqn]`` is a leaf DTensor with
    the ZeRO placements whose local tensor is a view of the parameter's local tensor (stepping it
    updates this rank's part of the parameter in place). For ZeRO-2 parameters it also installs the
    hook that reduce-scatters each accumulated gradient into ``shards[fqn].grad``."""

    def __init__(self, module: nn.Module, plan, mesh: DeviceMesh, partial_dims: dict[str, tuple[int, ...]]):
        self.mesh = mesh
        self.params: dict[str, nn.Parameter] = {}
        self.shards: dict[str, torch.Tensor] = {}
        self.stage: dict[str, int] = {}
        seen: set[int] = set()
        for fqn, p in module.named_parameters():
            if fqn not in plan.optimizer_sharding or id(p) in seen:
                continue
            seen.add(id(p))
            want = parse_sharding(list(plan.optimizer_sharding[fqn]), field=f"plan.optimizer_sharding[{fqn!r}]")
            if not isinstance(p, DTensor) or want != zero_sharding(p.shape, tuple(p.placements), mesh.shape):
                raise PlanMismatchError(
                    f"plan.optimizer_sharding[{fqn!r}] = {list(plan.optimizer_sharding[fqn])} is not the ZeRO "
                    f"sharding of parameter placements {list(plan.param_placements.get(fqn, ()))} on mesh "
                    f"{tuple(mesh.shape)}; re-plan with autopar.plan (the planner writes this field)")
            self.params[fqn] = p
            self.shards[fqn] = self._make_shard(p, want)
            self.stage[fqn] = 2 if fqn in plan.gradient_sharding else 1
        self._hooks = [_register_refusal(self)] if self.params else []
        self._ids = {id(p) for p in self.params.values()}
        self.inner: torch.optim.Optimizer | None = None
        for fqn, stage in self.stage.items():
            if stage == 2:
                p = self.params[fqn]
                arriving = tuple(Partial("sum") if i in partial_dims.get(fqn, ()) else q
                                 for i, q in enumerate(p.placements))
                self._hooks.append(p._local_tensor.register_post_accumulate_grad_hook(
                    functools.partial(self._reduce_scatter, fqn, arriving)))

    def _make_shard(self, p: DTensor, sharding: Sharding) -> torch.Tensor:
        view = p._local_tensor.detach()
        coord = self.mesh.get_coordinate()
        for i, (old, new) in enumerate(zip(p.placements, sharding)):
            if new != old:   # a ZeRO dim: this rank's chunk of the tensor dim it shards
                view = view.chunk(self.mesh.shape[i], dim=new.dim)[coord[i]]
        return DTensor.from_local(view, self.mesh, sharding, shape=p.shape, stride=p.stride(), run_check=False)

    def _refuse_plain_optimizer(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        """A torch optimizer stepping ZeRO parameters directly would miss the ZeRO-2 gradients (held by the
        shards) and keep whole optimizer states: refuse it, saying what to use."""
        if opt is self.inner:
            return
        if any(id(p) in self._ids for g in opt.param_groups for p in g["params"]):
            raise ConfigError(f"this module's plan shards optimizer states (ZeRO, plan.optimizer_sharding: "
                              f"{len(self.params)} parameters); build its optimizer with "
                              f"autopar.zero.optimizer(module, {type(opt).__name__}, ...) instead of "
                              f"{type(opt).__name__}(module.parameters()), or plan with zero=0")

    def _reduce_scatter(self, fqn: str, arriving: Sharding, local: torch.Tensor) -> None:
        """Post-accumulate hook of a ZeRO-2 parameter's local leaf: its (partial) gradient becomes this
        rank's reduced shard, added to the shard gradient held so far; the full gradient is dropped."""
        from autopar.runtime import memory

        g = local.grad
        shard = self.shards[fqn]
        part = DTensor.from_local(g, self.mesh, arriving, shape=shard.shape, stride=shard.stride(),
                                  run_check=False).redistribute(self.mesh, shard.placements)
        if shard.grad is None:
            shard.grad = part
        else:
            shard.grad._local_tensor.add_(part._local_tensor)
        memory.as_gradient(shard.grad)
        local.grad = None
        self.params[fqn].grad = None

    def shard_grads_from_params(self) -> None:
        """ZeRO-1: each shard's gradient is its chunk of the parameter's reduced gradient (a view: no copy)."""
        for fqn, stage in self.stage.items():
            if stage == 1:
                g = self.params[fqn].grad
                self.shards[fqn].grad = None if g is None else self._make_shard(g, self.shards[fqn].placements)

    @torch.no_grad()
    def gather_params(self) -> None:
        """After a step on the shards: every rank's parameter gets the others' updated parts (all-gather)."""
        for fqn, shard in self.shards.items():
            p = self.params[fqn]
            p._local_tensor.copy_(shard.redistribute(self.mesh, p.placements)._local_tensor)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _register_refusal(zero: ZeroShards):
    """A global optimizer pre-hook calling ``zero._refuse_plain_optimizer`` while ``zero`` lives (a weak
    reference: the hook must not keep a module alive; once it is gone the hook does nothing -- it cannot
    remove itself while torch iterates the hooks -- until ``ZeroShards.remove``)."""
    ref = weakref.WeakMethod(zero._refuse_plain_optimizer)

    def hook(opt, args, kwargs):
        method = ref()
        if method is not None:
            method(opt, args, kwargs)

    return register_optimizer_step_pre_hook(hook)


class ZeroOptimizer:
    """A torch optimizer over the ZeRO shards (and the other parameters as they are). ``step()`` takes
    ZeRO-1 gradients' shards, steps the inner optimizer, all-gathers the stepped parameters.
    ``param_groups`` and ``state`` are the inner optimizer's (LR schedules work on them);
    ``optimizer`` is the inner one (e.g. for ``autopar.memory.track(module, opt.optimizer)``)."""

    def __init__(self, module: nn.Module, optimizer_class: Callable[..., torch.optim.Optimizer], **kwargs):
        zero: ZeroShards | None = getattr(module, "zero", None)
        if zero is None:
            raise ConfigError("autopar.optimizer(module, ...): module is not an autopar ParallelModule with ZeRO "
                              "shards; build it with autopar.apply / autopar.parallelize")
        self.zero = zero
        by_id = {id(p): fqn for fqn, p in zero.params.items()}
        params = [zero.shards[by_id[id(p)]] if id(p) in by_id else p for p in module.parameters()]
        self.optimizer = optimizer_class(params, **kwargs)
        zero.inner = self.optimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        if closure is not None:
            raise ConfigError("autopar's ZeRO optimizer does not take a closure; run forward/backward, then step()")
        self.zero.shard_grads_from_params()
        self.optimizer.step()
        self.zero.gather_params()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        for p in self.zero.params.values():      # ZeRO-1: the full (all-reduced) gradients go too
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def optimizer(module: nn.Module, optimizer_class: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
              **kwargs) -> torch.optim.Optimizer | ZeroOptimizer:
    """The optimizer for an autopar module: ``optimizer_class(module.parameters(), **kwargs)`` when its
    plan shards no optimizer state, else a :class:`ZeroOptimizer` stepping the ZeRO shards."""
    zero = getattr(module, "zero", None)
    if zero is None or not zero.shards:
        return optimizer_class(module.parameters(), **kwargs)
    return ZeroOptimizer(module, optimizer_class, **kwargs)


def full_grads(module: nn.Module) -> Iterable[tuple[str, torch.Tensor | None]]:
    """(FQN, gradient as a DTensor) per parameter: the ZeRO-2 shard gradient where the module keeps
    one, else ``param.grad`` (tests and tools compare them with ``full_tensor()``)."""
    zero = getattr(module, "zero", None)
    for fqn, p in module.named_parameters():
        if zero is not None and zero.stage.get(fqn) == 2:
            yield fqn, zero.shards[fqn].grad
        else:
            yield fqn, p.grad
