"""Randomized plan fuzzing: random feasible plans must train exactly like one device.

Each seed picks a model and a mesh (cycling gpt-tiny / llama-tiny over (2,) and (2,2)) and draws a
random strategy for every graph key (``autopar.solver.random_plan``); the plan is applied on gloo
ranks and one training step (loss, every gradient, the parameters after AdamW) is compared with the
single-device model at fp32 rtol 1e-4 / atol 1e-5 (``tests/fuzz_check.py``, the same check as the
test suite's sample). Prints a table per (model, mesh) and the failing seeds; writes
benchmarks/results/fuzz_plans.json with machine info. Exit code 1 when any plan mismatched.

    python benchmarks/fuzz_plans.py [--n 200] [--seed 0] [--batch-size 10]

``--collectives`` checks the same seeds' plans (without memory decisions) against the runtime model instead:
the collectives the module runs in one step, counted on the ranks (``tests/runtime_model_check.py``), must be
``autopar.solver.runtime_model.planned_collectives`` (phase, kind, mesh dim, bytes); writes
benchmarks/results/fuzz_collectives.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fuzz_plans.json"
COLLECTIVE_RESULTS = ROOT / "benchmarks" / "results" / "fuzz_collectives.json"
sys.path.insert(0, str(ROOT / "tests"))  # the worker functions and the gloo pool live with the tests

from dist_utils import DistPool  # noqa: E402
from fuzz_check import case_for, check_plans, make_case  # noqa: E402
from _common import machine  # noqa: E402


def run(seeds: list[int], chunk: int, timeout: float) -> list[dict]:
    """Check every seed; plans are made here and sent to a pool per world size in chunks."""
    by_world: dict[int, list[int]] = defaultdict(list)
    for s in seeds:
        shape = case_for(s)[1]
        by_world[math.prod(shape)].append(s)
    rows = []
    for world, ws in sorted(by_world.items()):
        pool = DistPool(world, timeout=timeout)
        try:
            for i in range(0, len(ws), chunk):
                part = ws[i:i + chunk]
                cases = []
                for s in part:
                    try:
                        cases.append(make_case(s))
                    except Exception as e:  # noqa: BLE001 - a seed whose plan cannot be made is a failure
                        spec, mesh = case_for(s)
                        rows.append({"seed": s, "spec": spec, "mesh": mesh, "ok": False,
                                     "error": f"planning: {type(e).__name__}: {e}"})
                try:
                    rows.extend(pool.run(check_plans, cases)[0])
                except Exception as e:  # noqa: BLE001 - a hang or crash fails the whole chunk
                    for spec, _, s in cases:
                        rows.append({"seed": s, "spec": spec, "mesh": case_for(s)[1], "ok": False,
                                     "error": f"chunk failed: {type(e).__name__}: {str(e)[:300]}"})
                print(f"  {len(rows)}/{len(seeds)} plans checked", file=sys.stderr, flush=True)
        finally:
            pool.close()
    return sorted(rows, key=lambda r: r["seed"])


def run_collectives(seeds: list[int], chunk: int, timeout: float) -> list[dict]:
    """Per seed: the runtime's collectives (rank 0's; every rank must agree) against planned_collectives."""
    from runtime_model_check import count_collectives, make_plan, planned_counts

    by_world: dict[int, list[int]] = defaultdict(list)
    for s in seeds:
        by_world[math.prod(case_for(s)[1])].append(s)
    rows = []
    for world, ws in sorted(by_world.items()):
        pool = DistPool(world, timeout=timeout)
        try:
            for i in range(0, len(ws), chunk):
                cases = [make_plan(s) for s in ws[i:i + chunk]]
                try:
                    ranks = pool.run(count_collectives, [(spec, p.to_json(), s) for spec, p, s in cases])
                except Exception as e:  # noqa: BLE001 - a hang or crash fails the whole chunk
                    ranks = [[{"error": f"chunk failed: {type(e).__name__}: {str(e)[:300]}"}] * len(cases)]
                for j, (spec, plan, s) in enumerate(cases):
                    row = {"seed": s, "spec": spec, "mesh": list(plan.mesh.shape)}
                    got = [r[j] for r in ranks]
                    if any("error" in g for g in got):
                        row.update(ok=False, error=next(g["error"] for g in got if "error" in g))
                    else:
                        want = planned_counts(spec, plan)
                        bad = [sorted(set(map(tuple, g["counts"])) ^ set(want)) for g in got
                               if [(tuple(k), n) for k, n in g["counts"]] != want]
                        row.update(ok=not bad, calls=sum(n for _, n in want), differing=[str(d) for d in bad[:1]])
                    rows.append(row)
                print(f"  {len(rows)}/{len(seeds)} plans counted", file=sys.stderr, flush=True)
        finally:
            pool.close()
    return sorted(rows, key=lambda r: r["seed"])


def main_collectives(args) -> int:
    t0 = time.perf_counter()
    rows = run_collectives(list(range(args.seed, args.seed + args.n)), args.batch_size, args.timeout)
    wall = time.perf_counter() - t0
    failing = [r for r in rows if not r["ok"]]
    for r in failing:
        print(f"FAIL seed {r['seed']} {r['spec']} mesh {r['mesh']}: {r.get('error') or r['differing']}")
    out = args.out if args.out != RESULTS else COLLECTIVE_RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"plans": len(rows), "mismatches": len(failing), "first_seed": args.seed,
                               "wall_s": wall, "rows": rows, "machine": machine()}, indent=1) + "\n")
    print(f"{len(rows)} plans, {len(failing)} with other collectives than planned, "
          f"{sum(r.get('calls', 0) for r in rows)} calls, {wall:.0f} s (wrote {out})")
    return 1 if failing else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="how many random plans (seeds seed..seed+n-1)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--batch-size", type=int, default=10, help="plans sent to the ranks per call")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per call before ranks are killed")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--collectives", action="store_true",
                    help="check the collectives each plan runs against solver.runtime_model instead of numerics")
    args = ap.parse_args(argv)
    if args.collectives:
        return main_collectives(args)
    t0 = time.perf_counter()
    rows = run(list(range(args.seed, args.seed + args.n)), args.batch_size, args.timeout)
    wall = time.perf_counter() - t0
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["spec"], "x".join(map(str, r["mesh"])))].append(r)
    print(f"{'model':12s} {'mesh':5s} {'plans':>6s} {'mismatch':>9s} {'error':>6s} {'worst excess':>13s}")
    for (spec, mesh), rs in sorted(groups.items()):
        worst = max((r["worst_excess"] for r in rs if "worst_excess" in r), default=float("nan"))
        print(f"{spec:12s} {mesh:5s} {len(rs):6d} {sum(1 for r in rs if 'failing' in r and not r['ok']):9d} "
              f"{sum(1 for r in rs if 'error' in r):6d} {worst:13.2e}")
    failing = [r for r in rows if not r["ok"]]
    for r in failing:
        print(f"FAIL seed {r['seed']} {r['spec']} mesh {r['mesh']}: {r.get('error') or r['failing'][:5]}")
    res = {"plans": len(rows), "mismatches": len(failing), "failing_seeds": [r["seed"] for r in failing],
           "first_seed": args.seed, "wall_s": wall, "tolerance": {"rtol": 1e-4, "atol": 1e-5},
           "by_case": {f"{s} {m}": {"plans": len(rs), "failed": sum(1 for r in rs if not r["ok"]),
                                    "worst_excess": max((r.get("worst_excess", float("-inf")) for r in rs))}
                       for (s, m), rs in sorted(groups.items())},
           "rows": rows, "machine": machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{len(rows)} plans, {len(failing)} mismatches, {wall:.0f} s (wrote {args.out})")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
