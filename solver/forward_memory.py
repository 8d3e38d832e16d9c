"""An inference plan's memory in the sharding ILP (a part of solver.model's ShardingModel): the activations
live at the forward's peak and this rank's part of the KV cache the caller declares.

Live activations. Inference keeps nothing for backward: a value lives from the op that makes it to its last
use (a graph output to the end), a view (cost.FREE_OPS: views, getitem) is its base's memory and keeps its
base alive. At every op that allocates (not a view), in the captured order, the values live there are its
inputs, its outputs and everything made before and used after it, plus the resharded copies of its inputs
(``add_copy``, recorded by solver.edges on its edge variables, one occurrence each). One continuous L (MiB)
bounds every such set from above,

  L >= sum_{v live at op i} sum_s x_{k(v),s} local_bytes(v, s) + sum_{copies c into op i} b_c y_c,

one row per distinct live set; L enters MemCategory.LIVE and settles to the largest set's bytes. Repeated
blocks run one after another, so a block's values count once, not per block: this is a peak, not a sum.

KV cache. ``kv_cache_bytes`` (autopar.plan's, the cache as one device would hold it: every layer's K and V,
every kv head) is spread evenly over the attention ops (aten.scaled_dot_product_attention, one per layer of
the full model); each op's share is charged per rank under a strategy, half for K and half for V, divided by
the ways that strategy splits the heads (tensor dim -3, [..., heads, seq, head_dim]) of its key and value
input. Any other split (batch, sequence, head_dim) is charged unsplit: the engine shards its cache by heads
alone. MemCategory.KV_CACHE. A declared cache on a graph without such an attention op is a ConfigError: it
could not follow the plan's placements.

Uses the model's public interface only; must not import codegen.
"""
from __future__ import annotations

import torch

from autopar.core.errors import ConfigError
from autopar.core.placement import Shard
from autopar.solver import cost as C
from autopar.solver.model import UNIT, MemCategory, ShardingModel

ATTENTION_OPS = (torch.ops.aten.scaled_dot_product_attention.default,)


class ForwardMemory:
    """The inference memory part (module docstring). ``kv_cache_bytes``: the declared cache, or None."""

    def __init__(self, model: ShardingModel, *, kv_cache_bytes: int | None) -> None:
        self.model, self.kv_cache_bytes = model, kv_cache_bytes
        self.copies: dict[str, list[tuple[float, object]]] = {}   # consumer key -> (bytes, y or x) per copy

    def add_copy(self, consumer: str, nbytes: float, var) -> None:
        """A resharded copy of one input of ``consumer``'s op, ``nbytes`` per rank when ``var`` is 1."""
        if nbytes and var is not None:
            self.copies.setdefault(consumer, []).append((nbytes, var))

    def build(self) -> None:
        self._live()
        if self.kv_cache_bytes:
            self._kv_cache()

    def _value_terms(self, name: str, out: int) -> list[tuple[float, object]]:
        """(MiB, x) per strategy of one value's producer key."""
        m = self.model
        node = m.gi.nodes[name]
        meta = node.outputs[out]
        info = m.keys[node.key]
        return [(C.local_bytes(meta, s.outputs[out], m.mesh.shape) / UNIT, x)
                for s, x in zip(info.strategies, m.x[node.key]) if s.outputs[out] is not None]

    def _live(self) -> None:
        m, gi = self.model, self.model.gi
        names = list(gi.nodes)
        pos = {n: i for i, n in enumerate(names)}
        root: dict[tuple[str, int], tuple[str, int]] = {}
        last: dict[tuple[str, int], int] = {}
        for name, g in gi.nodes.items():
            for ref in g.inputs:
                r = root.get((ref.src, ref.out))
                if r is not None:
                    last[r] = max(last.get(r, -1), pos[name])
            for o, meta in enumerate(g.outputs):
                if meta is None or g.kind not in ("op", "input"):
                    continue   # parameters are MemCategory.PARAMS; buffers are not activations
                if g.kind == "op" and g.target in C.FREE_OPS and g.inputs:
                    base = root.get((g.inputs[0].src, g.inputs[0].out))
                    if base is not None:   # a view of a parameter or buffer is no activation
                        root[(name, o)] = base
                else:
                    root[(name, o)] = (name, o)
                    last.setdefault((name, o), pos[name])
        for ref in gi.output_refs:
            r = root.get((ref.src, ref.out))
            if r is not None:
                last[r] = len(names)
        rows: dict[tuple, list] = {}
        for name, g in gi.nodes.items():
            if g.kind != "op" or g.target in C.FREE_OPS:
                continue
            i = pos[name]
            live = frozenset(r for r, end in last.items() if pos[r[0]] <= i <= end)
            sig = (live, g.key if g.key in self.copies else None)
            if sig in rows:
                continue
            terms = [t for r in sorted(live) for t in self._value_terms(*r)]
            terms += [(b / UNIT, v) for b, v in self.copies.get(g.key, ())]
            rows[sig] = terms
        rows = {s: t for s, t in rows.items() if t}
        if not rows:
            return
        peak = m.var("forward_live", lowBound=0)   # MiB (UNIT)
        for i, terms in enumerate(rows.values()):
            m.add_row(peak >= sum(c * x for c, x in terms), f"forward_live_{i}")
        m.add_mem(MemCategory.LIVE, [(UNIT, peak)])
        m.settle_max(peak, list(rows.values()))

    def _kv_cache(self) -> None:
        m = self.model
        attn = [info for info in m.keys.values() if info.node.kind == "op" and info.node.target in ATTENTION_OPS]
        if not attn:
            raise ConfigError("kv_cache_bytes was given but the captured graph has no attention op "
                              "(aten.scaled_dot_product_attention) whose head placement the KV cache follows; "
                              "leave kv_cache_bytes out and lower memory_budget by the cache's size instead")
        share = self.kv_cache_bytes / sum(info.mult for info in attn)   # per attention op of the full model
        for info in attn:
            for s, x in zip(info.strategies, m.x[info.key]):
                nbytes = sum(share / 2 / self._head_split(info.in_metas[a], s.inputs[a]) for a in (1, 2))
                m.add_mem(MemCategory.KV_CACHE, [(info.mult * nbytes, x)])

    def _head_split(self, meta, placements) -> int:
        """How many ways ``placements`` split the heads dim (-3) of an attention input."""
        heads = len(meta.shape) - 3
        return C.shard_factor(tuple(p if isinstance(p, Shard) and p.dim % len(meta.shape) == heads else None
                                    for p in placements), self.model.mesh.shape)
