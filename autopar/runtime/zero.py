"""ZeRO-1 and ZeRO-2 at run time: optimizer states (and gradients) sharded over data-parallel mesh dims.

A plan's ``optimizer_sharding`` (FQN -> placements, from ``placement.zero_sharding``) names the
parameters whose optimizer states are sharded (ZeRO-1); ``gradient_sharding`` those whose gradients
are sharded too (ZeRO-2). Parameters themselves keep the plan's placements (``param_placements``:
ZeRO-3 is parameters sharded there) and their FQNs. Semantics as DeepSpeed / FSDP:

- ZeRO-1: gradients are all-reduced as without ZeRO (``autopar.runtime.grad_sync``): ``param.grad`` is
  the full gradient, a DTensor with the parameter's placements. Each rank steps only its shard of the
  parameter (a view of the parameter's local tensor: no second copy of the weights) with its shard of
  the gradient (a view too) and of the optimizer state, then the parameter is all-gathered.
- ZeRO-2: each gradient is reduce-scattered as soon as it is accumulated in backward (a
  post-accumulate hook on the local leaf; the full local gradient is freed). ``param.grad`` is then a
  DTensor with the *gradient-sharding* placements and the parameter's global shape, whose local tensor
  is this rank's reduced shard: every rank holds only its part, yet ``param.grad.full_tensor()`` is the
  single-device gradient, and ``clip_grad_norm_``, gradient checks and ``zero_grad`` see it as any
  other gradient. A second backward adds its shard into it (accumulation). The step runs on the shard,
  the parameter is all-gathered.

The optimizer (:func:`optimizer`, :class:`ZeroOptimizer`) is an instance of the user's torch optimizer
class (``autopar.zero.optimizer(pm, torch.optim.AdamW, lr=...)`` is a ``torch.optim.AdamW``) over the
module's real parameters, so LR schedulers, ``state_dict``/``load_state_dict``, DCP and MemTracker see
parameters and FQNs as usual; its states are keyed by the parameters and are DTensors with the ZeRO
placements (this rank holds its shard). Only ``step`` differs: for its duration the ZeRO parameters in
``param_groups`` (and their states) are swapped for their shard views, the torch algorithm runs
unchanged, and the stepped parameters are all-gathered.

The reduce-scatter is a DTensor ``redistribute`` (Partial -> Shard); the all-gather after the step writes
in place into the parameters' local tensors (``ZeroShards.gather``). :class:`ZeroShards` lives on the ParallelModule (``module.zero``).
Imports autopar's core only.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial
from torch.optim.optimizer import register_optimizer_step_pre_hook

from autopar.core.errors import ConfigError, PlanMismatchError
from autopar.core.placement import Sharding, parse_sharding, zero_sharding
from autopar.ops.collectives import all_gather_single
from autopar.runtime import memory

__all__ = ["ZeroOptimizer", "ZeroShards", "full_grads", "optimizer"]


class ZeroShards:
    """The ZeRO bookkeeping of a ParallelModule: per ZeRO parameter (``params``, by its first FQN) its ZeRO
    placements (``sharding``) and stage (``stage``: 1 or 2), this rank's shard views of it (:meth:`view`)
    and of its gradient (:meth:`grad_view`), and for ZeRO-2 parameters the hook that reduce-scatters each
    accumulated gradient into ``param.grad``."""

    def __init__(self, module: nn.Module, plan, mesh: DeviceMesh, partial_dims: dict[str, tuple[int, ...]]):
        self.mesh = mesh
        self.params: dict[str, nn.Parameter] = {}
        self.sharding: dict[str, Sharding] = {}
        self.stage: dict[str, int] = {}
        self._arriving: dict[str, Sharding] = {}
        self._primary: dict[str, str] = {}          # every FQN (tied names too) -> the key used here
        self._views: dict[str, tuple[torch.Tensor, DTensor]] = {}
        first: dict[int, str] = {}
        for fqn, p in module.named_parameters(remove_duplicate=False):
            if fqn not in plan.optimizer_sharding:
                continue
            if id(p) in first:
                self._primary[fqn] = first[id(p)]
                continue
            first[id(p)] = self._primary[fqn] = fqn
            want = parse_sharding(list(plan.optimizer_sharding[fqn]), field=f"plan.optimizer_sharding[{fqn!r}]")
            if not isinstance(p, DTensor) or want != zero_sharding(p.shape, tuple(p.placements), mesh.shape):
                raise PlanMismatchError(
                    f"plan.optimizer_sharding[{fqn!r}] = {list(plan.optimizer_sharding[fqn])} is not the ZeRO "
                    f"sharding of parameter placements {list(plan.param_placements.get(fqn, ()))} on mesh "
                    f"{tuple(mesh.shape)}; re-plan with autopar.plan (the planner writes this field)")
            self.params[fqn] = p
            self.sharding[fqn] = want
            self.stage[fqn] = 2 if fqn in plan.gradient_sharding else 1
            self._arriving[fqn] = tuple(Partial("sum") if i in partial_dims.get(fqn, ()) else q
                                        for i, q in enumerate(p.placements))
        self._by_id = {id(p): fqn for fqn, p in self.params.items()}
        self._checked: weakref.WeakSet = weakref.WeakSet()
        self._hooks = [_register_plain_optimizer_check(self)] if self.params else []
        for fqn, p in list(self.params.items()):
            self.attach(fqn, p, p._local_tensor)

    # ------------------------------------------------------------------------------------- lookups

    def key(self, fqn: str) -> str | None:
        """The key of parameter ``fqn`` here (its first FQN when tied), None when it has no ZeRO sharding."""
        return self._primary.get(fqn)

    def fqn_of(self, p: torch.Tensor) -> str | None:
        """The key of ZeRO parameter ``p`` (None for a parameter without a ZeRO sharding)."""
        fqn = self._by_id.get(id(p))
        return fqn if fqn is not None and self.params[fqn] is p else None

    @property
    def shards(self) -> dict[str, DTensor]:
        """This rank's shard view of every ZeRO parameter (FQN -> DTensor with the ZeRO placements)."""
        return {fqn: self.view(fqn) for fqn in self.params}

    # ----------------------------------------------------------------------------------- the hooks

    def attach(self, fqn: str, p: nn.Parameter, local: torch.Tensor) -> None:
        """ZeRO parameter ``fqn`` is ``p`` with the local leaf ``local`` (called at construction and by the
        ParallelModule when a parameter is replaced); a ZeRO-2 one reduce-scatters its gradients."""
        key = self._primary[fqn]
        old = self.params[key]
        self._by_id.pop(id(old), None)
        self.params[key] = p
        self._by_id[id(p)] = key
        if self.stage[key] == 2 and local.requires_grad:
            self._hooks.append(local.register_post_accumulate_grad_hook(
                functools.partial(self._reduce_scatter, key)))

    @torch.no_grad()
    def _reduce_scatter(self, fqn: str, local: torch.Tensor) -> None:
        """Post-accumulate hook of a ZeRO-2 parameter's local leaf: its (partial) gradient is reduce-scattered
        and added into ``param.grad`` (this rank's shard of the reduced gradient, as a DTensor with the ZeRO
        placements and the global shape); the full local gradient is dropped."""
        g = local.grad
        if g is None:
            return
        p = self.params[fqn]
        want = self.sharding[fqn]
        part = DTensor.from_local(g, self.mesh, self._arriving[fqn], shape=p.shape, stride=p.stride(),
                                  run_check=False).redistribute(self.mesh, want)
        local.grad = None
        held = p.grad
        if held is None:
            p.grad = part
        elif isinstance(held, DTensor) and tuple(held.placements) == want:
            held._local_tensor.add_(part._local_tensor)        # accumulation across backward calls
        else:                                                 # a gradient the user assigned in another layout
            p.grad = _as_dtensor(held, p).redistribute(self.mesh, want) + part
        memory.as_gradient(p.grad)

    # ------------------------------------------------------------------------------------ the shards

    def view(self, fqn: str) -> DTensor:
        """A leaf DTensor with the ZeRO placements whose local tensor is this rank's part of the parameter's
        local tensor (a view: stepping it updates the parameter in place)."""
        p = self.params[fqn]
        local = p._local_tensor
        cached = self._views.get(fqn)
        if cached is not None and cached[0] is local:
            return cached[1]
        view = self._chunk(local.detach(), tuple(p.placements), self.sharding[fqn])
        shard = DTensor.from_local(view, self.mesh, self.sharding[fqn], shape=p.shape, stride=p.stride(),
                                   run_check=False)
        self._views[fqn] = (local, shard)
        return shard

    def grad_view(self, fqn: str) -> DTensor | None:
        """This rank's shard of ``param.grad`` as a DTensor with the ZeRO placements: the gradient itself
        under ZeRO-2, a view of the full gradient's local tensor under ZeRO-1 (no copy)."""
        p = self.params[fqn]
        g = p.grad
        if g is None:
            return None
        want = self.sharding[fqn]
        g = _as_dtensor(g, p)
        if tuple(g.placements) == want:
            return g
        if tuple(g.placements) == tuple(p.placements):
            view = self._chunk(g._local_tensor, tuple(p.placements), want)
            return DTensor.from_local(view, self.mesh, want, shape=p.shape, stride=p.stride(), run_check=False)
        return g.redistribute(self.mesh, want)

    def _chunk(self, local: torch.Tensor, have: Sharding, want: Sharding) -> torch.Tensor:
        coord = self.mesh.get_coordinate()
        for i, (old, new) in enumerate(zip(have, want)):
            if new != old:   # a ZeRO dim: this rank's chunk of the tensor dim it shards
                local = local.chunk(self.mesh.shape[i], dim=new.dim)[coord[i]]
        return local

    @torch.no_grad()
    def gather(self, fqns: Iterable[str]) -> None:
        """After a step on the shards: every rank's parameter gets the others' updated parts (all-gather).

        In place: the collectives write straight into the parameter's local tensor (its shard is already
        there), one ZeRO mesh dim after the other from the innermost; a contiguous region takes
        ``all_gather_into_tensor``, a strided one (a ZeRO dim other than the outermost) ``all_gather`` into
        its chunk views. No gathered copy is allocated here, so none outlives the step (a temporary's last
        reference can sit in the process group's worker thread for a moment after the wait: allocated in
        the step, a memory tracker would find it alive at the step's end and count it as optimizer state)."""
        coord = self.mesh.get_coordinate()
        for fqn in fqns:
            p = self.params[fqn]
            nested = []                       # (region, mesh dim, tensor dim), outermost first
            region = p._local_tensor
            for i, (old, new) in enumerate(zip(p.placements, self.sharding[fqn])):
                if new != old:
                    nested.append((region, i, new.dim))
                    region = region.chunk(self.mesh.shape[i], dim=new.dim)[coord[i]]
            for region, i, d in reversed(nested):
                group = self.mesh.get_group(i)
                chunks = list(region.chunk(self.mesh.shape[i], dim=d))
                mine = chunks[coord[i]]
                if region.is_contiguous() and all(c.is_contiguous() for c in chunks):
                    all_gather_single(region, mine, group=group)
                else:                         # NCCL wants a contiguous input; gloo takes the view
                    inp = mine if mine.is_contiguous() or dist.get_backend(group) == "gloo" else mine.contiguous()
                    dist.all_gather(chunks, inp, group=group)

    # ------------------------------------------------------------------------------- plain optimizers

    def _check_plain_optimizer(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        """A plain torch optimizer over ZeRO parameters steps them correctly (``param.grad`` holds every
        gradient; DTensor gathers ZeRO-2 shards where it needs them) but keeps whole optimizer states per
        rank, the memory the plan's ZeRO decisions saved: warn, once per optimizer, saying what to use."""
        if isinstance(opt, ZeroOptimizer) or opt in self._checked:
            return
        self._checked.add(opt)
        ids = {id(p) for p in self.params.values()}
        if any(id(p) in ids for g in opt.param_groups for p in g["params"]):
            warnings.warn(
                f"this module's plan shards optimizer states (ZeRO, plan.optimizer_sharding: {len(self.params)} "
                f"parameters) but {type(opt).__name__}(module.parameters()) keeps them whole on every rank, "
                f"more memory than the plan budgeted; build it with autopar.zero.optimizer(module, "
                f"{type(opt).__name__}, ...) (or autopar.make_optimizer), or plan with zero=0",
                UserWarning, stacklevel=4)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _as_dtensor(g: torch.Tensor, p: DTensor) -> DTensor:
    if isinstance(g, DTensor):
        return g
    raise ConfigError(f"a ZeRO parameter's gradient must be a DTensor on its mesh (as autopar sets it), got a "
                      f"{type(g).__name__} of shape {tuple(g.shape)}; assign DTensor gradients or let backward "
                      f"set them")


def _register_plain_optimizer_check(zero: ZeroShards):
    """A global optimizer pre-hook calling ``zero._check_plain_optimizer`` while ``zero`` lives (a weak
    reference: the hook must not keep a module alive; once it is gone the hook does nothing -- it cannot
    remove itself while torch iterates the hooks -- until ``ZeroShards.remove``)."""
    ref = weakref.WeakMethod(zero._check_plain_optimizer)

    def hook(opt, args, kwargs):
        method = ref()
        if method is not None:
            method(opt, args, kwargs)

    return register_optimizer_step_pre_hook(hook)


# ------------------------------------------------------------------------------------------ optimizer


class ZeroOptimizer(torch.optim.Optimizer):
    """A torch optimizer stepping a ZeRO module's parameters on their shards.

    ``ZeroOptimizer(module, torch.optim.AdamW, lr=...)`` returns an instance of ``ZeroAdamW``, a subclass
    of both this class and ``torch.optim.AdamW`` (made once per optimizer class), built over the module's
    parameters (or the ``params`` / parameter groups given, which must be the module's). ``param_groups``
    hold the real parameters and ``state`` is keyed by them (ZeRO states are DTensors with the ZeRO
    placements), so LR schedulers, ``clip_grad_norm_``, ``state_dict``/``load_state_dict``, DCP
    (``autopar.save``/``load``) and MemTracker work as with any torch optimizer. ``step`` swaps each ZeRO
    parameter and its state for the shard view, runs the torch algorithm, swaps back and all-gathers
    the stepped parameters. Closures are not taken (the swap would outlive a backward they run)."""

    _algorithm_class: type   # the torch optimizer class whose step runs on the shards (set per made class)

    def __new__(cls, module: nn.Module | None = None, optimizer_class: type = torch.optim.AdamW, *args, **kwargs):
        if cls is not ZeroOptimizer:
            return super().__new__(cls)
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise ConfigError(f"autopar.zero.optimizer(module, optimizer_class): optimizer_class must be a "
                              f"torch.optim.Optimizer class such as torch.optim.AdamW, got {optimizer_class!r}")
        return super().__new__(ZeroOptimizer.for_class(optimizer_class))

    @staticmethod
    def for_class(optimizer_class: type) -> type:
        """``Zero<Name>``: the subclass of ``optimizer_class`` and :class:`ZeroOptimizer` (made once)."""
        if issubclass(optimizer_class, ZeroOptimizer):
            return optimizer_class
        made = _ZERO_CLASSES.get(optimizer_class)
        if made is None:
            made = type(f"Zero{optimizer_class.__name__}", (ZeroOptimizer, optimizer_class),
                        {"__module__": __name__, "_algorithm_class": optimizer_class})
            _ZERO_CLASSES[optimizer_class] = made
        return made

    def __init__(self, module: nn.Module, optimizer_class: type = torch.optim.AdamW, params=None, **kwargs):
        zero: ZeroShards | None = getattr(module, "zero", None)
        if zero is None:
            raise ConfigError("autopar.zero.optimizer(module, ...): module is not an autopar ParallelModule with ZeRO "
                              "shards; build it with autopar.apply / autopar.parallelize")
        self.zero = zero
        super().__init__(module.parameters() if params is None else params, **kwargs)

    def step(self, closure=None):
        if closure is not None:
            raise ConfigError("autopar's ZeRO optimizer does not take a closure; run forward/backward, then step()")
        zero, state = self.zero, self.state
        moved: list[tuple[torch.Tensor, DTensor, str]] = []
        saved: list[tuple[dict, list]] = []
        for group in self.param_groups:
            params = group["params"]
            swapped = []
            for p in params:
                fqn = zero.fqn_of(p)
                if fqn is None:
                    swapped.append(p)
                    continue
                shard = zero.view(fqn)
                shard.grad = zero.grad_view(fqn)
                if p in state:
                    state[shard] = state.pop(p)
                moved.append((p, shard, fqn))
                swapped.append(shard)
            if any(a is not b for a, b in zip(swapped, params)):
                saved.append((group, params))
                group["params"] = swapped
        try:
            out = _unhooked(self._algorithm_class.step)(self)
        finally:
            for group, params in saved:
                group["params"] = params
            stepped = []
            for p, shard, fqn in moved:
                if shard in state:
                    state[p] = state.pop(shard)
                if shard.grad is not None:
                    stepped.append(fqn)
                shard.grad = None
        zero.gather(stepped)
        return out


_ZERO_CLASSES: dict[type, type] = {}


def _unhooked(step: Callable) -> Callable:
    """The optimizer class's own ``step`` without torch's hook wrapper (``Optimizer._patch_step_function``):
    the ZeroOptimizer's step is wrapped already, and hooks must run once, on the real parameters."""
    while getattr(step, "hooked", False) and hasattr(step, "__wrapped__"):
        step = step.__wrapped__
    return step


def optimizer(module: nn.Module, optimizer_class: type = torch.optim.AdamW, **kwargs) -> torch.optim.Optimizer:
    """The optimizer for an autopar module: ``optimizer_class(module.parameters(), **kwargs)`` when its
    plan shards no optimizer state, else a :class:`ZeroOptimizer` (an ``optimizer_class`` too) stepping
    the ZeRO shards. ``params=`` (parameter groups of the module's parameters) is passed on."""
    zero = getattr(module, "zero", None)
    if zero is None or not zero.params:
        params = kwargs.pop("params", None)
        return optimizer_class(module.parameters() if params is None else params, **kwargs)
    return ZeroOptimizer(module, optimizer_class, **kwargs)


def full_grads(module: nn.Module) -> Iterable[tuple[str, torch.Tensor | None]]:
    """(FQN, ``param.grad``) per parameter: under every plan, ZeRO-2 included, ``param.grad`` holds the
    gradient (a DTensor whose ``full_tensor()`` is the single-device gradient). Kept for callers of the
    time when ZeRO-2 gradients lived elsewhere."""
    for fqn, p in module.named_parameters():
        yield fqn, p.grad
