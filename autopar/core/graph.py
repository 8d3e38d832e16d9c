"""Graph index: stable keys, repeated-layer structure and tensor edges of a captured graph.

Every node gets a key that does not depend on how many layers were captured, so a plan made on
a graph whose repeated blocks were folded (captured with two of eighty layers) applies to the
full graph:

* placeholders: ``param:<fqn>``, ``buffer:<fqn>``, ``input:<name>``;
* ops outside repeated layers: ``<module path>/<op>#<ordinal>`` (``lm_head/linear#0``);
* ops inside the repeated blocks of a ModuleList ``blocks``: ``blocks.*/<path in block>/<op>#<ordinal>``
  when the block is structurally the same as the list's other blocks (they then share solver
  variables), ``blocks.3/...`` when it differs.

A list's shared blocks are the run of identical blocks it ends with (at least two, or every block); up to
``MAX_HEAD_BLOCKS`` blocks before them may differ (T5's block 0 holds the relative-position bias): that head
is keyed by index (``blocks.0/...``), stands for itself alone, and its nodes have no ``layer`` (they are
planned as the ops outside the lists are). A capture with folded blocks holds the head and two of the shared
blocks. Parameter FQNs of shared layers are keyed with ``*`` for the layer index. This module imports only
autopar's core and must not decide anything: it describes the graph.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import fx

from autopar.core.capture import MAX_HEAD_BLOCKS, CapturedModel

_LAYER = re.compile(r"^(?P<list>.+?)\.(?P<idx>\d+)(?:\.|$)")


@dataclass(frozen=True, kw_only=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * (torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point
                             else (1 if self.dtype == torch.bool else torch.iinfo(self.dtype).bits // 8))


@dataclass(frozen=True, kw_only=True)
class InputRef:
    """A tensor argument of a node: which producer, which of its outputs."""
    src: str          # producer node name
    out: int          # index into the producer's outputs


@dataclass(kw_only=True)
class GNode:
    name: str
    key: str
    kind: str                                  # "param" | "buffer" | "input" | "op"
    target: object                             # the ATen overload for ops, None for placeholders
    outputs: tuple[TensorMeta | None, ...]
    inputs: tuple[InputRef, ...]
    fqns: tuple[str, ...] = ()                 # parameter/buffer FQNs
    module_path: str = ""
    layer: tuple[str, int] | None = None       # (list fqn, index) for nodes inside a repeated block (not a head)
    fx_node: fx.Node | None = None


@dataclass(kw_only=True)
class GraphIndex:
    nodes: dict[str, GNode]                    # by fx node name, graph order
    layer_counts: dict[str, int]               # list fqn -> true number of (shared) blocks (folded or not)
    observed_counts: dict[str, int]            # list fqn -> (shared) blocks present in this graph
    shared_lists: set[str] = field(default_factory=set)
    output_refs: tuple[InputRef, ...] = ()
    heads: dict[str, int] = field(default_factory=dict)         # shared list -> leading captured blocks that differ
    first_shared: dict[str, int] = field(default_factory=dict)  # shared list -> index of its first shared block

    def block_name(self, lst: str, i: int) -> str:
        """The module FQN of the i-th shared block of ``lst`` (counted from the first block this graph holds,
        after the list's head)."""
        return f"{lst}.{self.heads.get(lst, 0) + i}"

    def shared_list_of(self, fqn: str) -> str | None:
        """The shared list whose shared blocks hold ``fqn`` (a parameter or module FQN); None outside them,
        a list's head included."""
        lay = _layer_of_path(fqn)
        if lay is None or lay[0] not in self.shared_lists:
            return None
        return lay[0] if lay[1] >= self.first_shared.get(lay[0], 0) else None

    def full_fqns(self, fqn: str) -> list[str]:
        """A captured FQN -> the FQNs it stands for in the full model (every shared block of a folded list)."""
        lst = self.shared_list_of(fqn)
        if lst is None or self.observed_counts[lst] == self.layer_counts[lst]:
            return [fqn]   # every block was captured: the names are the model's (a pipeline stage: blocks 4..7)
        rest = _layer_of_path(fqn)[2].lstrip(".")
        return [f"{self.block_name(lst, i)}.{rest}" if rest else self.block_name(lst, i)
                for i in range(self.layer_counts[lst])]

    def by_key(self) -> dict[str, list[GNode]]:
        out: dict[str, list[GNode]] = defaultdict(list)
        for n in self.nodes.values():
            out[n.key].append(n)
        return out

    def multiplicity(self, key: str, members: list[GNode]) -> float:
        """How many nodes of the full model this key stands for."""
        lay = members[0].layer
        if lay is not None and lay[0] in self.shared_lists:
            return float(self.layer_counts[lay[0]])
        return float(len(members))

    def edge_classes(self) -> dict[tuple[str, int, str, int], float]:
        """(producer key, output index, consumer key, argument index) -> multiplicity in the full model."""
        seen: dict[tuple[str, int, str, int], list[tuple[GNode, GNode]]] = defaultdict(list)
        for v in self.nodes.values():
            for ai, ref in enumerate(v.inputs):
                u = self.nodes[ref.src]
                seen[(u.key, ref.out, v.key, ai)].append((u, v))
        return {cls: self._edge_weight(inst) for cls, inst in seen.items()}

    def _edge_weight(self, inst: list[tuple[GNode, GNode]]) -> float:
        u, v = inst[0]
        lu = u.layer if u.layer and u.layer[0] in self.shared_lists else None
        lv = v.layer if v.layer and v.layer[0] in self.shared_lists else None
        if lu is None and lv is None:
            return float(len(inst))
        group = (lu or lv)[0]
        true_n, seen_n = self.layer_counts[group], self.observed_counts[group]
        if lu is not None and lv is not None and lu[0] == lv[0]:
            if lu[1] == lv[1]:
                return len(inst) * true_n / seen_n
            if seen_n > 1 and lv[1] == lu[1] + 1:
                return len(inst) * (true_n - 1) / (seen_n - 1)
            return float(len(inst))
        if len(inst) == seen_n and seen_n > 1:
            return float(true_n)
        return float(len(inst))


def tensor_outputs(node: fx.Node) -> tuple[TensorMeta | None, ...]:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else (val,)
    return tuple(TensorMeta(shape=tuple(int(s) for s in v.shape), dtype=v.dtype) if isinstance(v, torch.Tensor)
                 else None for v in vals)


def tensor_inputs(node: fx.Node) -> tuple[InputRef, ...]:
    refs = []
    if node.target is __import__("operator").getitem:
        src, idx = node.args[0], node.args[1]
        return (InputRef(src=src.name, out=int(idx)),)
    for a in pytree.tree_leaves((node.args, node.kwargs)):
        if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
            refs.append(InputRef(src=a.name, out=0))
    return tuple(refs)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [p for p, _ in stack.values()]
    return paths[-1] if paths else ""


def _layer_of_path(path: str) -> tuple[str, int, str] | None:
    m = _LAYER.match(path)
    if not m:
        return None
    rest = path[m.end():]
    return m.group("list"), int(m.group("idx")), rest


def op_name(target: object) -> str:
    if target is __import__("operator").getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def index_graph(cap: CapturedModel) -> GraphIndex:
    graph = cap.graph
    nodes: dict[str, GNode] = {}
    layer_members: dict[tuple[str, int], list[GNode]] = defaultdict(list)
    for n in graph.nodes:
        if n.op == "output":
            continue
        outs = tensor_outputs(n)
        if n.op == "placeholder":
            if n.name in cap.param_fqns:
                kind, fqns = "param", cap.param_fqns[n.name]
            elif n.name in cap.buffer_fqns:
                kind, fqns = "buffer", (cap.buffer_fqns[n.name],)
            elif n.name in cap.constant_fqns:      # a lifted constant: planned as a buffer is
                kind, fqns = "buffer", (cap.constant_fqns[n.name],)
            else:
                kind, fqns = "input", ()
            lay = _layer_of_path(fqns[0]) if fqns else None
            g = GNode(name=n.name, key="", kind=kind, target=None, outputs=outs, inputs=(), fqns=fqns,
                      module_path=fqns[0].rsplit(".", 1)[0] if fqns else "",
                      layer=(lay[0], lay[1]) if lay else None, fx_node=n)
        else:
            if all(o is None for o in outs):
                continue  # asserts and other ops with no tensor output: passed through untouched
            path = _module_path(n)
            lay = _layer_of_path(path)
            g = GNode(name=n.name, key="", kind="op", target=n.target, outputs=outs, inputs=tensor_inputs(n),
                      module_path=path, layer=(lay[0], lay[1]) if lay else None, fx_node=n)
        nodes[n.name] = g
        if g.layer:
            layer_members[g.layer].append(g)
    # drop inputs that refer to skipped nodes
    for g in nodes.values():
        g.inputs = tuple(r for r in g.inputs if r.src in nodes)

    # relative keys within a block, then signatures to decide sharing
    rel: dict[str, str] = {}
    for (lst, idx), members in layer_members.items():
        ordinal: dict[str, int] = defaultdict(int)
        prefix = f"{lst}.{idx}"
        for g in members:
            if g.kind == "op":
                sub = g.module_path[len(prefix):].lstrip(".")
                base = f"{sub}/{op_name(g.target)}" if sub else op_name(g.target)
                rel[g.name] = f"{base}#{ordinal[base]}"
                ordinal[base] += 1
            elif g.name in cap.constant_fqns:
                # a lifted constant's name carries a model-wide counter (``lifted_tensor_7``): name it by its
                # module and its ordinal within the block instead, so identical blocks get identical keys
                sub = g.module_path[len(prefix):].lstrip(".")
                base = f"{sub}.constant" if sub else "constant"
                rel[g.name] = f"{g.kind}:{base}#{ordinal[base]}"
                ordinal[base] += 1
            else:
                rel[g.name] = f"{g.kind}:{g.fqns[0][len(prefix):].lstrip('.')}"

    def signature(members: list[GNode]) -> tuple:
        names = {g.name for g in members}
        return tuple((rel[g.name], g.outputs, tuple(rel[r.src] if r.src in names else "ext" for r in g.inputs))
                     for g in members)

    # a list's shared blocks: the run of identical blocks it ends with, when that is every block or at least two
    # after a head of at most MAX_HEAD_BLOCKS differing ones
    sigs: dict[str, list[tuple[int, tuple]]] = defaultdict(list)
    for (lst, idx), members in sorted(layer_members.items(), key=lambda kv: kv[0][1]):
        sigs[lst].append((idx, signature(members)))
    heads: dict[str, int] = {}
    for lst, seq in sigs.items():
        j = len(seq) - 1
        while j > 0 and seq[j - 1][1] == seq[-1][1]:
            j -= 1
        if j == 0 or (len(seq) - j >= 2 and j <= MAX_HEAD_BLOCKS):
            heads[lst] = j
    shared_lists = set(heads)
    head_blocks = {(lst, sigs[lst][i][0]) for lst, j in heads.items() for i in range(j)}
    first_shared = {lst: sigs[lst][j][0] for lst, j in heads.items()}
    observed = {lst: len(seq) - heads.get(lst, 0) for lst, seq in sigs.items()}
    true_counts = {lst: cap.folded_layers.get(lst, len(seq)) - heads.get(lst, 0) for lst, seq in sigs.items()}

    ordinal_outside: dict[str, int] = defaultdict(int)
    for g in nodes.values():
        if g.layer is not None:
            lst, idx = g.layer
            tag = "*" if lst in shared_lists and (lst, idx) not in head_blocks else str(idx)
            r = rel[g.name]
            if g.kind == "op":
                g.key = f"{lst}.{tag}/{r}"
            else:
                kind, sub = r.split(":", 1)
                g.key = f"{kind}:{lst}.{tag}.{sub}"
            if (lst, idx) in head_blocks:   # a head block stands for itself: planned as ops outside the lists are
                g.layer = None
        elif g.kind == "op":
            base = f"{g.module_path or 'root'}/{op_name(g.target)}"
            g.key = f"{base}#{ordinal_outside[base]}"
            ordinal_outside[base] += 1
        elif g.kind == "input":
            g.key = f"input:{g.name}"
        elif g.name in cap.constant_fqns:
            # a lifted constant outside the blocks: its name's model-wide counter depends on how many blocks
            # were captured, so it is keyed by its module and its ordinal there (as ops are)
            base = f"{g.module_path or 'root'}.constant"
            g.key = f"{g.kind}:{base}#{ordinal_outside[base]}"
            ordinal_outside[base] += 1
        else:
            g.key = f"{g.kind}:{g.fqns[0]}"
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_refs = tuple(InputRef(src=a.name, out=0) for a in pytree.tree_leaves(out_node.args)
                     if isinstance(a, fx.Node) and a.name in nodes)
    return GraphIndex(nodes=nodes, layer_counts=true_counts, observed_counts=observed, shared_lists=shared_lists,
                      output_refs=out_refs, heads={k: v for k, v in heads.items() if v},
                      first_shared={k: v for k, v in first_shared.items() if heads[k]})


def folding_problem(cap: CapturedModel, gi: GraphIndex) -> str | None:
    """Why a capture with folded blocks does not stand for the whole model (None: it does). Folding is
    exact only when the captured blocks of each folded list after its head are the same graph (they share keys,
    which the plan expands to every block after the head) and no output of the model comes from inside a shared
    block (per-layer outputs, such as a key/value cache or hidden states of every layer, would be missing)."""
    for lst in cap.folded_layers:
        if lst not in gi.shared_lists:
            return f"the captured blocks of {lst!r} are not the same graph"
    for ref in gi.output_refs:
        g = gi.nodes[ref.src]
        if g.layer is not None and g.layer[0] in cap.folded_layers:
            return f"an output of the model ({ref.src}) is computed inside a block of {g.layer[0]!r}"
    return None
