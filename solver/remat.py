"""Recompute decisions of the sharding ILP: per repeated-block list, how many blocks keep their
activations, recompute selectively or fully (or offload them, solver.offload), and the memory rows
those counts enter.

Requires a ``solver.ilp.ShardingILP`` whose node and edge variables exist (add_node_vars, add_edge_vars):
its ``blocks`` hold, per block list, what record_block_key and add_edge_vars recorded (a key's kept
bytes and forward seconds per strategy, the block boundary, the forward collectives ("comm"), the
backward collectives on gradients ("grad_comm"), the resharded copies consumers keep ("kept_copy")).
Ensures: the count variables and their rows in ``ilp.prob``; the kept bytes in ``ilp.mem_terms["blocks"]``,
one re-materialized block T_g in ``"recompute"``, the hold H in ``"recompute_hold"``, recompute time in
``ilp.time_terms["recompute"]``; after solving, settle_remat sets every auxiliary variable to its value
for reports. The ILP's docstring writes the rows in math. Must not import codegen; memory variables are in
MiB (UNIT) like the ILP's rows.
"""
from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import pulp

from autopar.solver import cost as C
from autopar.solver import offload as O

if TYPE_CHECKING:
    from autopar.solver.ilp import KeyInfo, ShardingILP

UNIT = float(2 ** 20)   # memory rows in MiB: bytes misled HiGHS presolve, GiB its tolerances on small models


def value(v) -> float:
    """A solved variable's (or expression's) value; None (a constant term) counts 1."""
    if v is None:
        return 1.0
    val = v.value()
    return float(val) if val is not None else 0.0


def add_recompute_hold(ilp: ShardingILP) -> None:
    """H (MiB) >= what every block keeps and H >= every gradient: the recompute row's stand-in for
    max_i (kept by blocks before i + gradients after i), which moves from gradients (first block
    recomputed) to kept activations (last). Call after add_zero_vars (ZeRO-2 shrinks gradients)."""
    if not ilp._remat_vars:
        return
    hold = ilp._var("recompute_hold", lowBound=0)
    ilp.prob += hold >= ilp._mem(("blocks",)) * (1 / UNIT), "hold_kept"
    ilp.prob += hold >= ilp._mem(("grads",)) * (1 / UNIT), "hold_grads"
    ilp.mem_terms["recompute_hold"].append((UNIT, hold))


def settle_hold(ilp: ShardingILP) -> None:
    """After solving: H and the bucket copy B at their bounds (reports read them; the solver may leave them
    higher where they do not bind)."""
    if ilp._bucket_copy is not None:
        copy, grads, cap = ilp._bucket_copy
        copy.varValue = max(0.0, min(float(pulp.value(grads) or 0.0), cap))
    for c, v in ilp.mem_terms.get("recompute_hold", []):
        v.varValue = max(float(pulp.value(ilp._mem(("blocks",))) or 0.0),
                         float(pulp.value(ilp._mem(("grads",))) or 0.0)) / UNIT


def record_block_key(ilp: ShardingILP, group: str, info: KeyInfo, xs) -> None:
    """Per strategy: bytes one block keeps and forward seconds one block spends for this key."""
    per_block = info.mult / ilp.gi.layer_counts[group]
    act = [per_block * m.get("activations", 0.0) for m in info.memory]
    fwd = [per_block * c.fwd_s for c in info.compute]
    bwd = [per_block * c.bwd_s for c in info.compute]
    # selective recompute keeps a matmul's or attention's outputs whether or not autograd would keep
    # them (codegen.checkpoint_regions: MUST_SAVE), at least what it keeps: bytes per strategy
    sel: list[float] = []
    if C.contraction_flops(info.node, info.in_metas) > 0:
        sel = [max(a, per_block * sum(C.local_bytes(o, p, ilp.mesh.shape)
                                      for o, p in zip(info.node.outputs, s.outputs)
                                      if o is not None and p is not None and o.dtype.is_floating_point))
               for a, s in zip(act, info.strategies)]
    terms = ilp.blocks[group]
    terms["extra"].append((per_block * info.remat_extra.fwd_s, per_block * info.remat_extra.bwd_s))
    if any(act) or any(fwd) or any(sel):
        terms["keys"].append((xs, act, fwd, sel, bwd))
    out = info.node.outputs[0] if info.node.outputs else None
    pos = ilp._pos(info.node)
    if out is not None and out.dtype.is_floating_point and pos > ilp._last.get(group, -1):
        # the block's last floating-point result stands for the tensor a checkpoint keeps
        ilp._last[group] = pos
        terms["boundary"] = [(xs, [C.local_bytes(out, s.outputs[0], ilp.mesh.shape) for s in info.strategies])]


def add_remat_vars(ilp: ShardingILP) -> None:
    """Activation recompute per repeated-block list g of N blocks: integer counts c_keep + c_sel +
    c_full = N of blocks that keep everything, recompute selectively (matmul and attention
    outputs kept, cheap ops recomputed) or recompute fully (only the block's input is kept).
    The product of a key's strategy choice x_{k,s} and the mode fractions is exact without big-M:
    continuous v_{k,s,m} >= 0 with  sum_m v_{k,s,m} = x_{k,s}  and  sum_s v_{k,s,m} = c_m / N,
    so v_{k,s,m} = x_{k,s} c_m / N for the chosen s. Per rank, with a_{k,s} the bytes one block
    keeps for key k, o_{k,s} its outputs' bytes, f_{k,s} its forward seconds, b_s the block boundary's bytes:
      kept   = N sum_{k,s} (v_{k,s,keep} a_{k,s} + v_{k,s,sel} max(a_{k,s}, o_{k,s}) [k is a matmul/attention])
               + N sum_s (v_{B,s,sel} + v_{B,s,full}) b_s                  -> backward-start row
      time   = N sum_{k,s} (v_{k,s,full} f_{k,s} + v_{k,s,sel} f_{k,s} [k is cheap])  -> objective
               + c_sel E_sel + c_full E_full  (one block's per-op checkpoint surcharges, cost.checkpoint_overhead)
               + (c_sel + c_full) F,  F = sum_{e in g} m_e / N sum_{p,q} T^fwd(p->q) y_{e,p,q}
               (both modes re-run the block's forward collectives, a ZeRO-3 parameter's all-gather
               included: (n-1)/n S again in backward; the product exact in _recomputed_comm; an edge
               priced on an x stands for y; collectives before the block's first op are outside its
               checkpoint region)
      T_g   >= A_g + K_g + M_g - U (1 - u_g),  N u_g >= c_sel + c_full,  A_g = sum a_{k,s} x_{k,s},
      M_g >= sum_{p,q} c_{e,p,q} y_{e,p,q}, one row per resharding edge e into the block (y of an edge
      is one-hot: the largest collective its backward runs on a gradient, result and staging,
      c = l(p) + max(l(p), l(q)))
      kept  += K_g c_keep  (the resharded copies consumers keep, one sum per list: _kept_copies)
    T_g (one block re-materialized in backward) joins the recompute row (the kept boundaries are in
    its H >= kept, add_recompute_hold).
    With a host link a fourth mode "off" (c_off blocks keep nothing on the device: their saved
    activations go to host memory and come back one op at a time in backward) joins the counts; its
    time is solver.offload.add_block_offload's; T_g >= a_k + M_g - U (1 - u_off) for every key k of the
    block, N u_off >= c_off (the largest op's saved bytes are on the device at once)."""
    for gidx, (g, t) in enumerate(ilp.blocks.items()):
        n = ilp.gi.layer_counts[g]
        cnt = {m: ilp._var(f"c{gidx}_{m}", lowBound=0, upBound=n, cat="Integer") for m in ilp.modes}
        ilp.prob += pulp.lpSum(cnt.values()) == n, f"remat_n_{gidx}"
        kept, rtime, boundary, a_block, off = [], [], [], [], []
        key_act: dict[int, list] = defaultdict(list)   # per key: (bytes one block keeps, x) per strategy
        if ilp.recompute is not None:   # told: every block of the list in that mode
            ilp.prob += cnt[{"selective": "sel", "full": "full", "offload": "off"}[ilp.recompute]] == n, f"remat_told_{gidx}"
        recorded = list(t.get("keys", []))
        boundary_entry = t.get("boundary", [])
        for ki, (xs, act, fwd, contraction, bwd) in enumerate(recorded + [(b[0], b[1], None, None, None)
                                                                        for b in boundary_entry]):
            is_boundary = fwd is None
            v = {m: [ilp._var(f"v{gidx}_{ki}_{j}_{m}", lowBound=0) for j in range(len(xs))] for m in ilp.modes}
            for j in range(len(xs)):
                ilp.prob += pulp.lpSum(v[m][j] for m in ilp.modes) == xs[j], f"vx{gidx}_{ki}_{j}"
            for m in ilp.modes:
                ilp.prob += n * pulp.lpSum(v[m]) == cnt[m], f"vc{gidx}_{ki}_{m}"
            for j in range(len(xs)):
                if is_boundary:
                    if act[j]:
                        boundary += [(n * act[j], v["sel"][j]), (n * act[j], v["full"][j])]
                    continue
                if act[j]:
                    a_block.append((act[j], xs[j]))
                    key_act[ki].append((act[j], xs[j]))
                    kept.append((n * act[j], v["keep"][j]))
                if contraction and contraction[j]:   # the bytes selective recompute keeps
                    kept.append((n * contraction[j], v["sel"][j]))
                if "off" in v:
                    off.append((act[j], fwd[j], bwd[j], v["off"][j]))
                if fwd[j]:
                    rtime.append((n * fwd[j], v["full"][j]))
                    if not contraction:
                        rtime.append((n * fwd[j], v["sel"][j]))
        rtime += _recomputed_comm(ilp, gidx, n, cnt, t.get("comm", []))
        extra = t.get("extra", [])   # one block's per-op checkpoint surcharges (cost.checkpoint_overhead)
        rtime += [(sum(e[0] for e in extra), cnt["sel"]), (sum(e[1] for e in extra), cnt["full"])]
        u = ilp._var(f"u{gidx}", cat="Binary")
        ilp.prob += n * u >= cnt["sel"] + cnt["full"], f"remat_any_{gidx}"
        tr = ilp._var(f"remat_peak_{gidx}", lowBound=0)   # MiB (byte-sized big-M values misled HiGHS)
        bound = sum(max(act) for _, act, *_ in recorded if act) + 1.0
        if t.get("grad_comm"):   # the largest collective of its backward, on top: one row per edge
            by_edge: dict[int, list] = defaultdict(list)
            for e, c, x in t["grad_comm"]:
                by_edge[e].append((c / UNIT, x))
            gc = ilp._var(f"remat_comm_{gidx}", lowBound=0)   # MiB
            for e, terms in by_edge.items():
                ilp.prob += gc >= pulp.lpSum(c * x for c, x in terms), f"remat_comm_{gidx}_{e}"
            a_block.append((UNIT, gc))
            bound += UNIT * max(max(c for c, _ in terms) for terms in by_edge.values())
            ilp._max_vars.append((gc, list(by_edge.values())))
        off_copies: tuple[list, list] = ([], [])
        if t.get("kept_copy"):
            kc_bound, off_copies = _kept_copies(ilp, gidx, n, cnt, t["kept_copy"], kept, a_block)
            bound += kc_bound
        ilp.prob += tr >= pulp.lpSum(c / UNIT * x for c, x in a_block) - bound / UNIT * (1 - u), \
            f"remat_peak_{gidx}"
        if "off" in cnt:
            # an offloaded block's backward brings its saved tensors back one op at a time (the unpack hook
            # copies a tensor when its op's backward runs; the copy dies with it): T_g >= the largest
            # op's saved bytes, plus the largest backward collective
            u_off = ilp._var(f"u_off{gidx}", cat="Binary")
            ilp.prob += n * u_off >= cnt["off"], f"offload_any_{gidx}"
            comm = [(UNIT, gc)] if t.get("grad_comm") else []
            for ki, terms in key_act.items():
                ilp.prob += tr >= pulp.lpSum(c / UNIT * x for c, x in terms + comm) - bound / UNIT * (1 - u_off), \
                    f"offload_peak_{gidx}_{ki}"
        ilp.mem_terms["blocks"] += kept + boundary
        ilp.mem_terms["recompute"].append((UNIT, tr))   # the kept boundaries are in H >= blocks (add_recompute_hold)
        ilp.time_terms["recompute"] += rtime
        if off:
            O.add_block_offload(ilp, gidx, n, off, ilp.host, *off_copies)
        ilp._remat_vars[g] = (cnt, tr, a_block, [terms + comm for terms in key_act.values()] if "off" in cnt else [])


def _kept_copies(ilp: ShardingILP, gidx: int, n: int, cnt: dict, terms: list, kept: list, a_block: list
                 ) -> tuple[float, tuple[list, list]]:
    """Resharded copies the consumers in a block keep for backward (``terms``: (edge, bytes per block,
    y or x)), all edges together: K_g = sum c y (MiB, one row) is kept by the blocks that keep
    everything and goes to host with the offloaded ones (recomputed blocks make them again), so
    kept += K_g c_keep and host += K_g c_off, products exact through the count in binary (_times_count);
    an offloaded block copies E_g = sum y tensors more (E_g c_off launches). T_g holds K_g.
    Returns K_g's upper bound in bytes (for T_g's big-M) and the offloaded copies' terms: (bytes, tensors)."""
    lo, hi, edges = 0.0, 0.0, defaultdict(list)
    for e, c, x in terms:
        edges[e].append(c / UNIT)
    for cs in edges.values():   # an edge's terms are one-hot: at most its largest, at least its smallest
        hi += max(0.0, max(cs))
        lo += min(0.0, min(cs))
    k_terms = [(c / UNIT, x) for _, c, x in terms]
    k = _aux(ilp, f"kc{gidx}", k_terms, lo, hi)
    a_block.append((UNIT, k))
    keep_bits = _count_bits(ilp, gidx, "keep", cnt["keep"], n)
    kept += [(UNIT * c, w) for c, w in _times_count(ilp, f"kc{gidx}_keep", k, k_terms, lo, hi, keep_bits,
                                                    cnt["keep"], n)]
    if "off" not in cnt:
        return UNIT * hi, ([], [])
    bits = _count_bits(ilp, gidx, "off", cnt["off"], n)
    copies = [(UNIT * c, w) for c, w in _times_count(ilp, f"kc{gidx}_off", k, k_terms, lo, hi, bits,
                                                           cnt["off"], n)]
    e_terms = [(1.0, x) for _, _, x in terms]
    e = _aux(ilp, f"ke{gidx}", e_terms, 0.0, float(len(edges)))
    return UNIT * hi, (copies, _times_count(ilp, f"ke{gidx}_off", e, e_terms, 0.0, float(len(edges)), bits,
                                                 cnt["off"], n))


def _aux(ilp: ShardingILP, name: str, terms: list, lo: float, hi: float) -> pulp.LpVariable:
    """A continuous variable equal to sum c v (one row), so that rows using it stay sparse."""
    k = ilp._var(name, lowBound=lo, upBound=hi)
    ilp.prob += k == pulp.lpSum(c * v for c, v in terms), name
    return k


def _count_bits(ilp: ShardingILP, gidx: int, mode: str, count, n: int) -> list[pulp.LpVariable]:
    """A block list's count of ``mode`` in binary: count = sum_b 2^b beta_b (made once)."""
    if (gidx, mode) not in ilp._bits:
        bits = [ilp._var(f"cb{gidx}_{mode}_{b}", cat="Binary") for b in range(n.bit_length())]
        ilp.prob += pulp.lpSum(2 ** b * x for b, x in enumerate(bits)) == count, f"cb{gidx}_{mode}"
        ilp._bits[(gidx, mode)] = bits
    return ilp._bits[(gidx, mode)]


def _times_count(ilp: ShardingILP, name: str, k: pulp.LpVariable, k_terms: list, lo: float, hi: float,
                 bits: list, count, n: int) -> list[tuple[float, pulp.LpVariable]]:
    """Terms whose sum is at least K * count (K = ``k`` in [lo, hi], count = sum 2^b beta_b in [0, n]):
    w_b >= K - hi (1 - beta_b) and w_b >= lo beta_b, McCormick's lower envelope, exact for binary beta;
    tight where a row or the objective bounds w from above (memory rows, time), settled after solving.
    One more row, sum_b 2^b w_b >= n K - hi (n - count) (the envelope on the count itself, exact at
    count = n), keeps the LP relaxation tight where fractional bits would let the sum fall to ~0."""
    ws = []
    for b, beta in enumerate(bits):
        w = ilp._var(f"{name}_{b}", lowBound=min(lo, 0.0))
        ilp.prob += w >= k - hi * (1 - beta), f"{name}_{b}"
        if lo < 0:
            ilp.prob += w >= lo * beta, f"{name}_{b}_lo"
        ws.append((beta, w))
    terms = [(2.0 ** b, w) for b, (_, w) in enumerate(ws)]
    ilp.prob += pulp.lpSum(c * w for c, w in terms) >= n * k - hi * (n - count), f"{name}_all"
    ilp._products.append((k, k_terms, ws))
    return terms


def _recomputed_comm(ilp: ShardingILP, gidx: int, n: int, cnt: dict, comm: list) -> list:
    """Time terms for the forward collectives recomputed blocks run again: F (c_sel + c_full) with
    F = sum_e sum_{p,q} T^fwd y / N one block's forward collectives. The product of the integer
    count and F is exact with the count in binary, c_sel + c_full = sum_b 2^b beta_b, and
    z_b >= F - F_max (1 - beta_b), z_b >= 0 (F <= F_max; at most log2(N) + 1 bits)."""
    if not comm:
        return []
    f = ilp._var(f"rf{gidx}", lowBound=0)   # one dense row defines F; the bit rows stay sparse
    ilp.prob += f == pulp.lpSum(fwd / n * var for _, fwd, var in comm), f"rf{gidx}"
    per_edge: dict[int, float] = defaultdict(float)
    for e, fwd, _ in comm:
        per_edge[e] = max(per_edge[e], fwd / n)
    f_max = sum(per_edge.values())
    bits = [ilp._var(f"rb{gidx}_{b}", cat="Binary") for b in range(n.bit_length())]
    ilp.prob += pulp.lpSum(2 ** b * x for b, x in enumerate(bits)) == cnt["sel"] + cnt["full"], f"rb{gidx}"
    out = []
    for b, beta in enumerate(bits):
        z = ilp._var(f"rz{gidx}_{b}", lowBound=0)
        ilp.prob += z >= f - f_max * (1 - beta), f"rz{gidx}_{b}"
        out.append((2.0 ** b, z))
    return out


def settle_remat(ilp: ShardingILP) -> None:
    """After solving: T_g at its value (the solver may leave it anywhere above its bound where the
    recompute row does not bind; reports read it)."""
    for v, edges in ilp._max_vars:
        v.varValue = max((sum(c * value(x) for c, x in terms) for terms in edges), default=0.0)
    for k, terms, ws in ilp._products:
        k.varValue = sum(c * value(x) for c, x in terms)
        for beta, w in ws:
            w.varValue = k.varValue * round(value(beta))
    for g, (cnt, tr, a_block, off_keys) in ilp._remat_vars.items():
        peak = 0.0
        if round(value(cnt["sel"])) + round(value(cnt["full"])) > 0:
            peak = sum(c * value(x) for c, x in a_block) / UNIT
        if "off" in cnt and round(value(cnt["off"])) > 0:
            peak = max([peak] + [sum(c * value(x) for c, x in terms) / UNIT for terms in off_keys])
        tr.varValue = peak


def remat_counts(ilp: ShardingILP) -> dict[str, tuple[int, int]]:
    return {g: (round(value(cnt["full"])), round(value(cnt["sel"]))) for g, (cnt, *_) in ilp._remat_vars.items()}


def offload_counts(ilp: ShardingILP) -> dict[str, int]:
    return {g: round(value(cnt["off"])) for g, (cnt, *_) in ilp._remat_vars.items() if "off" in cnt}
