"""Offload decisions of the sharding ILP: activations of repeated blocks and optimizer states to host.

Both are parts of solver.model's ShardingModel (this file holds their cost model and their part of the
model, written through the model's public interface; the ILP's docstring writes them in math). Offload
is offered only where the host is not the device (``ClusterProfile.host_is_device``: on ``cpu-gloo``
"host memory" is the same memory, so offloading frees nothing and costs copies). Host memory is not a
constraint (its bytes are reported as the plan's ``memory_breakdown.host``). Units: seconds, bytes
(memory variables in MiB like the ILP's rows). Must not import codegen.

Activation offload (per repeated-block list g of N blocks, a fourth mode "off" next to keep /
selective / full recompute, count c_off): an offloaded block keeps nothing on the device; in forward
its kept bytes a_block travel down the host link, in backward back up, each copy overlapping the
compute of one block (the copy of block i runs while block i+1 computes, and the reverse in
backward), and each tensor copy pays one launch (``op_overhead_s``) that does not overlap:
    W^fwd_g >= c_off (a_block / bw - f_block),  W^bwd_g >= c_off (a_block / bw - b_block),  W >= 0
    time    += W^fwd_g + W^bwd_g + c_off 2 n_tensors op_overhead_s
(exact for the products with the strategy choice through the mode fractions v_{k,s,off} of
remat.Remat.build, and for the max() because W is minimized). In backward an offloaded block's saved
tensors come back one op at a time (codegen.offload_activations copies a tensor back when its op's
backward needs it, and the copy dies with that op): the recompute row's T_g holds the largest op's
saved bytes of the block (solver.remat), not the whole block a recomputed one holds.

Optimizer offload (ZeRO-Offload style, one binary z for the model, runtime in
``autopar.runtime.host_optimizer``): AdamW states and the fp32 master copy live in host memory and the
step runs on the CPU. With P, Grad, O the device bytes of parameters, gradients and optimizer states
under the chosen shardings:
    O_dev >= O - U_O z,  O_dev >= 0                  (O_dev replaces O in every memory row)
    T_opt >= Grad / bw + P / bw + O/8 * 28 B / cpu_bw - U_T (1 - z),  T_opt >= 0     -> objective
The copies and the CPU step are serial with the step (the runtime copies gradients after backward).
"""
from __future__ import annotations

from dataclasses import dataclass

import pulp

from autopar.cluster.profile import ClusterProfile
from autopar.solver.model import UNIT, MemCategory, ShardingModel, TimeCategory, value

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


def add_block_offload(m: ShardingModel, gidx: int, n: int, terms: list[tuple[float, float, float, list]],
                      link: HostLink, copies: list | tuple = (), copy_tensors: list | tuple = ()) -> None:
    """The "off" mode's time for block list number ``gidx`` of ``n`` blocks. ``terms``: per (key, strategy)
    (bytes one block keeps, forward s, backward s, v_off variable) as solver.remat records them;
    ``copies`` / ``copy_tensors``: (coefficient, variable) terms of the bytes and the tensors of the resharded
    copies all offloaded blocks keep, already multiplied by c_off (solver.remat's kept copies)."""
    down = [(c / link.bandwidth, v) for c, v in copies]
    up = list(down)
    launches = [(2 * link.launch_s * c, v) for c, v in copy_tensors]
    for act, fwd, bwd, v in terms:
        down.append((n * (act / link.bandwidth - fwd), v))
        up.append((n * (act / link.bandwidth - bwd), v))
        if act:
            launches.append((n * 2 * link.launch_s, v))
    w_fwd = m.var(f"off_fwd_{gidx}", lowBound=0)
    w_bwd = m.var(f"off_bwd_{gidx}", lowBound=0)
    m.add_row(w_fwd >= pulp.lpSum(c * v for c, v in down), f"off_fwd_{gidx}")
    m.add_row(w_bwd >= pulp.lpSum(c * v for c, v in up), f"off_bwd_{gidx}")
    m.add_time(TimeCategory.OFFLOAD, [(1.0, w_fwd), (1.0, w_bwd)] + launches)
    m.add_mem(MemCategory.HOST, [(n * act, v) for act, _, _, v in terms if act] + list(copies))


class OptimizerOffload:
    """The binary z of the module docstring. ``build`` runs after every optimizer-state term (ZeRO's
    included): the optimizer terms of the memory rows become O_dev. ``switch`` is z (None where there is no
    optimizer state); ``offloaded`` / ``host_bytes`` read the decision after solving."""

    def __init__(self, model: ShardingModel, link: HostLink) -> None:
        self.model, self.link = model, link
        self.switch: pulp.LpVariable | None = None
        self._state: dict[MemCategory, list] = {}

    def build(self) -> None:
        m, link = self.model, self.link
        opt = list(m.mem_terms(MemCategory.OPTIMIZER))
        if not opt:
            return
        state = {cat: list(m.mem_terms(cat)) for cat in (MemCategory.PARAMS, MemCategory.GRADS, MemCategory.OPTIMIZER)}
        z = m.var("opt_offload", cat="Binary")
        o_dev = m.var("opt_device", lowBound=0)
        u_o = _upper(m, state[MemCategory.OPTIMIZER])
        m.add_row(o_dev >= pulp.lpSum(c / UNIT * v for c, v in opt) - u_o / UNIT * z, "opt_offload_mem")
        secs = ([(c / link.bandwidth, v) for c, v in state[MemCategory.PARAMS] + state[MemCategory.GRADS]]
                + [(c / ADAM_STATE_BYTES_PER_ELEMENT * ADAM_BYTES_MOVED_PER_ELEMENT / link.cpu_step_bandwidth, v)
                   for c, v in state[MemCategory.OPTIMIZER]])
        t_opt = m.var("opt_offload_time", lowBound=0)
        m.add_row(t_opt >= pulp.lpSum(c * v for c, v in secs) - _upper(m, secs) * (1 - z), "opt_offload_time")
        m.replace_mem(MemCategory.OPTIMIZER, [(UNIT, o_dev)])
        m.add_time(TimeCategory.OFFLOAD, [(1.0, t_opt)])
        self.switch, self._state = z, state

        def settle() -> None:   # O_dev and T_opt at their values (the solver may leave them above their bounds)
            on = self.offloaded()
            o_dev.varValue = 0.0 if on else self._total(MemCategory.OPTIMIZER) / UNIT
            t_opt.varValue = sum(c * value(v) for c, v in secs) if on else 0.0
        m.on_settle(settle)

    def offloaded(self) -> bool:
        return self.switch is not None and value(self.switch) > 0.5

    def host_bytes(self) -> float:
        """After solving: host bytes of the offloaded optimizer (params + grads + states copies)."""
        return sum(self._total(cat) for cat in self._state) if self.offloaded() else 0.0

    def _total(self, cat: MemCategory) -> float:
        return sum(c * value(v) for c, v in self._state[cat])


def _upper(m: ShardingModel, terms: list) -> float:
    """An upper bound of sum c x over the node one-hots: per key the largest coefficient of its strategies."""
    by_var: dict[str, float] = {}
    for c, v in terms:
        name = getattr(v, "name", None)
        if name is None:   # an expression or a constant: no grouping known, count it whole
            by_var[f"#{len(by_var)}"] = abs(c)
        else:
            by_var[name] = by_var.get(name, 0.0) + abs(c)
    total = 0.0
    for xs in m.x.values():
        names = [getattr(x, "name", None) for x in xs]
        total += max((by_var.pop(nm, 0.0) for nm in names if nm is not None), default=0.0)
    return total + sum(by_var.values()) + 1.0
