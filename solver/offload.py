"""Offload decisions of the sharding ILP: activations of repeated blocks and optimizer states to host.

Both are rows and variables added to ``solver.ilp.ShardingILP`` (this file holds their cost model and
their part of the model; the ILP's docstring writes them in math). Offload is offered only where the
host is not the device (``ClusterProfile.host_is_device``: on ``cpu-gloo`` "host memory" is the same
memory, so offloading frees nothing and costs copies). Host memory is not a constraint (its bytes
are reported as the plan's ``memory_breakdown.host``). Units: seconds, bytes (memory variables in
MiB like the ILP's rows). Must not import codegen.

Activation offload (per repeated-block list g of N blocks, a fourth mode "off" next to keep /
selective / full recompute, count c_off): an offloaded block keeps nothing on the device; in forward
its kept bytes a_block travel down the host link, in backward back up, each copy overlapping the
compute of one block (the copy of block i runs while block i+1 computes, and the reverse in
backward), and each tensor copy pays one launch (``op_overhead_s``) that does not overlap:
    W^fwd_g >= c_off (a_block / bw - f_block),  W^bwd_g >= c_off (a_block / bw - b_block),  W >= 0
    time    += W^fwd_g + W^bwd_g + c_off 2 n_tensors op_overhead_s
(exact for the products with the strategy choice through the mode fractions v_{k,s,off} of
add_remat_vars, and for the max() because W is minimized). In backward an offloaded block's saved
tensors come back one op at a time (codegen.offload_activations copies a tensor back when its op's
backward needs it, and the copy dies with that op): the recompute row's T_g holds the largest op's
saved bytes of the block (solver.remat), not the whole block a recomputed one holds.

Optimizer offload (ZeRO-Offload style, one binary z for the model, runtime in
``autopar.offload_optimizer``): AdamW states and the fp32 master copy live in host memory and the
step runs on the CPU. With P, Grad, O the device bytes of parameters, gradients and optimizer states
under the chosen shardings:
    O_dev >= O - U_O z,  O_dev >= 0                  (O_dev replaces O in every memory row)
    T_opt >= Grad / bw + P / bw + O/8 * 28 B / cpu_bw - U_T (1 - z),  T_opt >= 0     -> objective
The copies and the CPU step are serial with the step (the runtime copies gradients after backward).
"""
from __future__ import annotations

from dataclasses import dataclass

import pulp

from autopar.profile import ClusterProfile

# Host memory bandwidth of a typical 2-socket GPU server (DDR5, ~300 GB/s STREAM per node; a typical
# value, not a spec-sheet or measured one), shared by the node's ranks. AdamW moves 28 bytes per fp32
# element (reads param, grad, exp_avg, exp_avg_sq; writes param, exp_avg, exp_avg_sq); torch's CPU
# AdamW (several foreach passes) reached 14 % of the STREAM bandwidth on the 2-core CI host (1 thread,
# 4M elements: 19 ns/element = 1.47 GB/s at 28 B/element, against 10.4 GB/s for an add).
HOST_NODE_MEMORY_BANDWIDTH = 300e9
CPU_ADAM_EFFICIENCY = 0.15
ADAM_BYTES_MOVED_PER_ELEMENT = 28
ADAM_STATE_BYTES_PER_ELEMENT = 8


@dataclass(frozen=True, kw_only=True)
class HostLink:
    """What offload costs on one rank: host<->device bytes/s, one copy's launch, CPU optimizer bytes/s."""

    bandwidth: float
    launch_s: float
    cpu_step_bandwidth: float


def host_link(profile: ClusterProfile) -> HostLink | None:
    """The rank's host link, or None where the device is the host (offload is not offered)."""
    if profile.host_is_device:
        return None
    return HostLink(bandwidth=profile.host_bandwidth, launch_s=profile.device.op_overhead_s,
                    cpu_step_bandwidth=HOST_NODE_MEMORY_BANDWIDTH * CPU_ADAM_EFFICIENCY / profile.gpus_per_node)


def add_block_offload(ilp, gidx: int, n: int, terms: list[tuple[float, float, float, list]], link: HostLink,
                      copies: list | tuple = (), copy_tensors: list | tuple = ()) -> None:
    """The "off" mode's time for block list number ``gidx`` of ``n`` blocks. ``terms``: per (key, strategy)
    (bytes one block keeps, forward s, backward s, v_off variable) as add_remat_vars records them;
    ``copies`` / ``copy_tensors``: (coefficient, variable) terms of the bytes and the tensors of the resharded
    copies all offloaded blocks keep, already multiplied by c_off (add_remat_vars' kept copies)."""
    down = [(c / link.bandwidth, v) for c, v in copies]
    up = list(down)
    launches = [(2 * link.launch_s * c, v) for c, v in copy_tensors]
    for act, fwd, bwd, v in terms:
        down.append((n * (act / link.bandwidth - fwd), v))
        up.append((n * (act / link.bandwidth - bwd), v))
        if act:
            launches.append((n * 2 * link.launch_s, v))
    w_fwd = ilp._var(f"off_fwd_{gidx}", lowBound=0)
    w_bwd = ilp._var(f"off_bwd_{gidx}", lowBound=0)
    ilp.prob += w_fwd >= pulp.lpSum(c * v for c, v in down), f"off_fwd_{gidx}"
    ilp.prob += w_bwd >= pulp.lpSum(c * v for c, v in up), f"off_bwd_{gidx}"
    ilp.time_terms["offload"] += [(1.0, w_fwd), (1.0, w_bwd)] + launches
    ilp.mem_terms["host"] += [(n * act, v) for act, _, _, v in terms if act] + list(copies)


def add_optimizer_offload(ilp, link: HostLink) -> None:
    """The binary z of the module docstring: the optimizer terms of the memory rows become O_dev."""
    opt = list(ilp.mem_terms.get("optimizer", []))
    if not opt:
        return
    state = {cat: list(ilp.mem_terms.get(cat, [])) for cat in ("params", "grads", "optimizer")}
    z = ilp._var("opt_offload", cat="Binary")
    o_dev = ilp._var("opt_device", lowBound=0)
    u_o = _upper(ilp, state["optimizer"])
    mib = float(2 ** 20)   # o_dev in MiB like the memory rows (byte-sized values misled HiGHS presolve)
    ilp.prob += o_dev >= pulp.lpSum(c / mib * v for c, v in opt) - u_o / mib * z, "opt_offload_mem"
    secs = ([(c / link.bandwidth, v) for c, v in state["params"] + state["grads"]]
            + [(c / ADAM_STATE_BYTES_PER_ELEMENT * ADAM_BYTES_MOVED_PER_ELEMENT / link.cpu_step_bandwidth, v)
               for c, v in state["optimizer"]])
    t_opt = ilp._var("opt_offload_time", lowBound=0)
    ilp.prob += t_opt >= pulp.lpSum(c * v for c, v in secs) - _upper(ilp, secs) * (1 - z), "opt_offload_time"
    ilp.mem_terms["optimizer"] = [(mib, o_dev)]
    ilp.time_terms["offload"].append((1.0, t_opt))
    ilp.opt_offload = (z, o_dev, t_opt, state, secs)


def _upper(ilp, terms: list) -> float:
    """An upper bound of sum c x over the node one-hots: per key the largest coefficient of its strategies."""
    by_var: dict[str, float] = {}
    for c, v in terms:
        name = getattr(v, "name", None)
        if name is None:   # an expression or a constant: no grouping known, count it whole
            by_var[f"#{len(by_var)}"] = abs(c)
        else:
            by_var[name] = by_var.get(name, 0.0) + abs(c)
    total = 0.0
    for xs in ilp.x.values():
        names = [getattr(x, "name", None) for x in xs]
        total += max((by_var.pop(nm, 0.0) for nm in names if nm is not None), default=0.0)
    return total + sum(by_var.values()) + 1.0


def settle_optimizer_offload(ilp, value) -> dict[str, float]:
    """After solving: O_dev and T_opt at their values (the solver may leave them above their bounds where
    a row does not bind). Returns host bytes of the offloaded optimizer (params + grads + states copies)."""
    if getattr(ilp, "opt_offload", None) is None:
        return {"offloaded": 0.0, "host_bytes": 0.0}
    z, o_dev, t_opt, state, secs = ilp.opt_offload
    on = value(z) > 0.5
    total = {cat: sum(c * value(v) for c, v in terms) for cat, terms in state.items()}
    o_dev.varValue = 0.0 if on else total["optimizer"] / 2 ** 20
    t_opt.varValue = sum(c * value(v) for c, v in secs) if on else 0.0
    return {"offloaded": float(on), "host_bytes": sum(total.values()) if on else 0.0}
