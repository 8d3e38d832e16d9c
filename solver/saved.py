"""Which tensors autograd keeps for backward, per graph node: measured, not guessed.

The captured graph runs once on fake tensors (FakeTensorMode: shapes only, on the captured device,
CPU for meta-built models) with every floating-point placeholder requiring grad, under
``torch.autograd.graph.saved_tensors_hooks``. Every tensor autograd packs is traced to
its root storage (``_base`` of a view) and attributed:

* to the node (or placeholder) whose output it is, as "output ``i`` of node ``n`` is kept", or
* when it is no node's output (an op's internal result such as layer_norm's mean/rstd or the
  log-softmax that cross-entropy keeps), to the node running at the time, as extra bytes.

Each root is counted once, however many ops save it (q, k and v of attention are views of one
projection output; the layer-norm output feeds three linears). Parameters kept by the ops that use
them are not activations (the solver charges parameter memory, and gathered copies, separately).

Scaled dot-product attention may take its math fallback under fake tensors (which keeps the s x s
attention matrix); on CPU and CUDA the fused kernels keep q, k, v, the output and the log-sum-exp,
so for that op the fused kernels' set is recorded.

Result per node: ``Saved(outputs, extra_bytes)``; a strategy's local bytes are the kept outputs'
local sizes plus ``extra_bytes`` divided by the shard factor of the node's first input
(solver.cost.saved_bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

SDPA = {torch.ops.aten.scaled_dot_product_attention.default}


@dataclass(frozen=True)
class Saved:
    outputs: frozenset[int]          # indices of the node's outputs autograd keeps
    extra_bytes: float               # kept internal results of the op (global bytes)


def _root(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


def _nbytes(t: torch.Tensor) -> float:
    return float(t.numel() * t.element_size())


def saved_tensors(gm: fx.GraphModule, frozen: set[str] | frozenset[str] = frozenset()) -> dict[str, Saved]:
    """Node name -> what autograd keeps of it (nodes that keep nothing are absent). ``frozen``:
    placeholders that never require grad (buffers such as BatchNorm's running statistics, which some
    ops refuse to take with requires_grad); every other floating-point placeholder requires grad."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = []
    with mode:
        for n in gm.graph.nodes:
            if n.op != "placeholder":
                continue
            v = n.meta.get("val")
            if not isinstance(v, torch.Tensor):
                args.append(v)
                continue
            # fake tensors on the captured device (meta-built models: CPU), so device moves in the graph
            # (HF's .to(x.device)) run and ops choose the kernels they choose there
            device = v.device if v.device.type != "meta" else torch.device("cpu")
            t = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=device)
            if t.is_floating_point() and n.name not in frozen:
                t.requires_grad_(True)
            args.append(t)

    owner: dict[int, tuple[str, int]] = {}      # id(root tensor) -> (node, output index)
    alive: list[torch.Tensor] = []              # keeps ids unique while the run lasts
    kept: dict[int, tuple[str, int] | None] = {}
    extra: dict[str, float] = {}
    state = {"node": None, "mute": False}

    def note(t: torch.Tensor, current: str) -> None:
        r = _root(t)
        if id(r) in kept:
            return
        alive.append(r)
        src = owner.get(id(r))
        kept[id(r)] = src
        if src is None:
            extra[current] = extra.get(current, 0.0) + _nbytes(r)

    def pack(t):
        if not state["mute"] and state["node"] is not None and isinstance(t, torch.Tensor):
            note(t, state["node"].name)
        return t

    class _Run(fx.Interpreter):
        def run_node(self, n):
            state["node"] = n
            state["mute"] = n.target in SDPA
            out = super().run_node(n)
            state["mute"] = False
            outs = out if isinstance(out, (tuple, list)) else [out]
            for i, t in enumerate(outs):
                if isinstance(t, torch.Tensor):
                    r = _root(t)
                    alive.append(r)
                    owner.setdefault(id(r), (n.name, i))   # a view's root belongs to its producer
            if n.target in SDPA and isinstance(out, torch.Tensor) and out.requires_grad:
                for a in n.args[:3]:
                    if isinstance(a, fx.Node):
                        note(self.env[a], n.name)
                note(out, n.name)
                q = self.env[n.args[0]]
                extra[n.name] = extra.get(n.name, 0.0) + q.numel() / q.shape[-1] * 4.0   # fp32 log-sum-exp
            return out

    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _Run(gm).run(*args)

    outputs: dict[str, set[int]] = {}
    for src in kept.values():
        if src is not None:
            outputs.setdefault(src[0], set()).add(src[1])
    names = set(outputs) | set(extra)
    return {n: Saved(frozenset(outputs.get(n, ())), extra.get(n, 0.0)) for n in names}
