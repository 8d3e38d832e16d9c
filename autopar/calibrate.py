"""Calibrating the cost model against probe GPTs, for ``autopar profile`` (autopar.profiler).

``calibrate`` scales the per-op overhead and the throughputs so the cost model's forward+backward time
of small GPTs fits their measured time on this device; ``measure_checkpoint_overhead`` fits what
selective and full activation checkpointing cost per op of a checkpointed block beyond the recompute
the cost model charges. Both time the probes with ``autopar.profiler``'s timer.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from autopar.profile import ClusterProfile, DeviceSpec, LinkSpec
from autopar.profiler import ProfileOptions, _timed, fit_per_op


def _probe_model(spec: DeviceSpec, probe: tuple[int, ...], device: torch.device):
    """The probe GPT (layers, d_model, heads, vocab, seq, batch) on ``device``, its inputs, its captured
    graph (blocks not folded) and a one-device profile of ``spec``."""
    from autopar.capture import capture
    from autopar.graph import index_graph
    from autopar.models import load_example_module

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
    from autopar.solver.cost import compute_cost
    from autopar.solver.strategies import strategies_for
    from autopar.solver.strategies.base import in_meta

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
        t = _timed(run, device, opts.trials, opts.warmup)
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
    from autopar.solver.cost import checkpoint_overhead, compute_cost, contraction_flops
    from autopar.solver.strategies import strategies_for
    from autopar.solver.strategies.base import in_meta

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
    import functools

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from autopar.codegen.checkpoint_regions import _selective_policy

    modes = {"full": {}, "selective": {"context_fn": functools.partial(create_selective_checkpoint_contexts,
                                                                        _selective_policy)}}
    rows = []
    for probe in opts.probes:
        model, inputs, charged, ops = _probe_blocks(spec, probe, device)
        plain = [b.forward for b in model.blocks]
        row = {"probe": list(probe), "block_ops": ops, "charged_s": charged,
               "plain_s": _timed(lambda: model(**inputs).backward(), device, opts.trials, opts.warmup)}
        for mode, kw in modes.items():
            for b, f in zip(model.blocks, plain):
                b.forward = functools.partial(checkpoint, f, use_reentrant=False, **kw)
            row[f"{mode}_s"] = _timed(lambda: model(**inputs).backward(), device, opts.trials, opts.warmup)
        for b, f in zip(model.blocks, plain):
            b.forward = f
        rows.append(row)
    out = {mode: fit_per_op([r["block_ops"] for r in rows], [r["plain_s"] for r in rows],
                            [r[f"{mode}_s"] - r["charged_s"][mode] for r in rows]) for mode in modes}
    return (replace(spec, selective_op_overhead_s=out["selective"], recompute_op_overhead_s=out["full"]),
            {"selective_op_overhead_s": out["selective"], "recompute_op_overhead_s": out["full"], "probes": rows})
