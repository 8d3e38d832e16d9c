"""autopar.memory: measured per-rank peak of live tensor bytes by category during a training step.

Built on torch's own tracker (``torch.distributed._tools.mem_tracker.MemTracker``, a dispatch mode
that follows every tensor storage with a weak reference), so it works the same on CPU and CUDA and
never reads RSS or allocator counters. Categories:

- ``params``: the module's parameters (a DTensor counts its local shard only), ``grads``: their
  gradients, ``optimizer``: optimizer states, ``activations``: tensors made in forward (and in
  recomputation), ``other``: buffers, backward temporaries (gradients of activations, collective
  buffers, and the activations a checkpointed region recomputes in backward: autopar's regions run
  their body without module hooks, so MemTracker cannot tell recompute from backward) and tensors
  passed in with ``track(..., extra)``;
- ``host``: activations offloaded to host memory (``codegen.offload_activations``) and an offloaded
  optimizer's master weights, gradient copies and states (``autopar.runtime.host_optimizer``; pass it as
  the optimizer: anything with ``host_tensors()`` is counted that way). On CUDA they are pinned CPU tensors. On CPU the "host" copy is an ordinary CPU tensor like everything else; by
  convention it is made inside :func:`host_allocations` and accounted as host, not device, so that
  the measurement shows what a device would hold. ``peak_bytes`` never includes host bytes.

Scope: tensors alive when the tracker starts count only if they belong to the module or the
optimizer given (inputs made before the step are not counted). One tracker instance measures one
step (MemTracker's limit). This module imports nothing of autopar's but its errors, and must not
change what it measures (it only observes).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from autopar.core.errors import ConfigError
from autopar.ops.tracking import ACTIVE, host_allocations  # noqa: F401  (host_allocations: public here too)

__all__ = ["CATEGORIES", "MemoryReport", "Tracker", "as_gradient", "host_allocations", "measure", "track"]

CATEGORIES = ("params", "grads", "optimizer", "activations", "other", "host")
_CATEGORY = {_MemRefType.PARAM: "params", _MemRefType.GRAD: "grads", _MemRefType.OPT: "optimizer",
             _MemRefType.ACT: "activations", _MemRefType.BUFFER: "other", _MemRefType.TEMP: "other",
             _MemRefType.OTH: "other"}
_TOTAL = "Total"


@dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """One step's measurement on one rank (bytes)."""

    device: str                       # the device measured (the module's parameter device)
    peak_bytes: int                   # peak of live device bytes (host excluded)
    breakdown: dict[str, int]         # categories at that peak (sums to peak_bytes; host: live host bytes then)
    category_peaks: dict[str, int]    # each category's own maximum over the step
    host_peak_bytes: int              # peak of live offloaded (host) bytes
    final: dict[str, int]             # categories live when the step ended (e.g. optimizer states kept)

    def to_dict(self) -> dict:
        return {"device": self.device, "peak_bytes": self.peak_bytes, "breakdown": dict(self.breakdown),
                "category_peaks": dict(self.category_peaks), "host_peak_bytes": self.host_peak_bytes,
                "final": dict(self.final)}


class _ModTracker(ModTracker):
    """ModTracker whose post-backward hook of a module waits for its non-leaf inputs only. Its hook on the
    inputs is a multi-grad hook, which holds every gradient it waits for until the last one arrives: on a
    parameter leaf passed in as an input (autopar's recompute regions take their parameters as inputs) it
    kept the gradient AccumulateGrad would have moved into ``.grad``, so that it made a copy and both
    lived on: the measurement, not the step, doubled those gradients."""

    def _fw_pre_hook(self, mod, input):
        args, _ = tree_flatten(input)
        return super()._fw_pre_hook(mod, tuple(a for a in args if not (isinstance(a, torch.Tensor) and a.is_leaf)))


class _Tracker(MemTracker):
    """MemTracker that routes host allocations to its own count and keeps per-category maxima."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self._mod_tracker = _ModTracker()   # observes without holding gradients (see _ModTracker)
        self.device = device
        self.host_depth = 0
        self.host_live = 0
        self.host_peak = 0
        self.peak_total = 0
        self.peak_snap: dict[str, int] = {}
        self.category_peaks = dict.fromkeys(CATEGORIES, 0)
        self._host_storages = WeakIdKeyDictionary()

    def _track(self, reftype, t: torch.Tensor) -> None:
        if self.host_depth:
            self.track_host(t)
        else:
            super()._track(reftype, t)

    def _update_and_maybe_create_winfos(self, t: torch.Tensor, reftype, update_existing: bool = False):
        # the optimizer-step hook files every torch optimizer's states as OPT: a host optimizer's stay host
        if self.host_depth or any(st in self._host_storages for st in get_untyped_storages(t)):
            self.track_host(t)
            return set()
        return super()._update_and_maybe_create_winfos(t, reftype, update_existing)

    def track_host(self, t: torch.Tensor) -> None:
        for st in get_untyped_storages(t):
            if st in self._host_storages:
                continue
            nbytes = st.nbytes()
            self._host_storages[st] = weakref.ref(st, lambda _ref, n=nbytes: self._host_freed(n))
            self.host_live += nbytes
            self.host_peak = max(self.host_peak, self.host_live)
            self.category_peaks["host"] = max(self.category_peaks["host"], self.host_live)

    def _host_freed(self, nbytes: int) -> None:
        self.host_live -= nbytes

    def current(self) -> dict[str, int]:
        """Live bytes per category now (host: live offloaded bytes)."""
        snap = self._curr_mem_snap.get(self.device, {})
        cats = dict.fromkeys(CATEGORIES, 0)
        for ref, cat in _CATEGORY.items():
            cats[cat] += snap.get(ref, 0)
        cats["host"] = self.host_live
        return cats

    def _update_peak_stats(self, peak_state) -> None:
        super()._update_peak_stats(peak_state)
        snap = self._curr_mem_snap.get(self.device)
        if snap is None:
            return
        cats = self.current()
        for cat, v in cats.items():
            if cat != "host" and v > self.category_peaks[cat]:
                self.category_peaks[cat] = v
        if snap[_TOTAL] > self.peak_total:
            self.peak_total = snap[_TOTAL]
            self.peak_snap = cats


class Tracker:
    """``with autopar.memory.track(module, optimizer) as t: step()`` then ``t.peak_bytes``, ``t.breakdown``."""

    def __init__(self, module: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 *extra: torch.Tensor, device: torch.device | str | None = None) -> None:
        if module is not None and not isinstance(module, nn.Module):
            raise ConfigError(f"track(module, ...): expected an nn.Module, got {type(module).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and \
                not callable(getattr(optimizer, "host_tensors", None)):
            raise ConfigError(f"track(module, optimizer): expected a torch.optim.Optimizer (or an "
                              f"autopar.runtime.host_optimizer.HostOptimizer), got {type(optimizer).__name__}")
        self.module, self.optimizer, self.extra = module, optimizer, extra
        self.device = torch.device(device) if device is not None else _module_device(module)
        self._mt: _Tracker | None = None
        self._report: MemoryReport | None = None
        self._hooks: list = []

    def __enter__(self) -> "Tracker":
        if self._mt is not None:
            raise ConfigError("a memory tracker measures one step; make a new autopar.memory.track(...) per step")
        self._mt = mt = _Tracker(self.device)
        # an optimizer that keeps its tensors on the host says so (HostOptimizer.host_tensors); a torch
        # optimizer's states are device memory
        host_opt = self.optimizer is not None and callable(getattr(self.optimizer, "host_tensors", None))
        for t in self.optimizer.host_tensors() if host_opt else ():
            mt.track_host(t)
        mt.track_external(*(x for x in (self.module, None if host_opt else self.optimizer) if x is not None),
                          *self.extra)
        if self.module is not None:
            self._hooks = self._hook_local_grads(mt, self.module)
        mt._update_peak_stats(None)   # the state before the step counts (params, optimizer states)
        mt.__enter__()
        ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        ACTIVE.remove(self)
        mt = self._mt
        final = mt.current()
        mt.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        breakdown = dict.fromkeys(CATEGORIES, 0)
        breakdown.update(mt.peak_snap)
        self._report = MemoryReport(device=str(self.device), peak_bytes=mt.peak_total, breakdown=breakdown,
                                    category_peaks=dict(mt.category_peaks), host_peak_bytes=mt.host_peak,
                                    final=final)

    @staticmethod
    def _hook_local_grads(mt: _Tracker, module: nn.Module) -> list:
        """A DTensor parameter whose local tensor is itself the autograd leaf (autopar's runtime) gets
        its gradient there: count it as a gradient when it is accumulated."""
        def as_grad(t: torch.Tensor) -> None:
            if t.grad is not None:   # None: moved elsewhere by an earlier hook (ZeRO-2 reduce-scatter)
                mt._update_and_maybe_create_winfos(t.grad, _MemRefType.GRAD)

        hooks = []
        for p in module.parameters():
            local = getattr(p, "_local_tensor", None)
            if local is not None and local.requires_grad and local.is_leaf:
                hooks.append(local.register_post_accumulate_grad_hook(as_grad))
        return hooks

    def _done(self) -> MemoryReport:
        if self._report is None:
            raise ConfigError("the measurement is read after the `with autopar.memory.track(...)` block ends")
        return self._report

    @property
    def report(self) -> MemoryReport:
        return self._done()

    @property
    def peak_bytes(self) -> int:
        return self._done().peak_bytes

    @property
    def breakdown(self) -> dict[str, int]:
        return dict(self._done().breakdown)

    @property
    def host_peak_bytes(self) -> int:
        return self._done().host_peak_bytes

    def snapshot(self) -> dict[str, int]:
        """Live bytes per category now (inside the ``with`` block), e.g. right after forward."""
        if self._mt is None or self._report is not None:
            raise ConfigError("Tracker.snapshot() is called inside the `with autopar.memory.track(...)` block")
        return self._mt.current()

    def host_enter(self) -> None:
        self._mt.host_depth += 1

    def host_exit(self) -> None:
        self._mt.host_depth -= 1


def _module_device(module: nn.Module | None) -> torch.device:
    if module is not None:
        for p in module.parameters():
            return getattr(p, "_local_tensor", p).device
    return torch.device("cpu")


def track(module: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *extra: torch.Tensor,
          device: torch.device | str | None = None) -> Tracker:
    """A context manager measuring one training step: ``with track(model, opt) as t: ...; t.peak_bytes``."""
    return Tracker(module, optimizer, *extra, device=device)


def measure(step: Callable[[], object], module: nn.Module | None = None,
            optimizer: torch.optim.Optimizer | None = None, *, device: torch.device | str | None = None
            ) -> MemoryReport:
    """Run ``step()`` once under a tracker and return its :class:`MemoryReport`."""
    with track(module, optimizer, device=device) as t:
        step()
    return t.report


def as_gradient(t: torch.Tensor) -> None:
    """Count ``t`` as a gradient in every active tracker (a gradient kept outside ``param.grad``, e.g. a
    ZeRO-2 shard's); costs nothing when nothing is tracked."""
    for tr in ACTIVE:
        tr._mt._update_and_maybe_create_winfos(t, _MemRefType.GRAD)
