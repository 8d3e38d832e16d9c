"""Edges of the sharding ILP and the loss's first gradient (parts of solver.model's ShardingModel).

``add_edge_vars``: per edge class e (producer key u, output o, consumer key v, argument a; multiplicity
m_e), continuous y_{e,p,q} from the producer's placement groups p to the consumer's (required input
placement, split mesh dims) groups q, with the two marginal rows tying y to both sides' one-hots; an
edge whose side has a single group needs no y (its cost rides on the other side's x), and a merged
follower's edge rides on the follower's own x. Each (p, q) carries the resharding time
(TimeCategory.COMM; the data-parallel gradient all-reduce of a parameter included, bucketed), the
copy a consumer keeps for backward (MemCategory.ACTIVATIONS, or solver.remat's block records inside a
repeated block), the backward collective of the loss's gradient (BACKWARD_GRAD) and what recompute
needs to know (solver.remat's ``comm`` / ``grad_comm`` / ``kept_copy`` records).
``add_backward_start_grad``: the loss's first gradient at the backward start; ``add_model_outputs``: the
outputs the caller holds. An inference ILP
(``live``, solver.forward_memory) prices the forward resharding alone, keeps nothing for backward and
records each resharded copy with its consumer for the live-activation rows. Uses the model's public
interface only; must not import codegen.
"""
from __future__ import annotations

import functools
from collections import defaultdict

import pulp

from autopar.core.graph import GNode, GraphIndex
from autopar.core.placement import Placement, Replicate
from autopar.core.runtime_rules import reducer_candidate
from autopar.solver import cost as C
from autopar.solver.forward_memory import ForwardMemory
from autopar.solver.keys import OUTPUT, kept_copy
from autopar.solver.model import MemCategory, ShardingModel, TimeCategory
from autopar.solver.remat import Remat

# a loss whose backward holds several input-sized gradients at once: cross-entropy's nll_loss backward
# makes the gradient of the log-probabilities, log_softmax's backward the logits' one from it (both live)
BACKWARD_START_COPIES = {C.aten.cross_entropy_loss.default: 2}


def add_backward_start_grad(m: ShardingModel) -> None:
    """The gradient backward creates first (e.g. of the logits, from the loss) is live at the backward
    start with every kept activation: per strategy of the graph output's producer, the local bytes of
    its largest floating-point input, times the copies its backward holds at once
    (BACKWARD_START_COPIES; MemCategory.BACKWARD_GRAD, backward-start row)."""
    for ref in m.gi.output_refs:
        node = m.gi.nodes[ref.src]
        out = node.outputs[ref.out] if node.outputs else None
        if node.kind != "op" or out is None or not out.dtype.is_floating_point or len(out.shape) > 0:
            continue   # only a scalar loss starts backward
        info = m.keys[node.key]
        copies = BACKWARD_START_COPIES.get(node.target, 1)
        for j, s in enumerate(info.strategies):
            # at the loss's dtype where autocast computes it above its input's (bf16 logits, fp32 cross-entropy)
            b = copies * max((C.local_bytes(t, p, m.mesh.shape) * max(1.0, out.dtype.itemsize / t.dtype.itemsize)
                              for t, p in zip(info.in_metas, s.inputs)
                              if t is not None and p is not None and t.dtype.is_floating_point), default=0.0)
            if b:
                m.add_mem(MemCategory.BACKWARD_GRAD, [(b, m.x[node.key][j])])


def add_model_outputs(m: ShardingModel) -> None:
    """The model's outputs as the caller gets them: replicated (codegen's insert_collectives), and held at
    least from the end of the forward until the caller takes the loss (``out = model(**batch);
    out.loss.backward()`` holds them through backward). A bare HF model returns its logits and, with the
    default ``use_cache``, every layer's keys and values. Per strategy of an output's producer: the whole
    tensor where the producer's placement is not replicated (the gathered copy), or where it is but autograd
    does not keep that tensor itself (KeyInfo.kept_outputs; a kept one is charged already, and stays charged
    where a consumer keeps a resharded copy instead: add_edge_vars; a view, such as a key cache made by a
    transpose, is charged whole); MemCategory.MODEL_OUTPUTS, backward-start row. A loop that holds the output object
    through the optimizer step holds these bytes there too: not charged (``use_cache=False`` drops the cache). On
    top, a constant: what rebuilding the output structure allocates (``m.output_rebuild_bytes``, measured by
    solver.saved.output_rebuild_bytes: transformers' DynamicCache copies every key and value when it is rebuilt).
    """
    if getattr(m, "output_rebuild_bytes", 0.0):
        m.add_mem(MemCategory.MODEL_OUTPUTS, [(float(m.output_rebuild_bytes), None)])
    for ref in m.gi.output_refs:
        node = m.gi.nodes[ref.src]
        meta = node.outputs[ref.out] if node.outputs else None
        if meta is None or len(meta.shape) == 0 or node.key not in m.x:
            continue
        info = m.keys[node.key]
        kept = info.kept_outputs is None or ref.out in info.kept_outputs
        for j, s in enumerate(info.strategies):
            whole = all(isinstance(p, Replicate) for p in s.outputs[ref.out])
            if not (whole and kept):
                m.add_mem(MemCategory.MODEL_OUTPUTS, [(float(meta.nbytes), m.x[node.key][j])])


def _returned_fraction(m: ShardingModel) -> dict[tuple[str, int], float]:
    """(key, output) -> the fraction of the key's occurrences whose output is a model output (a bare HF
    model returns every layer's keys and values: all of them; its last hidden state: one of N)."""
    count: dict[tuple[str, int], int] = defaultdict(int)
    for ref in m.gi.output_refs:
        count[(m.gi.nodes[ref.src].key, ref.out)] += 1
    return {(k, o): min(1.0, n / m.keys[k].mult) for (k, o), n in count.items() if k in m.keys and m.keys[k].mult}


def _loss_grad_edges(m: ShardingModel) -> set[tuple[str, int, str, int]]:
    """Edges the loss's first gradient flows back through before it meets an op that computes (the loss's
    floating-point inputs and the free ops, views, before them): a resharding there runs its backward
    collective at the backward start, on top of that gradient (add_edge_vars charges it)."""
    out: set[tuple[str, int, str, int]] = set()
    todo = [m.gi.nodes[r.src] for r in m.gi.output_refs]
    seen: set[str] = set()
    while todo:
        v = todo.pop()
        if v.name in seen or v.kind != "op":
            continue
        seen.add(v.name)
        for ai, ref in enumerate(v.inputs):
            u = m.gi.nodes[ref.src]
            meta = u.outputs[ref.out] if u.outputs else None
            if meta is None or not meta.dtype.is_floating_point:
                continue
            out.add((u.key, ref.out, v.key, ai))
            if u.target in C.FREE_OPS:
                todo.append(u)
    return out


def _edge_list(m: ShardingModel) -> list[tuple[str, int, str, int, float]]:
    edges = [(u, o, v, a, n) for (u, o, v, a), n in m.gi.edge_classes().items()]
    for ref in m.gi.output_refs:
        edges.append((m.gi.nodes[ref.src].key, ref.out, OUTPUT, 0, 1.0))
    return edges


def grad_priced_bucketed(gi: GraphIndex, producer: GNode, src: tuple[Placement, ...], dst: tuple[Placement, ...]
                         ) -> bool:
    """The ILP prices the gradient of an edge out of ``producer`` (placed ``src``, read as ``dst``) as a bucketed
    reducer's (``C.edge_cost(param=True)``): runtime_rules.reducer_candidate with the producer's placement, on an
    edge that does not reshard (runtime_rules.deferred_grads defers no value any use of which reshards: such a
    use's gradient sum runs inline, a collective of its own). Shared by the ILP (add_edge_vars) and
    solver.runtime_model.price_plan."""
    return src == dst and reducer_candidate(gi, producer, all(isinstance(x, Replicate) for x in src))


def add_edge_vars(m: ShardingModel, remat: Remat, live: ForwardMemory | None = None) -> None:
    """``live``: an inference ILP's forward memory (module docstring); None: a training step."""
    loss_grad = _loss_grad_edges(m) if live is None else set()
    returned = _returned_fraction(m)
    cost_cache: dict[tuple, C.OpCost] = {}
    for ei, (ku, o, kv, a, mult) in enumerate(_edge_list(m)):
        u = m.keys[ku]
        meta = u.node.outputs[o]
        if meta is None:
            continue
        pgroups: dict[tuple, list[int]] = defaultdict(list)
        for j, s in enumerate(u.strategies):
            pgroups[s.outputs[o]].append(j)
        qgroups: dict[tuple, list[int]] = defaultdict(list)
        if kv == OUTPUT:
            qgroups[(tuple(Replicate() for _ in m.mesh.shape), tuple(False for _ in m.mesh.shape))] = [-1]
        else:
            for j, s in enumerate(m.keys[kv].strategies):
                inp = s.inputs[a]  # the split only matters where the input is replicated (Partial gradient)
                qgroups[(inp, tuple(sp and isinstance(p, Replicate) for p, sp in zip(inp, s.split_dims())))].append(j)
        keeps = kept_copy(u, o, kv, a, m.keys.get(kv)) if live is None else None
        held = returned.get((ku, o), 0.0)   # the part of the producer's occurrences the caller gets back
        # a copy kept inside a repeated block that recompute may drop is charged through Remat.build
        group = m.block_list(u) if keeps and u.node.kind != "param" else None
        bgroup = m.block_list(m.keys[kv]) if kv in m.keys else None
        nbytes = meta.nbytes
        bucketed = functools.partial(grad_priced_bucketed, m.gi, u.node)
        local = lambda pl: nbytes / m.shard_factor(pl)   # noqa: E731 (C.local_bytes, cached)

        def coef(p, q):
            # a parameter's gradient, or the partial gradient of an unsplit op of parameters alone (GPT's
            # position-embedding lookup, a weight's transpose), is summed by the bucketed reducer, not by an
            # all-reduce of its own: runtime_rules.reducer_candidate, the per-edge view of the rule codegen
            # follows (runtime_rules.deferred_grads: every use of the value needing the same sum; a rarer mix
            # is priced low here, see there); an edge that reshards the value is never deferred
            is_param = bucketed(p, q[0])
            ck = (meta, p, q, is_param)
            c = cost_cache.get(ck)
            if c is None:
                c = C.edge_cost(meta, p, q[0], q[1], m.mesh.shape, m.links, param=is_param)
                if is_param and m.grad_sync_scale != 1.0:   # an unresharded parameter edge: its backward is the sum
                    c = C.OpCost(c.fwd_s, c.bwd_s * m.grad_sync_scale)
                cost_cache[ck] = c
            if live is not None:   # inference: the forward resharding alone, nothing kept for backward
                return mult * c.fwd_s, 0.0, mult * c.fwd_s
            mem = 0.0
            if keeps and p != q[0]:   # the consumer keeps the resharded copy (in its placement)
                mem = local(q[0])
                if keeps == "only":   # ... instead of the producer's tensor, which add_node_vars charges,
                    # unless the caller holds that very tensor (a replicated model output: add_model_outputs)
                    whole = all(isinstance(x, Replicate) for x in p)
                    mem -= local(p) * (1.0 - held if whole else 1.0)
            return mult * c.total, mult * mem, mult * c.fwd_s

        def add(t, mem, var, fwd, p=None, q=None):
            if live is not None and p is not None and p != q[0] and kv in m.keys:
                live.add_copy(kv, local(q[0]), var)   # one occurrence's copy, live while its consumer runs
            if bgroup is not None and p is not None and p != q[0] and var is not None:
                # the block's backward runs this resharding's collective on the gradient: its result in
                # the producer's placement and a staging buffer as large as the larger side
                lp, lq = local(p), local(q[0])
                remat.blocks[bgroup].grad_comm.append((ei, mult / m.gi.layer_counts[bgroup] * (lp + max(lp, lq)), var))
            if (ku, o, kv, a) in loss_grad and p is not None and p != q[0] and var is not None:
                # the gradient's backward collective: its result in the producer's placement and the
                # staging buffer of the gathered chunks, both live at the backward start
                m.add_mem(MemCategory.BACKWARD_GRAD, [(2 * mult * local(p), var)])
            if group is not None:
                if mem and var is not None:   # one-block bytes, charged through Remat.build
                    remat.blocks[group].kept_copy.append((ei, mem / m.gi.layer_counts[group], var))
                mem = 0.0
            _add_edge_term(m, remat, kv, t, mem, var, fwd, ei)

        xu = m.x[ku]
        xv = m.x.get(kv)
        if a == 0 and m.merged.get(kv) == (ku, o):  # follower: its input placement is the producer's
            for q, qidx in qgroups.items():
                t, mem, fwd = coef(q[0], q)
                for j in qidx:
                    add(t, mem, xv[j], fwd, q[0], q)
            continue
        if len(pgroups) == 1 or len(qgroups) == 1:  # no y needed: the cost rides on one side's x
            for p, pidx in pgroups.items():
                for q, qidx in qgroups.items():
                    t, mem, fwd = coef(p, q)
                    if not (t or mem):
                        continue
                    if len(pgroups) == 1:
                        vars_ = [xv[j] for j in qidx] if xv is not None else [None]
                    else:
                        vars_ = [xu[j] for j in pidx]
                    for var in vars_:
                        add(t, mem, var, fwd, p, q)
            continue
        ys = {}
        for pi, p in enumerate(pgroups):
            for qi, q in enumerate(qgroups):
                y = m.var(f"y{ei}_{pi}_{qi}", lowBound=0)
                ys[(p, q)] = y
                t, mem, fwd = coef(p, q)
                add(t, mem, y, fwd, p, q)
        for pi, (p, pidx) in enumerate(pgroups.items()):
            m.add_row(pulp.lpSum(ys[(p, q)] for q in qgroups) == pulp.lpSum(xu[j] for j in pidx), f"ep{ei}_{pi}")
        for qi, (q, qidx) in enumerate(qgroups.items()):
            m.add_row(pulp.lpSum(ys[(p, q)] for p in pgroups) == pulp.lpSum(xv[j] for j in qidx), f"eq{ei}_{qi}")


def _add_edge_term(m: ShardingModel, remat: Remat, consumer: str, t: float, mem: float, var, fwd: float = 0.0,
                   edge: int = -1) -> None:
    if t:
        m.add_time(TimeCategory.COMM, [(t, var)])
        m.edge_terms[consumer].append((t, var))
    if fwd and var is not None and consumer in m.keys:
        group = m.block_list(m.keys[consumer])
        if group is not None and not m.opens_block(m.keys[consumer].node):
            # a recomputed block runs this collective again in backward (see Remat.build)
            remat.blocks[group].comm.append((edge, fwd, var))
    if mem:
        m.add_mem(MemCategory.ACTIVATIONS, [(mem, var)])

