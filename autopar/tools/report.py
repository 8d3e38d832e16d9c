"""Readable tables of a Plan (``autopar show``). Formatting only: no planning, no I/O."""
from __future__ import annotations

import re
from collections import OrderedDict

from autopar.core.plan import Plan


def fmt_bytes(b: float) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(b) >= k:
            return f"{b / k:.2f} {unit}"
    return f"{b:.0f} B"


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _zero(plan: Plan, fqn: str) -> str:
    """``ZeRO-2 S(0)``: the ZeRO stage of a parameter and where its optimizer state lives ("-": none)."""
    zs = plan.optimizer_sharding.get(fqn)
    if zs is None:
        return "-"
    return f"ZeRO-{2 if fqn in plan.gradient_sharding else 1} {' '.join(zs)}"


def param_rows(plan: Plan) -> list[list[str]]:
    """Parameters with layer indices collapsed: ``blocks.{0..31}.attn.q_proj.weight``; a ZeRO column
    when the plan shards optimizer states."""
    with_zero = bool(plan.optimizer_sharding)
    groups: OrderedDict[tuple[str, tuple[str, ...], str], list[int]] = OrderedDict()
    for fqn, pl in plan.param_placements.items():
        z = _zero(plan, fqn) if with_zero else ""
        m = re.match(r"^(.*?\.)(\d+)(\..*)$", fqn)
        if m:
            groups.setdefault((f"{m.group(1)}{{}}{m.group(3)}", pl, z), []).append(int(m.group(2)))
        else:
            groups.setdefault((fqn, pl, z), []).append(-1)
    rows = []
    for (name, pl, z), idx in groups.items():
        if idx != [-1]:
            idx = sorted(idx)
            span = f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 else ",".join(map(str, idx))
            name = name.format(span)
        rows.append([name, " ".join(pl)] + ([z] if with_zero else []))
    return rows


def summary(plan: Plan) -> str:
    p, s = plan.predicted, plan.solver
    mesh = " x ".join(f"{n}={k}" for n, k in zip(plan.mesh.dim_names, plan.mesh.shape))
    tb = ", ".join(f"{k.removesuffix('_s')} {fmt_time(v)}" for k, v in p.time_breakdown.items() if v)
    mb = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.memory_breakdown.items() if k != "host")
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in s.phase_times_s.items())
    folded = "".join(f" ({k}: {v} blocks, planned once)" for k, v in plan.model.folded_layers.items())
    lines = [f"plan v{plan.version}  mesh {mesh}  cluster {plan.cluster.name}  model {plan.model.fingerprint}"
             f"  {plan.model.num_parameters / 1e6:.1f}M params{folded}",
             f"predicted step time {fmt_time(p.step_time_s)}  ({tb or 'no cost'})",
             f"predicted peak memory per device {fmt_bytes(p.peak_memory_bytes)}  ({mb})"
             + (f"; offloaded to host {fmt_bytes(p.memory_breakdown['host'])}" if p.memory_breakdown.get("host") else ""),
             f"solver {s.backend} {s.status}{'' if s.optimal else ' (not proven optimal)'}: "
             f"{s.num_variables} variables, {s.num_constraints} constraints; {phases}"]
    decisions = memory_decisions(plan)
    if decisions != "none":
        lines.append(f"memory decisions: {decisions}")
    if plan.nodes_fallback:
        lines.append(f"replicate fallback (no sharding rule): {', '.join(plan.nodes_fallback)}")
    return "\n".join(lines)


def memory_decisions(plan: Plan) -> str:
    """One line: recomputed and offloaded blocks, ZeRO-1/2 parameters, optimizer on the host (``none``
    without any)."""
    parts = []
    for mode in ("full", "selective"):
        names = [c.rsplit(":", 1)[0] for c in plan.checkpoint if c.endswith(f":{mode}")]
        if names:
            parts.append(f"recompute {mode} {_span(names)}")
    if plan.offload:
        parts.append(f"offload activations {_span(list(plan.offload))}")
    if plan.optimizer_sharding:
        z2 = len(plan.gradient_sharding)
        parts.append(f"ZeRO-1 {len(plan.optimizer_sharding) - z2} params, ZeRO-2 {z2} params")
    if plan.optimizer_offload:
        parts.append("optimizer on host")
    return "; ".join(parts) or "none"


def _span(names: list[str]) -> str:
    """``blocks.0, blocks.1, blocks.2`` -> ``blocks.0..2``."""
    idx = [int(n.rsplit(".", 1)[1]) for n in names if n.rsplit(".", 1)[-1].isdigit()]
    if not names or len(idx) != len(names):
        return ", ".join(names)
    head = names[0].rsplit(".", 1)[0]
    return f"{head}.{idx[0]}" if len(idx) == 1 else f"{head}.{idx[0]}..{idx[-1]}"


def pipeline_lines(plan: Plan) -> list[str]:
    """The stage table of a pipelined plan (empty without stages)."""
    p = plan.pipeline
    if not p:
        return []
    v = p["virtual_stages"]
    head = (f"pipeline over {p['pp_dim']}: {len(p['stages'])} stages, schedule {p['schedule']}, "
            f"{p['microbatches']} micro-batches" + (f", {v} virtual stages per rank" if v > 1 else "") +
            f", predicted bubble {100 * p['predicted_bubble_fraction']:.1f}%")
    rows = [[str(st["index"]), str(st["pp_rank"]), _span(st["layers"]), str(len(st["params"])),
             fmt_time(st.get("time_s", 0.0)), fmt_bytes(st.get("memory_bytes", 0))] for st in p["stages"]]
    return ["", head, _table(["stage", "pp rank", "layers", "params", "time/mb", "memory"], rows)]


def fusion_lines(plan: Plan) -> list[str]:
    """The fused kernels the plan's costs assume (empty when it was planned unfused)."""
    if not plan.fusions:
        return []
    rows = [[f.root, f.kind, str(len(f.nodes)), str(f.count), fmt_time(f.time_saved_s)] for f in plan.fusions]
    total = sum(f.time_saved_s for f in plan.fusions)
    return ["", f"fused kernels (autopar.runtime_kernels, substituted on a CUDA mesh): predicted saving "
                f"{fmt_time(total)} per step",
            _table(["root", "kernel", "ops", "count", "saved"], rows)]


def render(plan: Plan) -> str:
    parts = [summary(plan), *pipeline_lines(plan), "", "parameters",
             _table(["parameter", "placement"] + (["optimizer state"] if plan.optimizer_sharding else []),
                    param_rows(plan))]
    if plan.layers:   # a pipelined plan keeps its per-module costs in each stage's plan
        parts += ["", "layers", _table(["module", "count", "time", "comm", "memory"],
                                       [[r.name, str(r.count), fmt_time(r.time_s), fmt_time(r.comm_s),
                                         fmt_bytes(r.memory_bytes)] for r in plan.layers])]
    return "\n".join([*parts, *fusion_lines(plan)])
