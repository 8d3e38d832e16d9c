"""Which tensors autograd keeps for backward, per graph node: measured, not guessed.

The captured graph runs once on fake tensors (FakeTensorMode: shapes only, on the captured device,
CPU for meta-built models) with the parameters requiring grad (buffers and user inputs do not, as in
training: ``x * rope_cos`` keeps nothing of ``x`` then), under
``torch.autograd.graph.saved_tensors_hooks``. Every tensor autograd packs is traced to
its root storage (``_base`` of a view) and attributed:

* to the node (or placeholder) whose output it is, as "output ``i`` of node ``n`` is kept", or
* when it is no node's output (an op's internal result such as layer_norm's mean/rstd or the
  log-softmax that cross-entropy keeps), to the node running at the time, as extra bytes.

Each saved root also records where it is kept: through which consumer (node, argument index, the
argument numbering of ``autopar.core.graph.tensor_inputs``) the saved tensor or view left its producer,
or by the producer itself; a view that reaches the op saving it (a weight's transpose read by a matmul) also
records that last edge, under the node that made the view (a plan may reshard the view there). A consumer whose input the plan reshards keeps the resharded copy in its
own placement (solver.ilp charges it there); parameters are recorded this way too (a gathered copy
is kept only by an op that saves that parameter: embedding's backward needs only the indices).

Each root is counted once, however many ops save it (q, k and v of attention are views of one
projection output; the layer-norm output feeds three linears). Parameters kept by the ops that use
them are not activations (the solver charges parameter memory, and gathered copies, separately).

Scaled dot-product attention may take its math fallback under fake tensors (which keeps the s x s
attention matrix); on CPU and CUDA the fused kernels keep q, k, v, the output and the log-sum-exp,
so for that op the fused kernels' set is recorded.

Mixed precision (``autocast_dtype``): the run is under CPU ``torch.autocast`` with float32 parameters, as the
runtime runs a lower-precision plan. A lower-precision op then keeps copies of its float32 inputs cast to the
compute dtype (autocast casts each input; the matmul saves the cast copy, not the input): a parameter's copy
(autocast's weight cast) and an activation's (a layer-norm output read by three linears is cast, and kept,
three times). Those copies are no node's output; each is recorded as a cast of the argument it was made from
(``casts``: argument index, global bytes), so it is charged at the consumer's placement of that argument
(a ZeRO-3 parameter's gathered copy, a tensor-parallel weight's shard), not split like the first input.

Result per node: ``Saved(outputs, extra_bytes, kept_by, casts)``; a strategy's local bytes are the kept
outputs' local sizes, each cast copy's bytes divided by the shard factor of its argument's placement, plus
``extra_bytes`` divided by the shard factor of the node's first input (solver.cost.saved_bytes).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from autopar.core.graph import tensor_inputs

log = logging.getLogger(__name__)

SDPA = {torch.ops.aten.scaled_dot_product_attention.default}
ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}
_getitem = __import__("operator").getitem


@dataclass(frozen=True)
class Saved:
    outputs: frozenset[int]          # indices of the node's outputs autograd keeps
    extra_bytes: float               # kept internal results of the op (global bytes)
    # (output index, consumer node, argument index) through which a kept output (or a view of it) reached
    # the op that saved it; consumer None: the producer itself keeps it (its own placement)
    kept_by: frozenset[tuple[int, str | None, int]] = field(default=frozenset())
    # (argument index, global bytes) per kept copy of an argument cast to autocast's dtype (mixed precision)
    casts: frozenset[tuple[int, float]] = field(default=frozenset())


def _root(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


def _nbytes(t: torch.Tensor) -> float:
    return float(t.numel() * t.element_size())


class _Casts(TorchDispatchMode):
    """Remembers, for each ``_to_copy`` (autocast's cast), which tensor the copy was made from."""

    def __init__(self) -> None:
        super().__init__()
        self.source: dict[int, torch.Tensor] = {}   # id(copy) -> the tensor it was cast from
        self.alive: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor) and args \
                and isinstance(args[0], torch.Tensor):
            self.source[id(out)] = args[0]
            self.alive.append(out)
        return out


def saved_tensors(gm: fx.GraphModule, grad_inputs: set[str] | None = None,
                  autocast_dtype: torch.dtype | None = None) -> dict[str, Saved]:
    """Node name -> what autograd keeps of it (nodes that keep nothing are absent). ``grad_inputs``: the
    placeholders that require grad (the parameters; None: every floating-point placeholder).
    ``autocast_dtype``: run under CPU autocast to that dtype (mixed precision; float32 or None: no autocast)."""

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
            if t.is_floating_point() and (grad_inputs is None or n.name in grad_inputs):
                t.requires_grad_(True)
            args.append(t)

    owner: dict[int, tuple[str, int]] = {}      # id(root tensor) -> (node, output index)
    alive: list[torch.Tensor] = []              # keeps ids unique while the run lasts
    kept: dict[int, tuple[str, int] | None] = {}
    extra: dict[str, float] = {}
    hop: dict[int, tuple[str, int]] = {}        # id(view) -> (consumer of its root's producer, argument index)
    view_of: dict[int, tuple[str, int]] = {}    # id(view) -> (the node, output index) that made the view
    kept_by: dict[tuple[str, int], set[tuple[str | None, int]]] = {}
    cast_bytes: dict[str, dict[int, float]] = {}
    casts = _Casts() if autocast_dtype not in (None, torch.float32) else None
    state = {"node": None, "mute": False, "args": ()}

    def first_hop(t: torch.Tensor, r: torch.Tensor, node: fx.Node, args) -> tuple[str | None, int] | None:
        """Where ``t`` (root ``r``) left its producer on the way to ``node``'s inputs ``args``."""
        if id(t) in hop:
            return hop[id(t)]
        for ai, a in enumerate(args):
            if a is t or (isinstance(a, torch.Tensor) and a is r):
                return (node.name, ai)
        for ai, a in enumerate(args):   # a view the op made of one of its inputs
            if isinstance(a, torch.Tensor) and _root(a) is r:
                return hop.get(id(a), (node.name, ai))
        return None

    def note(t: torch.Tensor, current: fx.Node) -> None:
        r = _root(t)
        src = owner.get(id(r))
        if src is not None:
            where = (None, -1) if src[0] == current.name else first_hop(t, r, current, state["args"])
            if where is not None:
                kept_by.setdefault(src, set()).add(where)
            for ai, a in enumerate(state["args"]):   # the view the saving op read: its edge into the op too
                made = view_of.get(id(a)) if isinstance(a, torch.Tensor) and _root(a) is r else None
                if made is not None and made[0] != current.name and made != src:
                    kept_by.setdefault(made, set()).add((current.name, ai))
        if id(r) in kept:
            return
        alive.append(r)
        kept[id(r)] = src
        if src is None:
            arg = cast_of(r, state["args"])
            if arg is not None:
                per = cast_bytes.setdefault(current.name, {})
                per[arg] = per.get(arg, 0.0) + _nbytes(r)
            else:
                extra[current.name] = extra.get(current.name, 0.0) + _nbytes(r)

    def cast_of(r: torch.Tensor, args) -> int | None:
        """The argument of the running node that ``r`` is autocast's cast copy of (None: not a cast)."""
        src = casts.source.get(id(r)) if casts is not None else None
        if src is None:
            return None
        for ai, a in enumerate(args):
            if a is src:
                return ai
        for ai, a in enumerate(args):   # a cast of a view the op made of its input
            if isinstance(a, torch.Tensor) and _root(a) is _root(src):
                return ai
        return None

    def pack(t):
        if not state["mute"] and state["node"] is not None and isinstance(t, torch.Tensor):
            note(t, state["node"])
        return t

    by_name = {n.name: n for n in gm.graph.nodes}

    # a model captured on the meta device has meta baked into its graph (arange(..., device=meta), HF's
    # inv_freq.to(x.device)): the fake run is on the CPU, so those devices become the CPU too
    on_meta = any(isinstance(v, torch.Tensor) and v.device.type == "meta"
                  for v in (n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"))
    cpu = torch.device("cpu")

    def off_meta(x):
        return cpu if isinstance(x, torch.device) and x.type == "meta" else x

    class _Run(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if casts is not None and target in ASSERTS:   # export's dtype checks hold for the float32 run only
                return None
            if on_meta:
                args, kwargs = pytree.tree_map(off_meta, (args, kwargs))
                try:
                    return super().call_function(target, args, kwargs)
                except (RuntimeError, NotImplementedError) as e:
                    return self._as_captured(e, args, kwargs)
            return super().call_function(target, args, kwargs)

        def _as_captured(self, err: Exception, args, kwargs):
            """An op of a meta-built graph the CPU has no kernel for (HF Mixtral's ``histc`` on int32, chosen
            because the capture device was meta, not the CPU): where no input requires grad, autograd keeps
            nothing of it, and its output is the captured shape (``meta['val']``) on the CPU; otherwise the
            error stands (what it would keep is unknown)."""
            n = state["node"]
            val = n.meta.get("val")
            grads = any(isinstance(t, torch.Tensor) and t.requires_grad for t in pytree.tree_leaves((args, kwargs)))
            if grads or val is None:
                raise err
            return pytree.tree_map(lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=cpu)
                                   if isinstance(v, torch.Tensor) else v, val)

        def run_node(self, n):
            state["node"] = n
            state["mute"] = n.target in SDPA
            state["args"] = tuple(self.env[by_name[r.src]] if n.target is not _getitem
                                  else self.env[by_name[r.src]][r.out]
                                  for r in tensor_inputs(n)) if n.op == "call_function" else ()
            out = super().run_node(n)
            state["mute"] = False
            outs = out if isinstance(out, (tuple, list)) else [out]
            for i, t in enumerate(outs):
                if isinstance(t, torch.Tensor):
                    r = _root(t)
                    alive.append(r)
                    owner.setdefault(id(r), (n.name, i))   # a view's root belongs to its producer
                    if r is not t and owner[id(r)][0] != n.name:   # a view: remember where it left the root
                        view_of[id(t)] = (n.name, i)
                        alive.append(t)
                        where = first_hop(t, r, n, state["args"])
                        if where is not None:
                            hop[id(t)] = where
            if n.target in SDPA and isinstance(out, torch.Tensor) and out.requires_grad:
                for ai, a in enumerate(n.args[:3]):
                    if not isinstance(a, fx.Node):
                        continue
                    t = self.env[a]
                    if casts is not None and t.is_floating_point() and t.dtype != autocast_dtype:
                        # autocast casts q, k, v for the fused kernel, which keeps the copies
                        per = cast_bytes.setdefault(n.name, {})
                        per[ai] = per.get(ai, 0.0) + t.numel() * autocast_dtype.itemsize
                    else:
                        note(t, n)
                note(out, n)
                q = self.env[n.args[0]]
                extra[n.name] = extra.get(n.name, 0.0) + q.numel() / q.shape[-1] * 4.0   # fp32 log-sum-exp
            return out

    with contextlib.ExitStack() as stack:
        stack.enter_context(mode)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        if casts is not None:
            stack.enter_context(torch.autocast("cpu", dtype=autocast_dtype))
            stack.enter_context(casts)
        _Run(gm).run(*args)

    outputs: dict[str, set[int]] = {}
    for src in kept.values():
        if src is not None:
            outputs.setdefault(src[0], set()).add(src[1])
    names = set(outputs) | set(extra) | set(cast_bytes) | {m for m, _ in kept_by}   # views: kept_by alone
    return {n: Saved(frozenset(outputs.get(n, ())), extra.get(n, 0.0),
                     frozenset((i, *w) for (m, i), ws in kept_by.items() if m == n for w in ws),
                     frozenset(cast_bytes.get(n, {}).items())) for n in names}


class _NewBytes(TorchDispatchMode):
    """Sums the bytes of the tensors ops allocate while it is on (fake tensors: nothing is computed)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {id(_root(t)) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(_root(t)) not in seen:
                self.nbytes += _nbytes(t)
                seen.add(id(_root(t)))
        return out


def output_rebuild_bytes(program) -> float:
    """Bytes the runtime allocates when it hands the graph's outputs back in the model's structure
    (``pytree.tree_unflatten`` with the export's output spec, as autopar.runtime.module does): measured on
    fake tensors. Most containers hold the tensors they are given (0 bytes); transformers' DynamicCache is
    rebuilt by ``update``, which concatenates every layer's keys and values onto an empty cache: a copy of
    the whole cache, live at the end of the forward beside the returned tensors."""
    spec = program.call_spec.out_spec
    out_node = next(n for n in program.graph_module.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in pytree.tree_leaves(out_node.args[0])]
    if spec is None:
        return 0.0
    cpu = torch.device("cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        leaves = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=cpu)
                  if isinstance(v, torch.Tensor) else v for v in vals]
        counter = _NewBytes()
        try:
            with counter:
                pytree.tree_unflatten(leaves, spec)
        except Exception as e:   # an output structure that cannot be rebuilt from fake leaves
            log.warning("could not measure the rebuild of the model's outputs (%s: %s); not charged",
                        type(e).__name__, e)
            return 0.0
    return counter.nbytes
