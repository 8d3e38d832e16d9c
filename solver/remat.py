"""Recompute decisions of the sharding ILP (a part of solver.model's ShardingModel): per repeated-block
list, how many blocks keep their activations, recompute selectively or fully (or offload them,
solver.offload), and the memory rows those counts enter.

``Remat`` collects, per block list, what the node and edge variables record while they are built
(``record_key``: a key's kept bytes and forward seconds per strategy and the block boundary; the edges
append to ``blocks[list]``: the forward collectives (``comm``), the backward collectives on gradients
(``grad_comm``), the resharded copies consumers keep (``kept_copy``)). ``build`` then adds the count
variables and their rows; the kept bytes go to MemCategory.BLOCKS, one re-materialized block T_g to
RECOMPUTE (opening the recompute row), recompute time to TimeCategory.RECOMPUTE; ``add_hold`` the hold
H (RECOMPUTE_HOLD). Every auxiliary variable settles to its value after solving (ShardingModel.settle).
The ILP's docstring writes the rows in math. Uses the model's public interface only; must not import
codegen. Memory variables are in MiB (UNIT) like the ILP's rows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pulp

from autopar.solver import cost as C
from autopar.solver import offload as O
from autopar.solver.model import UNIT, KeyInfo, MemCategory, MemRow, ShardingModel, TimeCategory, value

MODES = ("keep", "sel", "full")   # activation recompute modes of a repeated block ("off" with a host link)
TOLD = {"selective": "sel", "full": "full", "offload": "off"}   # autopar.plan's recompute= -> mode


@dataclass
class BlockTerms:
    """What one block list's keys and edges recorded while the node and edge variables were built."""
    keys: list = field(default_factory=list)       # (x per strategy, kept bytes, fwd s, selective bytes, bwd s)
    boundary: list = field(default_factory=list)   # [(x per strategy, bytes of the block's last result)]
    extra: list = field(default_factory=list)      # per op: (selective, full) checkpoint surcharge seconds
    comm: list = field(default_factory=list)       # (edge, forward collective seconds, y or x)
    grad_comm: list = field(default_factory=list)  # (edge, bytes of a backward collective on a gradient, y or x)
    kept_copy: list = field(default_factory=list)  # (edge, bytes of a resharded copy kept for backward, y or x)
    last: int = -1                                 # position of the boundary's node


@dataclass(frozen=True)
class ListVars:
    """A block list's decision: counts per mode, T_g, the terms T_g holds when recomputed / offloaded."""
    counts: dict
    peak: pulp.LpVariable
    recomputed: list
    offloaded: list


class Remat:
    """The recompute part of the ILP (module docstring). ``recompute``: autopar.plan's told mode or None;
    ``host``: the host link that offers the "off" mode (solver.offload), or None."""

    def __init__(self, model: ShardingModel, *, recompute: str | None, host: O.HostLink | None) -> None:
        self.model, self.recompute, self.host = model, recompute, host
        self.modes = MODES + (("off",) if host is not None else ())
        self.blocks: dict[str, BlockTerms] = defaultdict(BlockTerms)
        self.lists: dict[str, ListVars] = {}

    def record_key(self, group: str, info: KeyInfo, xs) -> None:
        """Per strategy: bytes one block keeps and forward seconds one block spends for this key."""
        m = self.model
        per_block = info.mult / m.gi.layer_counts[group]
        act = [per_block * mem.get(MemCategory.ACTIVATIONS, 0.0) for mem in info.memory]
        fwd = [per_block * c.fwd_s for c in info.compute]
        bwd = [per_block * c.bwd_s for c in info.compute]
        # selective recompute keeps a matmul's or attention's outputs whether or not autograd would keep
        # them (codegen.checkpoint_regions: MUST_SAVE), at least what it keeps but autocast's casts of its inputs
        # (recomputed: KeyInfo.cast_bytes): bytes per strategy
        sel: list[float] = []
        if C.contraction_flops(info.node, info.in_metas) > 0:
            casts = info.cast_bytes or [0.0] * len(act)
            sel = [max(a - per_block * c, per_block * sum(C.local_bytes(o, p, m.mesh.shape)
                                                          for o, p in zip(info.node.outputs, s.outputs)
                                                          if o is not None and p is not None
                                                          and o.dtype.is_floating_point))
                   for a, c, s in zip(act, casts, info.strategies)]
        terms = self.blocks[group]
        terms.extra.append((per_block * info.remat_extra.fwd_s, per_block * info.remat_extra.bwd_s))
        if any(act) or any(fwd) or any(sel):
            terms.keys.append((xs, act, fwd, sel, bwd))
        out = info.node.outputs[0] if info.node.outputs else None
        pos = m.position(info.node)
        if out is not None and out.dtype.is_floating_point and pos > terms.last:
            # the block's last floating-point result stands for the tensor a checkpoint keeps
            terms.last = pos
            terms.boundary = [(xs, [C.local_bytes(out, s.outputs[0], m.mesh.shape) for s in info.strategies])]

    def build(self) -> None:
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
        its H >= kept, add_hold).
        With a host link a fourth mode "off" (c_off blocks keep nothing on the device: their saved
        activations go to host memory and come back one op at a time in backward) joins the counts; its
        time is solver.offload.add_block_offload's; T_g >= a_k + M_g - U (1 - u_off) for every key k of the
        block, N u_off >= c_off (the largest op's saved bytes are on the device at once)."""
        for gidx, (g, t) in enumerate(self.blocks.items()):
            self._build_list(gidx, g, t)
        if self.lists:
            self.model.open_row(MemRow.RECOMPUTE)
            self.model.on_settle(self._settle)

    def _build_list(self, gidx: int, g: str, t: BlockTerms) -> None:
        m = self.model
        n = m.gi.layer_counts[g]
        cnt = {mode: m.var(f"c{gidx}_{mode}", lowBound=0, upBound=n, cat="Integer") for mode in self.modes}
        m.add_row(pulp.lpSum(cnt.values()) == n, f"remat_n_{gidx}")
        kept, rtime, boundary, a_block, off = [], [], [], [], []
        a_cut: list = []   # A_g (c_sel + c_full) / N through the v's: a valid lower bound on T_g (below)
        key_act: dict[int, list] = defaultdict(list)   # per key: (bytes one block keeps, x) per strategy
        if self.recompute is not None:   # told: every block of the list in that mode
            m.add_row(cnt[TOLD[self.recompute]] == n, f"remat_told_{gidx}")
        recorded = list(t.keys)
        for ki, (xs, act, fwd, contraction, bwd) in enumerate(recorded + [(b[0], b[1], None, None, None)
                                                                        for b in t.boundary]):
            is_boundary = fwd is None
            v = {mode: [m.var(f"v{gidx}_{ki}_{j}_{mode}", lowBound=0) for j in range(len(xs))] for mode in self.modes}
            for j in range(len(xs)):
                m.add_row(pulp.lpSum(v[mode][j] for mode in self.modes) == xs[j], f"vx{gidx}_{ki}_{j}")
            for mode in self.modes:
                m.add_row(n * pulp.lpSum(v[mode]) == cnt[mode], f"vc{gidx}_{ki}_{mode}")
            for j in range(len(xs)):
                if is_boundary:
                    if act[j]:
                        boundary += [(n * act[j], v["sel"][j]), (n * act[j], v["full"][j])]
                    continue
                if act[j]:
                    a_block.append((act[j], xs[j]))
                    key_act[ki].append((act[j], xs[j]))
                    kept.append((n * act[j], v["keep"][j]))
                    a_cut += [(act[j], v["sel"][j]), (act[j], v["full"][j])]
                if contraction and contraction[j]:   # the bytes selective recompute keeps
                    kept.append((n * contraction[j], v["sel"][j]))
                if "off" in v:
                    off.append((act[j], fwd[j], bwd[j], v["off"][j]))
                if fwd[j]:
                    rtime.append((n * fwd[j], v["full"][j]))
                    if not contraction:
                        rtime.append((n * fwd[j], v["sel"][j]))
        rtime += _recomputed_comm(m, gidx, n, cnt, t.comm)
        extra = t.extra   # one block's per-op checkpoint surcharges (cost.checkpoint_overhead)
        rtime += [(sum(e[0] for e in extra), cnt["sel"]), (sum(e[1] for e in extra), cnt["full"])]
        u = m.var(f"u{gidx}", cat="Binary")
        m.add_row(n * u >= cnt["sel"] + cnt["full"], f"remat_any_{gidx}")
        tr = m.var(f"remat_peak_{gidx}", lowBound=0)   # MiB (byte-sized big-M values misled HiGHS)
        bound = sum(max(act) for _, act, *_ in recorded if act) + 1.0
        comm = []
        if t.grad_comm:   # the largest collective of its backward, on top: one row per edge
            by_edge: dict[int, list] = defaultdict(list)
            for e, c, x in t.grad_comm:
                by_edge[e].append((c / UNIT, x))
            gc = m.var(f"remat_comm_{gidx}", lowBound=0)   # MiB
            for e, terms in by_edge.items():
                m.add_row(gc >= pulp.lpSum(c * x for c, x in terms), f"remat_comm_{gidx}_{e}")
            a_block.append((UNIT, gc))
            bound += UNIT * max(max(c for c, _ in terms) for terms in by_edge.values())
            m.settle_max(gc, list(by_edge.values()))
            comm = [(UNIT, gc)]
        off_copies: tuple[list, list] = ([], [])
        if t.kept_copy:
            kc_bound, off_copies = _kept_copies(m, gidx, n, cnt, t.kept_copy, kept, a_block)
            bound += kc_bound
        m.add_row(tr >= pulp.lpSum(c / UNIT * x for c, x in a_block) - bound / UNIT * (1 - u), f"remat_peak_{gidx}")
        if a_cut:
            # a valid inequality that tightens the LP bound (the big-M row above is void for fractional u):
            # T_g >= A_g (c_sel + c_full) / N + K_lo, the v's being x c / N at integer points; at u = 1 the
            # right side is at most A_g + K_g + M_g (K_g >= K_lo, its least value: copies kept "only" instead of
            # the producer's tensor are negative; M_g >= 0), at u = 0 it is K_lo <= 0: no plan is cut off
            k_lo = 0.0
            by_edge: dict[int, list] = defaultdict(list)
            for e, c, _ in t.kept_copy:
                by_edge[e].append(c)
            k_lo = sum(min(0.0, min(cs)) for cs in by_edge.values())
            m.add_row(tr >= pulp.lpSum(c / UNIT * x for c, x in a_cut) + k_lo / UNIT, f"remat_peak_cut_{gidx}")
        if "off" in cnt:
            # an offloaded block's backward brings its saved tensors back one op at a time (the unpack hook
            # copies a tensor when its op's backward runs; the copy dies with it): T_g >= the largest
            # op's saved bytes, plus the largest backward collective
            u_off = m.var(f"u_off{gidx}", cat="Binary")
            m.add_row(n * u_off >= cnt["off"], f"offload_any_{gidx}")
            for ki, terms in key_act.items():
                m.add_row(tr >= pulp.lpSum(c / UNIT * x for c, x in terms + comm) - bound / UNIT * (1 - u_off),
                          f"offload_peak_{gidx}_{ki}")
        m.add_mem(MemCategory.BLOCKS, kept + boundary)
        m.add_mem(MemCategory.RECOMPUTE, [(UNIT, tr)])   # the kept boundaries are in H >= blocks (add_hold)
        m.add_time(TimeCategory.RECOMPUTE, rtime)
        if off:
            O.add_block_offload(m, gidx, n, off, self.host, *off_copies)
        self.lists[g] = ListVars(cnt, tr, a_block, [terms + comm for terms in key_act.values()] if "off" in cnt else [])

    def add_hold(self) -> None:
        """H (MiB) >= what every block keeps and H >= every gradient: the recompute row's stand-in for
        max_i (kept by blocks before i + gradients after i), which moves from gradients (first block
        recomputed) to kept activations (last). Call after ZeroRows.build (ZeRO-2 shrinks gradients)."""
        if not self.lists:
            return
        m = self.model
        hold = m.var("recompute_hold", lowBound=0)
        m.add_row(hold >= m.mem((MemCategory.BLOCKS,)) * (1 / UNIT), "hold_kept")
        m.add_row(hold >= m.mem((MemCategory.GRADS,)) * (1 / UNIT), "hold_grads")
        m.add_mem(MemCategory.RECOMPUTE_HOLD, [(UNIT, hold)])

        def settle() -> None:   # H at its bound (the solver may leave it higher where it does not bind)
            hold.varValue = max(float(pulp.value(m.mem((MemCategory.BLOCKS,))) or 0.0),
                                float(pulp.value(m.mem((MemCategory.GRADS,))) or 0.0)) / UNIT
        m.on_settle(settle)

    def _settle(self) -> None:
        """After solving: T_g at its value (the solver may leave it anywhere above its bound where the
        recompute row does not bind; reports read it)."""
        for lv in self.lists.values():
            cnt, peak = lv.counts, 0.0
            if round(value(cnt["sel"])) + round(value(cnt["full"])) > 0:
                peak = sum(c * value(x) for c, x in lv.recomputed) / UNIT
            if "off" in cnt and round(value(cnt["off"])) > 0:
                peak = max([peak] + [sum(c * value(x) for c, x in terms) / UNIT for terms in lv.offloaded])
            lv.peak.varValue = peak

    def counts(self) -> dict[str, tuple[int, int]]:
        """After solving: block list -> (fully, selectively) recomputed blocks."""
        return {g: (round(value(lv.counts["full"])), round(value(lv.counts["sel"]))) for g, lv in self.lists.items()}

    def offload_counts(self) -> dict[str, int]:
        """After solving: block list -> blocks whose activations go to host memory."""
        return {g: round(value(lv.counts["off"])) for g, lv in self.lists.items() if "off" in lv.counts}


def _kept_copies(m: ShardingModel, gidx: int, n: int, cnt: dict, terms: list, kept: list, a_block: list
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
    k = _aux(m, f"kc{gidx}", k_terms, lo, hi)
    a_block.append((UNIT, k))
    keep_bits = _count_bits(m, gidx, "keep", cnt["keep"], n)
    kept += [(UNIT * c, w) for c, w in _times_count(m, f"kc{gidx}_keep", k, k_terms, lo, hi, keep_bits,
                                                    cnt["keep"], n)]
    if "off" not in cnt:
        return UNIT * hi, ([], [])
    bits = _count_bits(m, gidx, "off", cnt["off"], n)
    copies = [(UNIT * c, w) for c, w in _times_count(m, f"kc{gidx}_off", k, k_terms, lo, hi, bits, cnt["off"], n)]
    e_terms = [(1.0, x) for _, _, x in terms]
    e = _aux(m, f"ke{gidx}", e_terms, 0.0, float(len(edges)))
    return UNIT * hi, (copies, _times_count(m, f"ke{gidx}_off", e, e_terms, 0.0, float(len(edges)), bits,
                                            cnt["off"], n))


def _aux(m: ShardingModel, name: str, terms: list, lo: float, hi: float) -> pulp.LpVariable:
    """A continuous variable equal to sum c v (one row), so that rows using it stay sparse."""
    k = m.var(name, lowBound=lo, upBound=hi)
    m.add_row(k == pulp.lpSum(c * v for c, v in terms), name)
    return k


def _count_bits(m: ShardingModel, gidx: int, mode: str, count, n: int) -> list[pulp.LpVariable]:
    """A block list's count of ``mode`` in binary: count = sum_b 2^b beta_b (made once per list and mode)."""
    bits = [m.var(f"cb{gidx}_{mode}_{b}", cat="Binary") for b in range(n.bit_length())]
    m.add_row(pulp.lpSum(2 ** b * x for b, x in enumerate(bits)) == count, f"cb{gidx}_{mode}")
    return bits


def _times_count(m: ShardingModel, name: str, k: pulp.LpVariable, k_terms: list, lo: float, hi: float,
                 bits: list, count, n: int) -> list[tuple[float, pulp.LpVariable]]:
    """Terms whose sum is at least K * count (K = ``k`` in [lo, hi], count = sum 2^b beta_b in [0, n]):
    w_b >= K - hi (1 - beta_b) and w_b >= lo beta_b, McCormick's lower envelope, exact for binary beta;
    tight where a row or the objective bounds w from above (memory rows, time), settled after solving.
    One more row, sum_b 2^b w_b >= n K - hi (n - count) (the envelope on the count itself, exact at
    count = n), keeps the LP relaxation tight where fractional bits would let the sum fall to ~0."""
    ws = []
    for b, beta in enumerate(bits):
        w = m.var(f"{name}_{b}", lowBound=min(lo, 0.0))
        m.add_row(w >= k - hi * (1 - beta), f"{name}_{b}")
        if lo < 0:
            m.add_row(w >= lo * beta, f"{name}_{b}_lo")
        ws.append((beta, w))
    terms = [(2.0 ** b, w) for b, (_, w) in enumerate(ws)]
    m.add_row(pulp.lpSum(c * w for c, w in terms) >= n * k - hi * (n - count), f"{name}_all")
    m.settle_product(k, k_terms, ws)
    return terms


def _recomputed_comm(m: ShardingModel, gidx: int, n: int, cnt: dict, comm: list) -> list:
    """Time terms for the forward collectives recomputed blocks run again: F (c_sel + c_full) with
    F = sum_e sum_{p,q} T^fwd y / N one block's forward collectives. The product of the integer
    count and F is exact with the count in binary, c_sel + c_full = sum_b 2^b beta_b, and
    z_b >= F - F_max (1 - beta_b), z_b >= 0 (F <= F_max; at most log2(N) + 1 bits)."""
    if not comm:
        return []
    f = m.var(f"rf{gidx}", lowBound=0)   # one dense row defines F; the bit rows stay sparse
    m.add_row(f == pulp.lpSum(fwd / n * var for _, fwd, var in comm), f"rf{gidx}")
    per_edge: dict[int, float] = defaultdict(float)
    for e, fwd, _ in comm:
        per_edge[e] = max(per_edge[e], fwd / n)
    f_max = sum(per_edge.values())
    bits = [m.var(f"rb{gidx}_{b}", cat="Binary") for b in range(n.bit_length())]
    m.add_row(pulp.lpSum(2 ** b * x for b, x in enumerate(bits)) == cnt["sel"] + cnt["full"], f"rb{gidx}")
    out = []
    for b, beta in enumerate(bits):
        z = m.var(f"rz{gidx}_{b}", lowBound=0)
        m.add_row(z >= f - f_max * (1 - beta), f"rz{gidx}_{b}")
        out.append((2.0 ** b, z))
    # the envelope on the count itself (exact at c = N; valid as F <= F_max): sum_b 2^b z_b >= N F - F_max (N - c)
    m.add_row(pulp.lpSum(c * z for c, z in out) >= n * f - f_max * (n - cnt["sel"] - cnt["full"]), f"rz{gidx}_all")
    return out
