"""Pass: offload the activations that the plan's listed modules save for backward to host memory.

Each module FQN in ``plan.offload`` (``*`` matches one name segment) is outlined like a checkpoint
region (``checkpoint_regions.outline_region``) into an ``OffloadedRegion`` that runs its body under
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves there is copied to host
memory when saved and copied back when backward needs it, so the device copy can be freed.

Host memory: on CUDA a pinned CPU tensor, filled and read with ``non_blocking`` copies. On CPU the
"host" copy is another CPU tensor; it is made inside ``autopar.ops.tracking.host_allocations()`` so that
``autopar.runtime.memory`` accounts it as host, not device (the convention that lets a CPU run show what a
device would hold). Not offloaded: parameters and views of them (already resident; a copy would
free nothing). A tensor saved by several ops is copied once per forward.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from autopar.codegen.checkpoint_regions import find_regions, outline_region, plan_regions, region_name
from autopar.codegen.context import ShardingContext
from autopar.ops import tracking


class OffloadedRegion(nn.Module):
    """Runs ``body`` (an outlined region) with its saved activations kept in host memory."""

    def __init__(self, body: fx.GraphModule, fqn: str) -> None:
        super().__init__()
        self.body = body
        self.fqn = fqn

    def forward(self, *args):
        resident = {a.untyped_storage().data_ptr() for a in args
                    if isinstance(a, torch.Tensor) and a.is_leaf and a.requires_grad}
        copies = WeakIdKeyDictionary()   # tensor saved -> its host copy (one copy per tensor per forward)

        def pack(t: torch.Tensor):
            if t.untyped_storage().data_ptr() in resident or t.device.type == "meta":
                return t
            held = copies.get(t)
            if held is None:
                held = copies[t] = (t.device, _to_host(t))
            return held

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            device, host = saved
            if device.type == "cpu":
                return host.clone()          # the "device" copy is a fresh tensor again
            return host.to(device, non_blocking=True)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return self.body(*args)

    def extra_repr(self) -> str:
        return repr(self.fqn)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    with tracking.host_allocations():
        host = torch.empty_like(t, device="cpu", pin_memory=t.device.type == "cuda")
        host.copy_(t, non_blocking=t.device.type == "cuda")
    return host


def offload_activations(gm: fx.GraphModule, ctx: ShardingContext) -> fx.GraphModule:
    """Requires: ``ctx.plan.offload`` module FQNs (or globs); graph nodes carry ``nn_module_stack``
    (``checkpoint_regions`` keeps it on its region calls, so a module can be both). Ensures: each listed
    module's nodes run inside an ``OffloadedRegion``; nothing changes for an empty list."""
    if not ctx.plan.offload:
        return gm
    entries = [(pattern, "offload") for pattern in ctx.plan.offload]
    for fqn, _ in plan_regions(gm, entries, field="plan.offload"):
        nodes = find_regions(gm, fqn, field="plan.offload")[fqn]
        outline_region(gm, nodes, region_name("offload", fqn), lambda body, f=fqn: OffloadedRegion(body, f), fqn)
    gm.recompile()
    return gm
