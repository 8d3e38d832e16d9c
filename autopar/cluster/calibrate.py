"""Calibrating the cost model against probe GPTs, for ``autopar profile`` (autopar.cluster.measure).

``calibrate`` scales the per-op overhead and the throughputs so the cost model's forward+backward time
of small GPTs fits their measured time on this device; ``measure_checkpoint_overhead`` fits what
selective and full activation checkpointing cost per op of a checkpointed block beyond the recompute
the cost model charges. Both time the probes with ``autopar.cluster.measure``'s timer. ``calibrate_ops`` (per-op
calibration, optional) times a given model's own ops at the local shapes of its candidate strategies, into
the table the cost model charges instead of the roofline where it has an entry.
"""
from __future__ import annotations

import datetime
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.fx as fx
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from autopar.cluster.profile import ClusterProfile, DeviceSpec, LinkSpec, OpKey, OpTable, OpTime
from autopar.cluster.timing import ProfileOptions, fit_per_op, op_overhead, timed
from autopar.codegen.checkpoint_regions import _selective_policy
from autopar.core.capture import capture
from autopar.core.errors import ConfigError
from autopar.core.graph import index_graph
from autopar.models import load_example_module
from autopar.solver.cost import FREE_OPS, checkpoint_overhead, compute_cost, contraction_flops, local_shape, op_key
from autopar.solver.strategies import strategies_for
from autopar.solver.strategies.base import in_meta


def _probe_model(spec: DeviceSpec, probe: tuple[int, ...], device: torch.device):
    """The probe GPT (layers, d_model, heads, vocab, seq, batch) on ``device``, its inputs, its captured
    graph (blocks not folded) and a one-device profile of ``spec``."""

    layers, dm, heads, vocab, seq, batch = probe
    m = load_example_module("gpt")
    torch.manual_seed(0)
    model = m.GPT(m.GPTConfig(n_layer=layers, d_model=dm, n_head=heads, vocab_size=vocab, max_seq_len=seq)).to(device)
    idx = torch.randint(0, vocab, (batch, seq), device=device)
    inputs = {"idx": idx, "labels": idx}
    gi = index_graph(capture(model, inputs, fold_layers=False))
    profile = ClusterProfile(name="probe", device=spec, gpus_per_node=1, intra_node=_LOOPBACK, inter_node=_LOOPBACK,
                             host_bandwidth=1.0)
    return model, inputs, gi, profile


def _probe_costs(spec: DeviceSpec, probe: tuple[int, ...], device: torch.device):
    """(overhead seconds, roofline seconds) the cost model gives the probe GPT's forward+backward on one
    device, and a closure that runs it."""

    model, inputs, gi, profile = _probe_model(spec, probe, device)
    bare = replace(profile, device=replace(spec, op_overhead_s=0.0))
    full = roof = 0.0
    for node in gi.nodes.values():
        if node.kind != "op":
            continue
        strat = strategies_for(node, gi.nodes, (1,))[0][0]  # a mesh of one: the replicated strategy
        metas = [in_meta(node, gi.nodes, i) for i in range(len(node.inputs))]
        full += compute_cost(node, strat, metas, profile, (1,)).total
        roof += compute_cost(node, strat, metas, bare, (1,)).total
    return full - roof, roof, lambda: model(**inputs).backward()


_LOOPBACK = LinkSpec.uniform("none", alpha=0.0, bandwidth=1e12)


def calibrate(spec: DeviceSpec, device: torch.device, opts: ProfileOptions) -> tuple[DeviceSpec, dict]:
    """Scale the per-op overhead (k_o) and the throughputs (1/k_r) so the cost model's forward+backward time
    of GPT probes, k_o * overhead + k_r * roofline, fits their measured time (least squares, relative error).

    Micro-benchmarks miss what a real step pays (autograd, dispatch, kernels less tuned than a square
    GEMM, backward ops dearer than 2x forward); the probes see it at the shapes a transformer has."""
    rows = []
    for probe in opts.probes:
        o, r, run = _probe_costs(spec, probe, device)
        t = timed(run, device, opts.trials, opts.warmup)
        rows.append({"probe": list(probe), "overhead_s": o, "roofline_s": r, "measured_s": t})
    ts = np.array([row["measured_s"] for row in rows])
    terms = np.array([[row["overhead_s"], row["roofline_s"]] for row in rows])
    (k_o, k_r), *_ = np.linalg.lstsq(terms / ts[:, None], np.ones_like(ts), rcond=None)
    if not (k_o > 0 and k_r > 0):  # the probes cannot tell the terms apart: scale both alike
        total = terms.sum(1) / ts
        k_o = k_r = float(np.sum(total) / np.sum(total * total))
    k_o, k_r = float(k_o), float(k_r)
    out = replace(spec, op_overhead_s=spec.op_overhead_s * k_o,
                  peak_flops={k: v / k_r for k, v in spec.peak_flops.items()},
                  memory_bandwidth=spec.memory_bandwidth / k_r)
    for row in rows:
        row["calibrated_s"] = k_o * row["overhead_s"] + k_r * row["roofline_s"]
    return out, {"overhead_scale": k_o, "throughput_scale": 1.0 / k_r, "probes": rows}


def _probe_blocks(spec: DeviceSpec, probe: tuple[int, ...], device: torch.device):
    """The probe GPT, its inputs, and per checkpoint mode what the cost model charges for re-running its
    blocks (selective: the ops other than contractions, full: every op) and how many op nodes the blocks
    hold (what solver.cost.checkpoint_overhead charges per op)."""

    model, inputs, gi, profile = _probe_model(spec, probe, device)
    counted = replace(spec, selective_op_overhead_s=1.0, recompute_op_overhead_s=1.0)
    sel = full = ops = 0.0
    for node in gi.nodes.values():
        if node.kind != "op" or node.layer is None or node.layer[0] not in gi.shared_lists:
            continue
        strat = strategies_for(node, gi.nodes, (1,))[0][0]
        metas = [in_meta(node, gi.nodes, i) for i in range(len(node.inputs))]
        fwd = compute_cost(node, strat, metas, profile, (1,)).fwd_s
        full += fwd
        sel += 0.0 if contraction_flops(node, metas) else fwd
        ops += checkpoint_overhead(node, counted).fwd_s
    return model, inputs, {"selective": sel, "full": full}, ops


def measure_checkpoint_overhead(spec: DeviceSpec, device: torch.device, opts: ProfileOptions
                                ) -> tuple[DeviceSpec, dict]:
    """Per op of a checkpointed block, what selective and full activation checkpointing cost beyond the
    recomputed ops' time the (calibrated) cost model charges: the probe GPTs' forward+backward with their
    blocks under ``torch.utils.checkpoint`` (the selective policy codegen uses), against the same probe
    plain; s = sum_i N_i (T_mode,i - T_plain,i - R_mode,i) / sum_i N_i^2 weighted by 1/T_plain,i^2, N_i
    the blocks' op nodes, R_mode,i what the cost model charges for re-running them; at least 0."""



    modes = {"full": {}, "selective": {"context_fn": functools.partial(create_selective_checkpoint_contexts,
                                                                        _selective_policy)}}
    rows = []
    for probe in opts.probes:
        model, inputs, charged, ops = _probe_blocks(spec, probe, device)
        plain = [b.forward for b in model.blocks]
        row = {"probe": list(probe), "block_ops": ops, "charged_s": charged,
               "plain_s": timed(lambda: model(**inputs).backward(), device, opts.trials, opts.warmup)}
        for mode, kw in modes.items():
            for b, f in zip(model.blocks, plain):
                b.forward = functools.partial(checkpoint, f, use_reentrant=False, **kw)
            row[f"{mode}_s"] = timed(lambda: model(**inputs).backward(), device, opts.trials, opts.warmup)
        for b, f in zip(model.blocks, plain):
            b.forward = f
        rows.append(row)
    out = {mode: fit_per_op([r["block_ops"] for r in rows], [r["plain_s"] for r in rows],
                            [r[f"{mode}_s"] - r["charged_s"][mode] for r in rows]) for mode in modes}
    return (replace(spec, selective_op_overhead_s=out["selective"], recompute_op_overhead_s=out["full"]),
            {"selective_op_overhead_s": out["selective"], "recompute_op_overhead_s": out["full"], "probes": rows})


# --- per-op calibration ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class OpCalibrationOptions:
    """How ``calibrate_ops`` times: ``trials`` medians after ``warmup`` calls, an op repeated (up to 1000
    times) so one trial lasts at least ``min_trial_s``; at most ``max_ops`` distinct ops and ``max_seconds``
    of timed trials (projected from one call of each; the ops left over keep the roofline, and the table's
    sources say how many).

    ``min_trial_s`` spans several scheduler slices (a few ms each where two processes share a core), so a
    trial sees a rank's fair share of its core whether the op is tiny or not. With 2 ms trials, 4 gloo ranks
    on 2 cores ran the timed ops back to back 1.34x slower than the sum of their medians (2 ranks: 0.90x):
    short trials of small ops ran mostly unpreempted, longer single calls of large ones did not."""

    trials: int = 5
    warmup: int = 1
    min_trial_s: float = 20e-3
    max_ops: int = 2000
    max_seconds: float = 600.0

    def __post_init__(self) -> None:
        if self.trials < 1 or self.warmup < 0 or self.max_ops < 0 or not self.max_seconds > 0:
            raise ConfigError(f"op calibration needs trials >= 1, warmup >= 0, max_ops >= 0 and max_seconds > 0, "
                              f"got {self.trials}, {self.warmup}, {self.max_ops}, {self.max_seconds}")


@dataclass(frozen=True)
class _OpCall:
    """One distinct op to time: the captured node (for its target and non-tensor arguments), the local
    shapes and dtypes of its tensor inputs, and the local shapes its outputs must have."""

    node: object
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    out_shapes: tuple[tuple[int, ...] | None, ...]


def collect_ops(caps, mesh_shape: tuple[int, ...]) -> dict[OpKey, _OpCall]:
    """Every distinct op (``solver.cost.op_key``) the ILP can charge for the captured model(s) ``caps`` on a
    mesh of ``mesh_shape``: each op node under each of its candidate strategies, at its local shapes.
    Views and other free ops are left out (the cost model charges them nothing)."""

    mesh_shape = tuple(mesh_shape)
    out: dict[OpKey, _OpCall] = {}
    for cap in (caps if isinstance(caps, (list, tuple)) else [caps]):
        gi = index_graph(cap)
        for members in gi.by_key().values():
            node = members[0]
            if node.kind != "op" or node.target in FREE_OPS or node.fx_node is None:
                continue
            metas = [in_meta(node, gi.nodes, i) for i in range(len(node.inputs))]
            for s in strategies_for(node, gi.nodes, mesh_shape)[0]:
                key = op_key(node, s, metas, mesh_shape)
                if key not in out:
                    outs = tuple(local_shape(m, p, mesh_shape) if m is not None and p is not None else None
                                 for m, p in zip(node.outputs, s.outputs))
                    out[key] = _OpCall(node=node, shapes=key[1], dtypes=tuple(m.dtype for m in metas),
                                       out_shapes=outs)
    return out


def _op_closures(call: _OpCall, device: torch.device):
    """(forward, forward + backward) closures running ``call`` on fresh tensors of its local shapes, or None
    when the op cannot run there or gives other local shapes than the strategy says (its non-tensor
    arguments spell global sizes, e.g. a factory op under a sharded output)."""

    tensors = []
    for shape, dtype in zip(call.shapes, call.dtypes):
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, device=device).to(dtype).requires_grad_())
        elif dtype == torch.bool:
            tensors.append(torch.ones(shape, dtype=dtype, device=device))
        else:  # indices and labels: 0 is valid for every embedding and loss
            tensors.append(torch.zeros(shape, dtype=dtype, device=device))
    it = iter(tensors)

    def arg(a):
        val = a.meta.get("val")
        return next(it) if isinstance(val, torch.Tensor) else val
    fx_node = call.node.fx_node
    args, kwargs = pytree.tree_map_only(fx.Node, arg, (tuple(fx_node.args), dict(fx_node.kwargs)))
    target = call.node.target
    wrt = [t for t in tensors if t.requires_grad]
    try:
        res = target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op that cannot run on fresh tensors keeps the roofline
        return None
    got = [o for o in pytree.tree_leaves(res)]
    shapes = [tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in got]
    want = [s for s in call.out_shapes]
    if len(got) < len(want) or any(w is not None and w != g for w, g in zip(want, shapes)):
        return None
    grads = [torch.ones_like(o) for o in got if isinstance(o, torch.Tensor) and o.requires_grad]

    def fwd():
        return target(*args, **kwargs)

    def fwd_bwd():
        outs = [o for o in pytree.tree_leaves(fwd()) if isinstance(o, torch.Tensor) and o.requires_grad]
        if outs and wrt:
            torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    return fwd, fwd_bwd


def _trial(fn, iters: int, device: torch.device) -> float:
    """Seconds per call of ``iters`` back-to-back calls, the ranks started together."""


    if dist.is_initialized():
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def calibrate_ops(caps, mesh_shape: tuple[int, ...], profile: ClusterProfile, *, device: torch.device | None = None,
                  options: OpCalibrationOptions | None = None) -> OpTable:
    """Per-op calibration: time the captured model's own ops at the local shapes of every strategy the
    ILP considers on ``mesh_shape`` (``collect_ops``: deduplicated, capped by ``options``) on this device,
    forward and forward + backward (median of trials taken in rounds over all ops), into an
    :class:`~autopar.cluster.profile.OpTable` that
    ``solver.cost.compute_cost`` charges instead of the roofline (attach it with
    ``dataclasses.replace(profile, op_times=table)``). ``caps``: one CapturedModel or several (e.g. one per
    micro-batch size of a pipeline). Every timed op's tensors stay allocated until the rounds end (all ops
    at all their local shapes at once): where they would not fit the device together, cap ``max_ops``.

    Contention: where ranks share cores (4 gloo ranks on 2 cores) an op timed in one process runs about as
    fast as on an idle core, several times faster than in a step where every rank computes at once. So the
    ops are timed the way ``autopar profile`` times everything: call this on every rank of the process group
    at once (each rank times the same op at the same moment: a barrier before every trial, the slowest
    rank's median). The table records how many ranks timed it and a profile accepts only
    a table of its own world size (``OpTableError`` otherwise). A slow-down factor measured once and
    applied to single-process times was the alternative; it would have to be one number for ops whose
    slow-down differs (small ops are dispatch-bound, large ones share caches and memory bandwidth).
    Without a process group the table is for one rank. One factor is measured all the same, for what
    short trials miss (``OpTable.scale``): a trial repeats one op for ~``min_trial_s`` on warm caches and
    is rarely preempted by a process sharing the core, a step runs every op once for as long as it lasts;
    the timed ops once each back to back (median of trials, slowest rank) over the sum of their medians.

    ``extra_op_s``: what a step pays per op beyond the op itself (views, autograd bookkeeping), which the
    probe calibration folded into ``profile.device.op_overhead_s``: that overhead minus the raw per-op
    overhead measured now beside the ops (``profiler._op_overhead``, at least 0)."""



    log = logging.getLogger(__name__)
    opts = options or OpCalibrationOptions()
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                        and dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu"))
    ranks = dist.get_world_size() if dist.is_initialized() else 1
    calls = collect_ops(caps, mesh_shape)
    timing = ProfileOptions(trials=opts.trials, warmup=opts.warmup)
    t0 = time.perf_counter()
    # 1. which ops run, and how many calls make one trial of each (every rank must make the same timed
    #    calls: the ranks agree on runnable and on the estimates); the budget is projected from them
    runs: list[tuple[OpKey, Callable, Callable, int, int]] = []
    skipped = unrunnable = 0
    projected = 0.0
    for i, (key, call) in enumerate(calls.items()):
        closures = _op_closures(call, device) if i < opts.max_ops else None
        est = [0.0, 0.0]
        if closures is not None:
            for j, f in enumerate(closures):
                for _ in range(opts.warmup):
                    f()
                s = time.perf_counter()
                f()
                est[j] = time.perf_counter() - s
        flags = torch.tensor([0.0 if closures is not None else 1.0, *est], dtype=torch.float64)
        if dist.is_initialized():
            flags = flags.to(device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.cpu()
        iters = [max(1, min(1000, round(opts.min_trial_s / max(float(e), 1e-7)))) for e in flags[1:]]
        cost = opts.trials * sum(n * float(e) for n, e in zip(iters, flags[1:]))
        if i >= opts.max_ops or projected + cost > opts.max_seconds:
            skipped += 1
            continue
        if float(flags[0]):
            unrunnable += 1
            continue
        projected += cost
        runs.append((key, *closures, *iters))
    # 2. rounds over all ops, one trial of each per round, so a slow spell of the host (another process)
    #    hits every op alike rather than the ops timed during it; medians over rounds, slowest rank
    samples = [([], []) for _ in runs]
    for _ in range(opts.trials):
        for (key, fwd, fwd_bwd, n_f, n_fb), (s_f, s_fb) in zip(runs, samples):
            s_f.append(_trial(fwd, n_f, device))
            s_fb.append(_trial(fwd_bwd, n_fb, device))
    med = torch.tensor([[float(np.median(a)), float(np.median(b))] for a, b in samples] or [[0.0, 0.0]],
                       dtype=torch.float64)
    if dist.is_initialized():
        med = med.to(device)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        med = med.cpu()
    times: dict[OpKey, OpTime] = {}
    chain: list = []   # (forward + backward closure, its median) of every timed op
    for (key, _f, fwd_bwd, _nf, _nfb), (t_f, t_fb) in zip(runs, med.tolist()):
        times[key] = OpTime(fwd_s=t_f, bwd_s=max(0.0, t_fb - t_f))
        chain.append((fwd_bwd, t_fb))
    if skipped:
        log.warning("op calibration: %d of %d ops not timed (max_ops %d, max_seconds %.0f); they keep the roofline",
                    skipped, len(calls), opts.max_ops, opts.max_seconds)
    scale = 1.0
    if chain:   # the timed ops once each, back to back, as a step runs them
        t_chain = timed(lambda: [f() for f, _ in chain], device, timing.trials, 1)
        scale = t_chain / sum(t for _, t in chain)
    raw = op_overhead(device, timing)
    extra = max(0.0, profile.device.op_overhead_s - raw)
    return OpTable(times=times, ranks=ranks, extra_op_s=extra, scale=scale, sources={
        "device": f"timed by autopar.cluster.calibrate.calibrate_ops on {device} with {ranks} rank(s) at once",
        "ops": f"{len(times)} timed, {unrunnable} not runnable on fresh tensors, {skipped} over the cap",
        "raw_op_overhead_s": f"{raw:.3e}", "seconds": f"{time.perf_counter() - t0:.1f}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
