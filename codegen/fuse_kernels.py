"""Pass: replace fusible subgraphs by calls to ``autopar.runtime_kernels`` (fewer memory round trips).

Rewrite rules, tried at every node in graph order (pattern -> replacement; every interior node of a
pattern must have no users outside it, else the pattern is left alone):

* ``rms_norm(add(a, b), ...)``                          -> ``add_norm(a, b, w, eps)`` (sum and normed sum)
* ``rms_norm(x, ...)`` and its decomposition
  ``[w *] (x * rsqrt(mean(x ** 2, -1, keepdim) + eps))`` -> ``rms_norm(x, (n,), w, eps)``
* ``layer_norm(x, ...)``                                -> ``layer_norm``
* ``gelu(add(x, bias))`` / ``gelu(linear(x, W, bias))``  -> ``bias_gelu(x, bias)`` / ``bias_gelu(linear(x, W), bias)``
* ``mul(silu(g), u)``                                   -> ``swiglu(g, u)``
* ``x * cos + cat(-x2, x1) * sin`` (x1, x2 halves of x by chunk or slice) -> ``rotary(x, cos, sin)``
* ``cross_entropy_loss(logits, target)`` (no class weights, no smoothing) -> ``cross_entropy``
* ``parallel_ops.sharded_cross_entropy`` with a split vocabulary -> :func:`sharded_cross_entropy`
  (runtime_kernels' vocabulary-parallel form: one all-reduce of the row statistics)

Runs last, on the local-shard graph (after localize_shapes): a pattern only matches where no
reshard sits between its ops, so each fused op sees the same local tensors the plain ops did.
Applied fusions are listed in ``gm.meta["autopar_fusions"]`` as ``{"kind", "nodes"}``.
``find_fusions`` runs the same rules without rewriting (the front end gives its result, as node
names, to the planner, which must not import codegen, to cost the fused kernels' traffic).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

import autopar.runtime_kernels as rk
from autopar.codegen.context import ShardingContext
from autopar.core.placement import Shard
from autopar.ops import parallel_ops
from autopar.runtime_kernels import cross_entropy, vocab_parallel_cross_entropy

aten = torch.ops.aten
_ASSERT = aten._assert_tensor_metadata.default


@dataclass
class Fusion:
    kind: str
    fn: object                        # the runtime_kernels function the new node calls
    args: tuple
    root: fx.Node                     # the node whose value the fused op produces (output 0)
    interior: list[fx.Node] = field(default_factory=list)   # replaced nodes other than the root
    extra: fx.Node | None = None      # a replaced node whose value is the fused op's output 1

    def members(self) -> list[fx.Node]:
        """The nodes whose work the fused op does (interior, extra, root; a linear whose bias moves
        into ``bias_gelu`` keeps its matmul and is not one)."""
        return [*self.interior, *([self.extra] if self.extra is not None else []), self.root]


def _users(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if u.target is not _ASSERT]


def _only_used_by(n: object, user: fx.Node) -> bool:
    return isinstance(n, fx.Node) and _users(n) == [user]


def _is(n: object, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _shape(n: object) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


# --- rules: each returns a Fusion or None ----------------------------------------------------------
def match_norm(node: fx.Node, rk) -> Fusion | None:
    if _is(node, aten.layer_norm.default):
        x, shape, w, b, eps = (_arg(node, i, k, d) for i, k, d in
                               ((0, "input", None), (1, "normalized_shape", None), (2, "weight", None),
                                (3, "bias", None), (4, "eps", 1e-5)))
        return Fusion("layer_norm", rk.layer_norm, (x, list(shape), w, b, eps), node)
    if not _is(node, aten.rms_norm.default):
        return None
    x, shape, w, eps = (_arg(node, i, k) for i, k in ((0, "input"), (1, "normalized_shape"), (2, "weight"),
                                                      (3, "eps")))
    if (len(shape) == 1 and _is(x, aten.add.Tensor) and len(x.args) == 2 and not x.kwargs
            and all(_shape(a) == _shape(x) for a in x.args) and _later_users_only(x, node)):
        return Fusion("add_norm", rk.add_norm, (x.args[0], x.args[1], w, eps), node, [], extra=x)
    return Fusion("rms_norm", rk.rms_norm, (x, list(shape), w, eps), node)


def _later_users_only(n: fx.Node, root: fx.Node) -> bool:
    """Every user of n other than root comes after root (the fused node is placed at root)."""
    after = False
    for m in root.graph.nodes:
        if m is root:
            after = True
        elif m in n.users and not after:
            return False
    return True


def match_rms_decomposed(node: fx.Node, rk, local_dim) -> Fusion | None:
    """``mul(h, rsqrt(add(mean(pow(h, 2), [-1], True), eps)))`` [-> no-op to(dtype)] [-> mul(weight, .)]."""
    if not _is(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    h, r = node.args if _is(node.args[1], aten.rsqrt.default) else node.args[::-1]
    if not (_is(r, aten.rsqrt.default) and _only_used_by(r, node)):
        return None
    add = r.args[0]
    if not (_is(add, aten.add.Tensor) and _only_used_by(add, r) and isinstance(add.args[1], (int, float))):
        return None
    mean = add.args[0]
    if not (_is(mean, aten.mean.dim) and _only_used_by(mean, add) and list(mean.args[1]) in ([-1], [len(_shape(h) or ()) - 1])
            and _arg(mean, 2, "keepdim", False)):
        return None
    pw = mean.args[0]
    if not (_is(pw, aten.pow.Tensor_Scalar) and _only_used_by(pw, mean) and pw.args[0] is h and pw.args[1] == 2):
        return None
    interior, root, weight = [pw, mean, add, r], node, None
    # a no-op dtype conversion then a weight multiply belong to the norm as well
    nxt = _users(root)
    if len(nxt) == 1 and _is(nxt[0], aten.to.dtype) and _dtype(nxt[0]) == _dtype(root):
        if len(_users(nxt[0])) == 1:
            interior, root, nxt = interior + [root], nxt[0], _users(nxt[0])
    if len(nxt) == 1 and _is(nxt[0], aten.mul.Tensor) and len(nxt[0].args) == 2:
        other = [a for a in nxt[0].args if a is not root]
        if (len(other) == 1 and _shape(other[0]) is not None and len(_shape(other[0])) == 1
                and _dtype(other[0]) == _dtype(root) == _dtype(nxt[0])):
            interior, root, weight = interior + [root], nxt[0], other[0]
    return Fusion("rms_norm", rk.rms_norm, (h, [local_dim(h)], weight, float(add.args[1])), root, interior)


def _dtype(n: object):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def match_bias_gelu(node: fx.Node, rk) -> Fusion | None:
    if not _is(node, aten.gelu.default):
        return None
    x, approx = node.args[0], _arg(node, 1, "approximate", "none")
    if _is(x, aten.add.Tensor) and _only_used_by(x, node) and len(x.args) == 2 and not x.kwargs:
        a, b = x.args
        if _shape(b) is not None and len(_shape(b)) == 1 and _shape(a) and _shape(a)[-1:] == _shape(b):
            return Fusion("bias_gelu", rk.bias_gelu, (a, b, approx), node, [x])
    if _is(x, aten.linear.default) and _only_used_by(x, node) and _arg(x, 2, "bias") is not None:
        return Fusion("bias_gelu", rk.bias_gelu, (x, _arg(x, 2, "bias"), approx), node, [], extra=None)
    return None


def match_swiglu(node: fx.Node, rk) -> Fusion | None:
    if not _is(node, aten.mul.Tensor) or len(node.args) != 2:
        return None
    for s, u in (node.args, node.args[::-1]):
        if _is(s, aten.silu.default) and _only_used_by(s, node) and _shape(s.args[0]) == _shape(u) is not None:
            return Fusion("swiglu", rk.swiglu, (s.args[0], u), node, [s])
    return None


def _halves(cat: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """cat([-x2, x1], -1) with x1, x2 the halves of one x (chunk or slice): (x, interior nodes)."""
    parts, dim = cat.args[0], _arg(cat, 1, "dim", 0)
    if len(parts) != 2 or not _is(parts[0], aten.neg.default) or not _only_used_by(parts[0], cat):
        return None
    x2, x1 = parts[0].args[0], parts[1]
    ndim = len(_shape(cat) or ())
    if dim not in (-1, ndim - 1) or not (_only_used_by(x1, cat) and _only_used_by(x2, parts[0])):
        return None
    if all(n.target is operator.getitem for n in (x1, x2)) and x1.args[0] is x2.args[0] \
            and (x1.args[1], x2.args[1]) == (0, 1):
        ch = x1.args[0]
        if _is(ch, aten.chunk.default) and ch.args[1] == 2 and _arg(ch, 2, "dim", 0) in (-1, ndim - 1) \
                and set(_users(ch)) == {x1, x2}:
            return ch.args[0], [parts[0], x1, x2, ch]
    if _is(x1, aten.slice.Tensor) and _is(x2, aten.slice.Tensor) and x1.args[0] is x2.args[0]:
        x, d = x1.args[0], (_shape(x1.args[0]) or (0,))[-1]
        if (all(s.args[1] in (-1, ndim - 1) for s in (x1, x2)) and tuple(x1.args[2:4]) == (0, d // 2)
                and x2.args[2] == d // 2 and x2.args[3] >= d and d % 2 == 0):
            return x, [parts[0], x1, x2]
    return None


def match_rotary(node: fx.Node, rk) -> Fusion | None:
    if not _is(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs:
        return None
    for m_cos, m_sin in (node.args, node.args[::-1]):
        if not (_is(m_cos, aten.mul.Tensor) and _is(m_sin, aten.mul.Tensor) and _only_used_by(m_cos, node)
                and _only_used_by(m_sin, node)):
            continue
        for cat, sin in (m_sin.args, m_sin.args[::-1]):
            if not (_is(cat, aten.cat.default) and _only_used_by(cat, m_sin)):
                continue
            found = _halves(cat)
            if found is None or found[0] not in m_cos.args:
                continue
            x, inner = found
            cos = m_cos.args[1] if m_cos.args[0] is x else m_cos.args[0]
            if _shape(node) != _shape(x):
                continue
            return Fusion("rotary", rk.rotary, (x, cos, sin), node, [m_cos, m_sin, cat] + inner)
    return None


def match_cross_entropy(node: fx.Node, rk) -> Fusion | None:
    if _is(node, aten.cross_entropy_loss.default):
        logits, target = node.args[0], node.args[1]
        weight, reduction = _arg(node, 2, "weight"), _arg(node, 3, "reduction", 1)
        ignore, smoothing = _arg(node, 4, "ignore_index", -100), _arg(node, 5, "label_smoothing", 0.0)
        if weight is None and smoothing == 0.0 and reduction in (0, 1, 2) and len(_shape(logits) or ()) == 2:
            return Fusion("cross_entropy", rk.cross_entropy,
                          (logits, target, ignore, ("none", "mean", "sum")[reduction]), node)
    if node.op == "call_function" and node.target is parallel_ops.sharded_cross_entropy:
        return Fusion("vocab_parallel_cross_entropy", sharded_cross_entropy, tuple(node.args), node)
    return None


# --- the pass ------------------------------------------------------------------------------------
def _match(node: fx.Node, rk, local_dim) -> Fusion | None:
    return (match_norm(node, rk) or match_rms_decomposed(node, rk, local_dim) or match_bias_gelu(node, rk)
            or match_swiglu(node, rk) or match_rotary(node, rk) or match_cross_entropy(node, rk))


def find_fusions(gm: fx.GraphModule, ctx_or_plan=None) -> list[Fusion]:
    """Recognition only (the graph is not changed): the fusions ``fuse_kernels`` would apply to ``gm``,
    tried in the same graph order, a node taking part in at most one. On the captured graph (before
    any reshard is inserted) this is what the front end hands the planner to cost fused traffic."""

    local_dim = _local_last_dim(ctx_or_plan)
    taken: set[fx.Node] = set()
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node in taken:
            continue
        fusion = _match(node, rk, local_dim)
        if fusion is None or any(n in taken for n in fusion.members()):
            continue                    # a node already fused away is gone in fuse_kernels too
        taken.update(fusion.members())
        found.append(fusion)
    return found


def fuse_kernels(gm: fx.GraphModule, ctx_or_plan=None) -> fx.GraphModule:
    """Requires: a graph of ATen ops (captured, or rewritten by the earlier passes on local shards);
    ``ctx_or_plan``: the ShardingContext (gives local sizes; None or a Plan: the graph is unsharded).
    Ensures: every matched pattern is one call of a runtime_kernels function with the same values
    (tuple-valued fused ops are read through getitem), the replaced nodes are gone, and
    ``gm.meta["autopar_fusions"]`` lists {"kind", "nodes"} per applied fusion."""

    local_dim = _local_last_dim(ctx_or_plan)
    applied = []
    for node in list(gm.graph.nodes):
        if node._erased or node.op != "call_function":
            continue                    # erased by an earlier fusion
        fusion = _match(node, rk, local_dim)
        if fusion is not None:
            applied.append(_apply(gm, fusion))
    gm.recompile()
    gm.meta["autopar_fusions"] = gm.meta.get("autopar_fusions", []) + applied
    return gm


def _apply(gm: fx.GraphModule, f: Fusion) -> dict:
    g, root = gm.graph, f.root
    replaced = [n.name for n in f.interior] + ([f.extra.name] if f.extra is not None else []) + [root.name]
    if f.kind == "bias_gelu" and _is(f.args[0], aten.linear.default):
        lin = f.args[0]                  # the linear keeps its matmul; its bias moves into the fused op
        lin.args, lin.kwargs = lin.args[:2], {}
        replaced.insert(0, lin.name)
    with g.inserting_before(root):
        new = g.call_function(f.fn, f.args)
    new.name = _fresh_name(g, f"fused_{f.kind}")
    if f.extra is not None:               # two outputs: (output 0 for root, output 1 for extra)
        with g.inserting_after(new):
            out0 = g.call_function(operator.getitem, (new, 0))
            out1 = g.call_function(operator.getitem, (new, 1))
        out0.meta["val"], out1.meta["val"] = root.meta.get("val"), f.extra.meta.get("val")
        new.meta["val"] = (root.meta.get("val"), f.extra.meta.get("val"))
        root.replace_all_uses_with(out0)
        f.extra.replace_all_uses_with(out1)
    else:
        new.meta["val"] = root.meta.get("val")
        root.replace_all_uses_with(new)
    position = {n: i for i, n in enumerate(g.nodes)}
    for n in sorted((n for n in [root, f.extra, *f.interior] if n is not None), key=position.get, reverse=True):
        for u in [u for u in n.users if u.target is _ASSERT]:
            g.erase_node(u)
        g.erase_node(n)   # users first: reverse graph order
    return {"kind": f.kind, "nodes": replaced}


def _fresh_name(g: fx.Graph, base: str) -> str:
    names = {n.name for n in g.nodes}
    name, i = base, 0
    while name in names:
        i += 1
        name = f"{base}_{i}"
    g._graph_namespace._used_names.add(name)
    return name


def _local_last_dim(ctx_or_plan):
    """node -> size of its last dim on this rank."""

    def local_dim(n: fx.Node) -> int:
        shape = _shape(n)
        if isinstance(ctx_or_plan, ShardingContext) and n.name in ctx_or_plan.shardings:
            shape = parallel_ops.local_shape(shape, ctx_or_plan.output_sharding(n.name), ctx_or_plan.mesh_shape)
        return int(shape[-1])

    return local_dim


# --- runtime: the fused form of parallel_ops.sharded_cross_entropy --------------------------------
def sharded_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mesh, logits_sharding: str,
                          ignore_index: int = -100, reduction: int = 1, replicated: bool = False) -> torch.Tensor:
    """``parallel_ops.sharded_cross_entropy`` (same arguments and result) with the per-row losses from
    runtime_kernels: the vocabulary-parallel kernel form where the classes are split (one all-reduce
    of the row statistics per vocab-splitting mesh dim), the plain fused kernel where only rows are."""

    sh = parallel_ops.placements(logits_sharding)
    batch_dims = [d for d, p in enumerate(sh) if p == Shard(0)]
    vocab_dims = [d for d, p in enumerate(sh) if p == Shard(1)]
    valid = target != ignore_index
    if vocab_dims:
        vocab = logits.shape[1] * math.prod(mesh.size(d) for d in vocab_dims)
        start, _ = parallel_ops.local_range(vocab, 1, sh, mesh)
        loss = vocab_parallel_cross_entropy(logits, target, start, [mesh.get_group(d) for d in vocab_dims],
                                            ignore_index)
    else:
        loss = cross_entropy(logits, target, ignore_index, reduction="none").float()
    if reduction == 0:
        return loss.to(logits.dtype)
    return parallel_ops.rows_reduced(loss.sum(), valid.sum(), mesh, batch_dims, reduction, replicated
                                     ).to(logits.dtype)
