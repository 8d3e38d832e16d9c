"""HuggingFace architectures as users bring them (tests/zoo/models.py), planned and checked on a gloo mesh.

For every zoo entry, bare (the model returning its ModelOutput, default config) and wrapped (a module whose
``forward(**kwargs)`` returns the loss): (a) the default plan and (b) a plan under 40 % of the unconstrained
plan's predicted peak (or the smallest feasible budget, when 40 % is not), each applied on a (2, 2) gloo
mesh and checked against one device (loss, every gradient, one AdamW step under an LR scheduler:
tests/zoo/check.py), and the plan's predicted peak compared with the peak a second step measures
(``autopar.memory``, torch's MemTracker underneath; target +-10 %). Records planning time, ILP size, optimality, replicate fallbacks and the check's
result per row; writes benchmarks/results/zoo.json. Run ``python benchmarks/zoo.py [--models llama,t5]
[--kinds bare] [--mesh 2x2]``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# tests/ for the zoo and the gloo pool; benchmarks/ itself (sys.path[0] when run as a script) comes off
# sys.path, so that no script here shadows a package of the same name
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent / "tests"))
from dist_utils import DistPool  # noqa: E402
from zoo.check import check_zoo_step  # noqa: E402
from zoo.models import ZOO, build  # noqa: E402

import autopar  # noqa: E402


def machine() -> dict:
    spec = importlib.util.spec_from_file_location("_bench_common", HERE / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.machine()

RESULTS = HERE / "results"


def plans_for(name: str, kind: str, mesh: tuple[int, ...]) -> dict[str, tuple[str, dict]]:
    """{"default": (plan JSON, stats), "budget": ...} for one zoo entry."""
    model, inputs = build(name, kind)
    names = ("dp", "tp")[: len(mesh)]
    out = {}
    t0 = time.perf_counter()
    p = autopar.plan(model, inputs, mesh_shape=mesh, mesh_dim_names=names, cluster="cpu-gloo")
    out["default"] = (p, time.perf_counter() - t0)
    budget = int(0.4 * p.predicted.peak_memory_bytes)
    t0 = time.perf_counter()
    try:
        q = autopar.plan(model, inputs, mesh_shape=mesh, mesh_dim_names=names, cluster="cpu-gloo",
                         memory_budget=budget)
    except autopar.InfeasiblePlanError as e:
        budget = int(e.min_feasible_bytes * 1.01) + 1
        q = autopar.plan(model, inputs, mesh_shape=mesh, mesh_dim_names=names, cluster="cpu-gloo",
                         memory_budget=budget)
    out["budget"] = (q, time.perf_counter() - t0)
    return {k: (plan.to_json(), {"plan_s": round(s, 2), "variables": plan.solver.num_variables,
                                 "optimal": plan.solver.optimal, "fallbacks": len(plan.nodes_fallback),
                                 "predicted_peak_bytes": plan.predicted.peak_memory_bytes,
                                 "predicted_breakdown": dict(plan.predicted.memory_breakdown),
                                 "budget_bytes": budget if k == "budget" else None,
                                 "memory_decisions": {"checkpoint": list(plan.checkpoint), "offload": list(plan.offload),
                                                      "zero": len(plan.optimizer_sharding)}})
            for k, (plan, s) in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--kinds", default="bare,kwargs")
    ap.add_argument("--mesh", default="2x2")
    ap.add_argument("--out", default=str(RESULTS / "zoo.json"))
    args = ap.parse_args(argv)
    mesh = tuple(int(x) for x in args.mesh.split("x"))
    world = 1
    for n in mesh:
        world *= n
    rows = []
    pool = DistPool(world, timeout=600)
    try:
        for name in args.models.split(","):
            for kind in args.kinds.split(","):
                try:
                    plans = plans_for(name, kind, mesh)
                except Exception as e:   # a model the planner refuses is a row, not a crash
                    rows.append({"model": name, "kind": kind, "plan": None, "error": f"{type(e).__name__}: {e}"})
                    print(f"{name:10s} {kind:6s} planning failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                for which, (text, stats) in plans.items():
                    t0 = time.perf_counter()
                    try:
                        res = pool.run(check_zoo_step, name, kind, mesh, text, True)
                        ok = all(not r["missing_grads"] and not r["bad"] for r in res)
                        peak = max(r["measured_peak_bytes"] for r in res)
                        err = stats["predicted_peak_bytes"] / peak - 1 if peak else None
                        row = {"model": name, "kind": kind, "plan": which, **stats, "matches_one_device": ok,
                               "measured_peak_bytes": peak, "memory_relative_error": err,
                               "check_s": round(time.perf_counter() - t0, 2), "ranks": res}
                    except Exception as e:
                        row = {"model": name, "kind": kind, "plan": which, **stats, "matches_one_device": False,
                               "error": f"{type(e).__name__}: {str(e)[-600:]}"}
                    rows.append(row)
                    print(f"{name:10s} {kind:6s} {which:7s} plan {stats['plan_s']:6.1f}s {stats['variables']:7d} vars "
                          f"{'optimal' if stats['optimal'] else 'NOT optimal'} fallbacks {stats['fallbacks']:3d} "
                          f"-> {'matches' if row['matches_one_device'] else 'MISMATCH ' + str(row.get('error', row.get('ranks', [{}])[0].get('bad')))[:200]}"
                          f"  memory {row.get('memory_relative_error') or float('nan'):+.1%}",
                          flush=True)
    finally:
        pool.close()
    errs = [r["memory_relative_error"] for r in rows if r.get("memory_relative_error") is not None]
    res = {"mesh": list(mesh), "rows": rows, "matched": sum(bool(r.get("matches_one_device")) for r in rows),
           "total": len(rows), "memory_within_10pct": sum(abs(e) <= 0.1 for e in errs), "memory_rows": len(errs),
           "machine": machine()}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"{res['matched']} of {res['total']} rows match one device; memory within +-10 % in "
          f"{res['memory_within_10pct']} of {res['memory_rows']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
