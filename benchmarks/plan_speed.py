"""How long planning takes: capture -> strategies -> ILP -> solved Plan, for published model sizes.

For each model (built on the meta device, so nothing is allocated) on a mesh with a cluster preset,
times every phase (model build, capture, index, strategies, build_ilp, solve, write_plan) and the
total from the start of capture to the returned Plan, and records the ILP size, the solver status
and the plan's predicted step time and peak memory per device. With ``--repeats N`` every figure is
the median of N runs. One untimed warm-up plan of ``gpt-tiny`` runs first, so the first model
measured does not pay the process's one-time import and tracing set-up.

Prints a table and writes ``benchmarks/results/plan_speed.json`` with the machine's description and
``targets_met`` (capture -> plan seconds against the targets below, on a 2-core machine).

    python benchmarks/plan_speed.py                      # gpt2-xl, llama3-8b, llama3-70b on 8x8
    python benchmarks/plan_speed.py --models llama3-8b --mesh 4x8 --repeats 3
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from autopar.core.capture import capture
from autopar.core.mesh import MeshSpec
from autopar.models import build_model
from autopar.cluster.profile import load_cluster
from autopar.solver import plan_graph

RESULTS = Path(__file__).resolve().parent / "results" / "plan_speed.json"
DEFAULT_MODELS = ("gpt2-xl", "llama3-8b", "llama3-70b")
BATCH = 8
SEQ = {"gpt2": 1024, "llama": 2048}
TARGETS_S = {"llama3-8b": 10.0, "llama3-70b": 20.0}  # capture -> plan, 2 CPU cores
PHASES = ("build_model", "capture", "index", "strategies", "build_ilp", "solve", "write_plan")


def seq_for(model: str) -> int:
    return SEQ["llama"] if model.startswith("llama") else SEQ["gpt2"]


def plan_once(model_name: str, mesh: MeshSpec, cluster: str, batch: int, seq: int) -> dict:
    """One timed run: build on meta, capture, plan. Returns phase times, ILP size and predictions."""
    profile = load_cluster(cluster)
    t0 = time.perf_counter()
    model, inputs = build_model(model_name, batch=batch, seq=seq, device="meta")
    t1 = time.perf_counter()
    cap = capture(model, inputs)
    t2 = time.perf_counter()
    plan = plan_graph(cap, mesh, profile, budget=profile.device.memory_capacity, phase_times={"capture": t2 - t1})
    t3 = time.perf_counter()
    phases = {"build_model": t1 - t0, **plan.solver.phase_times_s}
    return {"phases_s": {k: phases.get(k, 0.0) for k in PHASES}, "capture_to_plan_s": t3 - t1,
            "num_variables": plan.solver.num_variables, "num_constraints": plan.solver.num_constraints,
            "backend": plan.solver.backend, "status": plan.solver.status, "optimal": plan.solver.optimal,
            "step_time_s": plan.predicted.step_time_s, "peak_memory_bytes": plan.predicted.peak_memory_bytes,
            "num_parameters": plan.model.num_parameters, "folded_layers": dict(plan.model.folded_layers)}


def median_run(runs: list[dict]) -> dict:
    """Medians of the timings over runs; the ILP and the predictions are the same in every run."""
    out = dict(runs[-1])
    out["phases_s"] = {k: statistics.median(r["phases_s"][k] for r in runs) for k in PHASES}
    out["capture_to_plan_s"] = statistics.median(r["capture_to_plan_s"] for r in runs)
    out["capture_to_plan_runs_s"] = [r["capture_to_plan_s"] for r in runs]
    return out


def machine_info() -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "pulp": version("pulp"), "highspy": version("highspy"), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu_model": cpu_model, "torch_threads": torch.get_num_threads()}


def render_table(results: dict[str, dict]) -> str:
    head = ["model", *PHASES, "capture->plan", "target", "vars", "constrs", "status", "step time", "peak mem"]
    rows = []
    for name, r in results.items():
        target = TARGETS_S.get(name)
        ok = "" if target is None else f"<={target:.0f}s {'ok' if r['capture_to_plan_s'] <= target else 'MISSED'}"
        status = r["status"] + ("" if r["optimal"] else " (not proven)")
        rows.append([name, *(f"{r['phases_s'][k]:.2f}" for k in PHASES), f"{r['capture_to_plan_s']:.2f}", ok,
                     str(r["num_variables"]), str(r["num_constraints"]), status,
                     f"{r['step_time_s'] * 1e3:.1f} ms", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]) + \
        "\n(phase columns in seconds; capture->plan = capture .. write_plan)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated built-in model names")
    ap.add_argument("--mesh", default="8x8", help="mesh shape (default 8x8)")
    ap.add_argument("--cluster", default="h100-sxm", help="cluster preset (default h100-sxm)")
    ap.add_argument("--batch", type=int, default=BATCH, help=f"global batch (default {BATCH})")
    ap.add_argument("--repeats", type=int, default=1, help="runs per model; figures are medians (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    mesh = MeshSpec.make(args.mesh)

    plan_once("gpt-tiny", MeshSpec.make((2,)), "cpu-gloo", 2, 16)  # warm-up, untimed
    results: dict[str, dict] = {}
    for name in models:
        runs = [plan_once(name, mesh, args.cluster, args.batch, seq_for(name)) for _ in range(args.repeats)]
        results[name] = {"batch": args.batch, "seq": seq_for(name), **median_run(runs)}
        print(f"{name}: capture->plan {results[name]['capture_to_plan_s']:.2f}s", file=sys.stderr, flush=True)

    checked = {n: results[n]["capture_to_plan_s"] <= t for n, t in TARGETS_S.items() if n in results}
    report = {"benchmark": "plan_speed", "mesh": list(mesh.shape), "cluster": args.cluster, "repeats": args.repeats,
              "statistic": "median", "warmup": "gpt-tiny on (2,) cpu-gloo, untimed", "machine": machine_info(),
              "targets_s": TARGETS_S, "target_results": checked,
              "targets_met": all(checked.values()) if checked else None, "models": results}
    print(render_table(results))
    print(f"targets met: {report['targets_met']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
