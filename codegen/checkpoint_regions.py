"""Pass: outline each module the plan checkpoints into a submodule run through ``torch.utils.checkpoint``.

A plan entry ``"<module FQN>:<mode>"`` names a module of the original model (``*`` matches one
name segment: ``"blocks.*:full"``). Its graph nodes are those whose ``nn_module_stack`` contains
the FQN (torch.export records it; the copies and earlier passes keep it); the region is the
contiguous run of nodes from its first to its last node, so collectives the earlier passes put
between them are inside (they are recomputed too: every rank recomputes the same). Modes:

- ``full``: non-reentrant checkpoint; backward recomputes the whole region from its inputs;
- ``selective``: the outputs of matmuls and attention (aten mm/addmm/bmm/baddbmm/
  _scaled_dot_product_*) are saved, every other op is recomputed
  (``create_selective_checkpoint_contexts``).

The outlining helpers (``find_regions``, ``outline_region``) are shared with ``offload_activations``.
This pass runs last (after ``localize_shapes``): it moves nodes, it does not change them.
"""
from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from autopar.codegen.context import ShardingContext
from autopar.core.errors import PlanFormatError, PlanMismatchError

aten = torch.ops.aten
MODES = ("full", "selective")
# ops whose outputs selective recomputation keeps (Megatron's "selective": the expensive matmuls)
SAVED_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    name = getattr(op, "_schema", None)
    if op in SAVED_OPS or (name is not None and name.name.startswith("aten::_scaled_dot_product")):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointedRegion(nn.Module):
    """Runs ``body`` (an outlined region) under non-reentrant activation checkpointing."""

    def __init__(self, body: fx.GraphModule, mode: str, fqn: str) -> None:
        super().__init__()
        self.body = body
        self.mode = mode
        self.fqn = fqn

    def forward(self, *args):
        context = (functools.partial(create_selective_checkpoint_contexts, _selective_policy)
                   if self.mode == "selective" else None)
        kwargs = {"context_fn": context} if context is not None else {}
        # body.forward, not body: module hooks (FlopCounterMode's, MemTracker's) would run in the recompute
        # but not in the forward when such a mode is entered in between, and selective checkpointing
        # replays ops by their order
        return checkpoint(self.body.forward, *args, use_reentrant=False, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.fqn!r}, mode={self.mode!r}"


# ------------------------------------------------------------------------------------ shared helpers


def module_path(node: fx.Node) -> tuple[str, ...]:
    """The module FQNs enclosing ``node``, outermost first (empty for nodes no module made)."""
    stack = node.meta.get("nn_module_stack") or {}
    return tuple(v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str) and v[0])


def _glob(pattern: str) -> re.Pattern:
    """``*`` matches one dotted name segment, anything else is literal."""
    return re.compile("\\.".join("[^.]+" if part == "*" else re.escape(part).replace("\\*", "[^.]*")
                                 for part in pattern.split(".")) + r"\Z")


def parse_entry(entry: str, *, field: str) -> tuple[str, str]:
    """``"blocks.0:full"`` -> ("blocks.0", "full")."""
    fqn, sep, mode = entry.rpartition(":")
    if not sep or not fqn or mode not in MODES:
        raise PlanFormatError(f"{field}: {entry!r} is not '<module FQN>:<mode>' with mode one of {MODES} "
                              f"(e.g. 'blocks.0:full', 'blocks.*:selective')")
    return fqn, mode


def find_regions(gm: fx.GraphModule, pattern: str, *, field: str) -> dict[str, list[fx.Node]]:
    """Module FQN -> its region (contiguous graph nodes) for every module ``pattern`` matches."""
    rx = _glob(pattern)
    spans: dict[str, list[int]] = {}
    order = list(gm.graph.nodes)
    for i, n in enumerate(order):
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        for fqn in module_path(n):
            if rx.match(fqn):
                span = spans.setdefault(fqn, [i, i])
                span[1] = i
    if not spans:
        known = sorted({p for n in order for p in module_path(n)})
        raise PlanMismatchError(f"{field}: {pattern!r} names no module with operations in this model's graph; "
                                f"modules: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}")
    return {fqn: [n for n in order[a:b + 1] if n.op in ("call_function", "call_method", "call_module")]
            for fqn, (a, b) in spans.items()}


def outline_region(gm: fx.GraphModule, nodes: list[fx.Node], name: str,
                   wrap: Callable[[fx.GraphModule], nn.Module], fqn: str) -> fx.Node:
    """Move ``nodes`` (contiguous, in graph order) into a GraphModule, wrap it, and call the wrapper in
    their place; values used after the region come out of the call as a tuple. Returns the call node."""
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    body = fx.GraphModule(gm, sub, class_name=name)   # takes the inner regions' submodules it calls
    gm.add_submodule(name, wrap(body))
    g = gm.graph
    with g.inserting_before(nodes[0]):
        call = g.call_module(name, tuple(inputs))
        call.meta["nn_module_stack"] = _enclosing_stack(nodes[0], fqn)
        results = [g.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for old, new in zip(outputs, results):
        new.meta = dict(old.meta)
        old.replace_all_uses_with(new)
    for n in reversed(nodes):
        g.erase_node(n)
        if n.op == "call_module":
            gm.delete_submodule(n.target)   # now owned by ``body``
    return call


def _enclosing_stack(node: fx.Node, fqn: str) -> dict:
    """``node``'s module stack up to and including ``fqn`` (the region's call is made by that module)."""
    out = {}
    for k, v in (node.meta.get("nn_module_stack") or {}).items():
        out[k] = v
        if isinstance(v, tuple) and v and v[0] == fqn:
            break
    return out


def plan_regions(gm: fx.GraphModule, entries: list[tuple[str, str]], *, field: str
                 ) -> list[tuple[str, str]]:
    """(module FQN, mode) for every module the entries match, innermost first (nested regions outline
    from the inside out). A module named twice is an error."""
    chosen: dict[str, str] = {}
    for pattern, mode in entries:
        for fqn in find_regions(gm, pattern, field=field):
            if fqn in chosen and chosen[fqn] != mode:
                raise PlanFormatError(f"{field}: module {fqn!r} is listed as {chosen[fqn]!r} and {mode!r}; "
                                      f"list each module once")
            chosen[fqn] = mode
    return sorted(chosen.items(), key=lambda kv: -kv[0].count("."))


def region_name(prefix: str, fqn: str) -> str:
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', fqn)}"


# ---------------------------------------------------------------------------------------------- pass


def checkpoint_regions(gm: fx.GraphModule, ctx: ShardingContext) -> fx.GraphModule:
    """Requires: ``ctx.plan.checkpoint`` entries ``"<FQN or glob>:full|selective"``; graph nodes carry
    ``nn_module_stack``. Ensures: each named module's nodes run inside a ``CheckpointedRegion`` submodule
    (same values, same collectives; backward recomputes them); nothing changes for an empty list."""
    if not ctx.plan.checkpoint:
        return gm
    entries = [parse_entry(e, field=f"plan.checkpoint[{i}]") for i, e in enumerate(ctx.plan.checkpoint)]
    for fqn, mode in plan_regions(gm, entries, field="plan.checkpoint"):
        nodes = find_regions(gm, fqn, field="plan.checkpoint")[fqn]
        outline_region(gm, nodes, region_name("checkpoint", fqn),
                       lambda body, m=mode, f=fqn: CheckpointedRegion(body, m, f), fqn)
    gm.recompile()
    return gm
