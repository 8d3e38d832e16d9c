"""Cost-model fidelity: does the plan autopar predicts fastest run fastest?

1. ``autopar profile`` measures a 2-rank mesh (2,) and a 4-rank mesh (2, 2) of gloo processes.
2. On each mesh, candidate plans of the example GPT are solved against that measured profile: forced
   replicated (every op on the whole batch), pure DP, DP with selective and with full recompute,
   ZeRO-3-style (every parameter sharded on dp), Megatron TP (with full recompute on (2,)), DPxTP,
   TP over both dims (``autopar.plan(..., fix=..., prefer=..., recompute=...)`` as the apply tests force
   them) and the solver's own plan. Each plan's ``predicted.step_time_s`` is its prediction. A
   candidate that solves to the same plan as an earlier one (same placements and decisions) is run and
   scored once and listed under ``same_plan_as``.
3. Every plan is applied with ``autopar.parallelize(..., plan=...)`` and timed: forward + backward
   (what the cost model covers; bucketed DP gradient reduction runs inside backward), and the full
   step with AdamW for reference; rounds alternate between plans, medians of per-round means, the
   slowest rank counts. Each rank's CPU time of forward + backward is recorded beside the wall time
   (``score_cpu_time``, not the target): it leaves out time a rank waits for a core other processes hold.

``--precision bf16``: every candidate is planned with ``precision="bf16"`` (priced at autocast's dtypes, the
profile's measured bfloat16 peak) and runs under CPU autocast; with ``--no-calibrate-ops`` (the per-op
calibration times the captured float32 ops) it writes results/cost_fidelity_bf16.json.

Reports per mesh and over both: Spearman rank correlation of predicted vs measured (target >= 0.9),
mean absolute error and mean relative error, and whether the solver's plan is within 10 % of the
measured best. Writes benchmarks/results/cost_fidelity.json with every prediction and measurement
and machine info (including the load average: the host's cores may be shared with other jobs).

    python benchmarks/cost_fidelity.py [--steps 4] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import spearmanr  # the bench extra: pip install ".[bench]"


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_worker, free_port, machine  # noqa: E402


def _machine() -> dict:
    import pulp
    return machine(pulp=pulp.__version__)


RESULTS = Path(__file__).resolve().parent / "results"
GPT = dict(vocab_size=1024, max_seq_len=64, n_layer=4, n_head=8, d_model=128)
BATCH, SEQ = 8, 64
COLUMN = ["*attn.qkv.weight", "*attn.qkv.bias", "*mlp.fc.weight", "*mlp.fc.bias"]
ROW = ["*attn.proj.weight", "*mlp.proj.weight"]
SDPA = "blocks.*/attn/scaled_dot_product_attention#0"


def _on(ndim: int, dims, placement: str) -> list[str]:
    return [placement if d in dims else "R" for d in range(ndim)]


def _megatron(ndim: int, tp_dims, dp_dims=()) -> dict:
    """Column-parallel QKV/fc, row-parallel projections on tp_dims; batch split on dp_dims; heads split."""
    fix = {"input:*": _on(ndim, dp_dims, "S(0)")}
    fix.update({f"param:{g}": _on(ndim, tp_dims, "S(0)") for g in COLUMN})
    fix.update({f"param:{g}": _on(ndim, tp_dims, "S(1)") for g in ROW})
    fix["param:*"] = ["R"] * ndim
    sdpa = ["S(1)" if d in tp_dims else "S(0)" if d in dp_dims else "R" for d in range(ndim)]
    return {"fix": fix, "prefer": {SDPA: sdpa}}


def _data_parallel(ndim: int, dims, params: str = "R") -> dict:
    """Batch split on dims (positions replicated), parameters replicated (DP) or sharded on dims (ZeRO-3)."""
    return {"fix": {"input:*": _on(ndim, dims, "S(0)"), "param:*": _on(ndim, dims, params) if params != "R"
                    else ["R"] * ndim},
            "prefer": {"root/arange*": ["R"] * ndim, "wpe/*": ["R"] * ndim, "*": _on(ndim, dims, "S(0)")}}


def _replicated(ndim: int) -> dict:
    """Every rank computes the whole batch: inputs, parameters and every op's output replicated."""
    return {"fix": {"input:*": ["R"] * ndim, "param:*": ["R"] * ndim}, "prefer": {"*": ["R"] * ndim}}


def _recompute(opts: dict, mode: str) -> dict:
    return {**opts, "recompute": mode}


def candidates(mesh: tuple[int, ...]) -> dict[str, dict | None]:
    """name -> plan options (None: the solver's own plan)."""
    if len(mesh) == 1:
        dp = _data_parallel(1, (0,))
        return {"replicated": _replicated(1), "dp": dp, "dp_recompute_selective": _recompute(dp, "selective"),
                "dp_recompute_full": _recompute(dp, "full"), "zero3": _data_parallel(1, (0,), "S(0)"),
                "tp": _megatron(1, (0,)), "tp_recompute_full": _recompute(_megatron(1, (0,)), "full"),
                "solver": None}
    dp = _data_parallel(2, (0, 1))
    return {"replicated": _replicated(2), "dp": dp, "dp_recompute_selective": _recompute(dp, "selective"),
            "dp_recompute_full": _recompute(dp, "full"), "zero3_dp": _data_parallel(2, (0,), "S(0)"),
            "dp_x_tp": _megatron(2, (1,), (0,)), "tp_x_tp": _megatron(2, (0, 1)), "solver": None}


def plan_identity(plan_json: str) -> str:
    """What the runtime executes: placements, memory decisions and pipeline of a plan (not its predictions)."""
    d = json.loads(plan_json)
    keep = ("param_placements", "node_shardings", "checkpoint", "offload", "optimizer_sharding", "optimizer_offload",
            "gradient_sharding", "pipeline", "precision", "fusions")
    return json.dumps({k: d.get(k) for k in keep}, sort_keys=True)


def distinct(plans: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> plan JSON of the first candidate of each distinct plan, name -> the earlier name it repeats)."""
    first: dict[str, str] = {}
    kept, same = {}, {}
    for name, text in plans.items():
        ident = plan_identity(text)
        if ident in first:
            same[name] = first[ident]
        else:
            first[ident] = name
            kept[name] = text
    return kept, same


def _model():
    from autopar.models import load_example_module
    torch.manual_seed(0)
    m = load_example_module("gpt")
    model = m.GPT(m.GPTConfig(**GPT))
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, GPT["vocab_size"], (BATCH, SEQ), generator=g)
    return model, {"idx": idx, "labels": torch.roll(idx, -1, dims=1)}


def _time(module, inputs, opt, steps: int) -> tuple[float, float, float]:
    """(forward+backward seconds, full step seconds, forward+backward CPU seconds of this process) per
    step, means over ``steps``."""
    fb = full = cpu = 0.0
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        module(**inputs).backward()
        t1, c1 = time.perf_counter(), time.process_time()
        opt.step()
        t2 = time.perf_counter()
        fb, full, cpu = fb + (t1 - t0), full + (t2 - t0), cpu + (c1 - c0)
    return fb / steps, full / steps, cpu / steps


def _worker(rank: int, world: int, port: int, mesh_shape, profile: str, steps: int, rounds: int, calibrate: bool,
            out_q, precision: str = "fp32") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import dataclasses

        import autopar
        from autopar.cluster.calibrate import calibrate_ops
        from autopar.core.capture import capture
        from autopar.cluster.profile import load_cluster
        from autopar.core.plan import Plan
        from torch.distributed.device_mesh import init_device_mesh
        names = ("dp",) if len(mesh_shape) == 1 else ("dp", "tp")
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
        cands = candidates(mesh_shape)
        if precision != "fp32":   # every candidate planned (priced, budgeted) and run in that precision
            cands = {n: {**(o or {}), "precision": precision} for n, o in cands.items()}
        uncal = load_cluster(profile)
        cluster, cal_info = uncal, None
        if calibrate:   # every rank times the model's ops at once, as a step runs them (calibrate_ops)
            t0 = time.perf_counter()
            model, inputs = _model()
            table = calibrate_ops(capture(model, inputs), mesh_shape, uncal)
            cluster = dataclasses.replace(uncal, op_times=table)
            cal_info = {"seconds": time.perf_counter() - t0, "ops": len(table.times), "extra_op_s": table.extra_op_s,
                        "sources": table.sources}
            if rank == 0:
                cluster.to_json(Path(profile).with_name(Path(profile).stem + "_ops.json"))
        texts = [None]
        if rank == 0:
            plans, plan_s, uncal_pred = {}, {}, {}
            for name, opts in cands.items():
                model, inputs = _model()
                t0 = time.perf_counter()
                plans[name] = autopar.plan(model, inputs, mesh_shape=mesh_shape, mesh_dim_names=names,
                                           cluster=cluster, **(opts or {})).to_json()
                plan_s[name] = time.perf_counter() - t0
                if calibrate:   # the same candidate against the roofline alone, for comparison
                    p0 = autopar.plan(model, inputs, mesh_shape=mesh_shape, mesh_dim_names=names, cluster=uncal,
                                      **(opts or {}))
                    uncal_pred[name] = {"predicted_s": p0.predicted.step_time_s,
                                        "same_plan": plan_identity(p0.to_json()) == plan_identity(plans[name])}
            texts = [(plans, plan_s, uncal_pred)]
        dist.broadcast_object_list(texts, src=0)
        all_plans, plan_s, uncal_pred = texts[0]
        plans, same = distinct(all_plans)   # a candidate that solves to an earlier one's plan is scored once
        runs = {}
        for name, text in plans.items():
            model, inputs = _model()
            pm = autopar.parallelize(model, mesh, inputs, plan=Plan.from_json(text))
            opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)
            _time(pm, inputs, opt, 2)  # warm-up
            runs[name] = (pm, inputs, opt)
        fb = {n: [] for n in runs}
        full = {n: [] for n in runs}
        cpu = {n: [] for n in runs}
        for _ in range(rounds):  # alternate plans so slow drift of the host hits all of them alike
            for name, (pm, inputs, opt) in runs.items():
                dist.barrier()
                a, b, c = _time(pm, inputs, opt, steps)
                t = torch.tensor([a, b, c], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank is the step time
                fb[name].append(float(t[0]))
                full[name].append(float(t[1]))
                cpu[name].append(float(t[2]))
        if rank == 0:
            out = {}
            for name, text in plans.items():
                p = Plan.from_json(text)
                out[name] = {"predicted_s": p.predicted.step_time_s, "predicted_breakdown": p.predicted.time_breakdown,
                             "measured_fwd_bwd_s": statistics.median(fb[name]),
                             "measured_step_s": statistics.median(full[name]),
                             "measured_fwd_bwd_cpu_s": statistics.median(cpu[name]),
                             "rounds_fwd_bwd_cpu_s": cpu[name],
                             "rounds_fwd_bwd_s": fb[name], "rounds_step_s": full[name],
                             "plan_seconds": plan_s[name], "options": cands[name],
                             "param_placements": dict(list(p.param_placements.items())[:6])}
                if name in uncal_pred:
                    out[name]["uncalibrated_predicted_s"] = uncal_pred[name]["predicted_s"]
                    out[name]["uncalibrated_same_plan"] = uncal_pred[name]["same_plan"]
            for name, other in same.items():
                p = Plan.from_json(all_plans[name])
                out.setdefault("_same_plan", {})[name] = {"same_plan_as": other, "options": cands[name],
                                                          "predicted_s": p.predicted.step_time_s}
            out["_op_calibration"] = cal_info
            out_q.put(out)
    except Exception:
        import traceback
        if rank == 0:
            out_q.put({"error": traceback.format_exc()})
    exit_worker(out_q)


def _run_mesh(mesh_shape, profile: str, steps: int, rounds: int, calibrate: bool, precision: str = "fp32") -> dict:
    world = 1
    for s in mesh_shape:
        world *= s
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, mesh_shape, profile, steps, rounds, calibrate, q,
                                               precision))
             for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=1800)
    for p in procs:
        p.join(60)
    if "error" in res:
        raise RuntimeError(res["error"])
    return res


def _mesh_result(rows: dict) -> tuple[dict, dict]:
    """(scored plans, candidates that solved to an already scored plan, the op calibration's summary)."""
    same = rows.pop("_same_plan", {})
    cal = rows.pop("_op_calibration", None)
    return rows, same, cal


def _profile(nproc: int, mesh: str, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autopar.tools.cli", "profile", "--nproc", str(nproc), "--mesh", mesh,
                    "--out", str(out)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


def score(rows: dict, key: str = "measured_fwd_bwd_s", solver: str = "solver") -> dict:
    """Spearman, errors and the solver's plan against the measured best; ``solver``: the row that holds
    the solver's plan (another candidate's when the solver solved to that candidate's plan)."""
    names = list(rows)
    pred = [rows[n]["predicted_s"] for n in names]
    meas = [rows[n][key] for n in names]
    rho = float(spearmanr(pred, meas).statistic) if len(names) > 2 else float("nan")
    abs_err = [abs(p - m) for p, m in zip(pred, meas)]
    best = min(meas)
    out = {"spearman": rho, "mae_s": statistics.mean(abs_err),
           "mean_relative_error": statistics.mean(e / m for e, m in zip(abs_err, meas)),
           "predicted_fastest": names[pred.index(min(pred))], "measured_fastest": names[meas.index(best)]}
    if solver in rows:
        out["solver_plan"] = solver
        out["solver_vs_best"] = rows[solver][key] / best
        out["solver_within_10pct"] = rows[solver][key] <= 1.10 * best
    return out


def gpu_check(preset: str = "h200-sxm") -> dict:
    """On one CUDA GPU: measure the device as `autopar profile` does and compare single-op times with the
    roofline (solver/cost.py roofline_cost) under the spec-sheet preset and under the measured DeviceSpec."""
    from dataclasses import asdict

    from autopar.cluster.profile import PRESETS
    from autopar.cluster.measure import measure_device
    from autopar.cluster.timing import ProfileOptions, timed as _timed
    from autopar.solver.cost import roofline_cost

    dev = torch.device("cuda")
    spec, host_bw, raw = measure_device(dev, ProfileOptions.for_backend("nccl"))
    ref = PRESETS[preset].device
    rows = []
    for dt in ("bfloat16", "float32"):
        e = torch.finfo(getattr(torch, dt)).bits // 8
        for k in (256, 512, 1024, 2048, 4096, 8192, 16384):
            a = torch.randn(k, k, device=dev, dtype=getattr(torch, dt))
            b = torch.randn(k, k, device=dev, dtype=getattr(torch, dt))
            t = _timed(lambda: torch.mm(a, b), dev, 5, 2, iters=max(1, 2 ** 27 // k ** 2))
            f, nb = 2.0 * k ** 3, 3.0 * k * k * e
            rows.append({"op": f"mm {k}", "dtype": dt, "measured_s": t, "achieved_tflops": f / t / 1e12,
                         "preset_s": roofline_cost(f, nb, dt, ref).fwd_s,
                         "profiled_s": roofline_cost(f, nb, dt, spec).fwd_s})
    for n in (1 << 16, 1 << 20, 1 << 24, 1 << 28):
        x, y = torch.ones(n, device=dev), torch.ones(n, device=dev)
        z = torch.empty_like(x)
        t = _timed(lambda: torch.add(x, y, out=z), dev, 5, 2, iters=max(1, 2 ** 28 // n))
        rows.append({"op": f"add {n}", "dtype": "float32", "measured_s": t, "achieved_gbps": 12 * n / t / 1e9,
                     "preset_s": roofline_cost(0.0, 12.0 * n, "float32", ref).fwd_s,
                     "profiled_s": roofline_cost(0.0, 12.0 * n, "float32", spec).fwd_s})
    for r in rows:
        r["preset_over_measured"] = r["preset_s"] / r["measured_s"]
        r["profiled_over_measured"] = r["profiled_s"] / r["measured_s"]
    return {"device": torch.cuda.get_device_name(dev), "preset": preset, "profiled_device": asdict(spec),
            "host_bandwidth": host_bw, "raw": raw, "ops": rows, "machine": _machine()}


def _print_gpu(res: dict) -> None:
    print(f"{res['device']}  vs preset {res['preset']}")
    print(f"{'op':12s} {'dtype':9s} {'measured':>10s} {'preset':>10s} {'profiled':>10s}")
    for r in res["ops"]:
        print(f"{r['op']:12s} {r['dtype']:9s} {r['measured_s'] * 1e6:8.1f}us {r['preset_over_measured']:9.2f}x "
              f"{r['profiled_over_measured']:9.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians are reported)")
    ap.add_argument("--meshes", default="2,2x2", help="meshes to profile and run (default 2,2x2)")
    ap.add_argument("--no-calibrate-ops", action="store_true",
                    help="plan with the profile's roofline alone (default: per-op calibration of the model's ops, "
                         "timed on the mesh's ranks at once; the roofline's predictions are reported beside)")
    ap.add_argument("--gpu", action="store_true",
                    help="instead: on one CUDA GPU, profiled and preset roofline vs measured op times")
    ap.add_argument("--out", default=None, help="result JSON (default results/cost_fidelity[_gpu|_bf16].json)")
    ap.add_argument("--profiles-from", default=None, metavar="STEM",
                    help="plan against the profiles an earlier run kept (results/<STEM>_profile_<mesh>.json, e.g. "
                         "cost_fidelity) instead of measuring new ones (a profile taken while other jobs load the "
                         "cores is off by several times)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="plan and run every candidate in this precision (bf16: CPU autocast, fp32 master weights; "
                         "use with --no-calibrate-ops: the op calibration times the captured float32 ops)")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        res = gpu_check()
        _print_gpu(res)
        out = Path(args.out) if args.out else RESULTS / "cost_fidelity_gpu.json"
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
        return 0
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    res = {"config": {"gpt": GPT, "batch": BATCH, "seq": SEQ, "steps": args.steps, "rounds": args.rounds,
                      "calibrate_ops": not args.no_calibrate_ops, "precision": args.precision,
                      "profiles_from": args.profiles_from},
           "load_average_start": list(os.getloadavg()), "meshes": {}}
    all_rows = {}
    for mesh in args.meshes.split(","):
        shape = tuple(int(x) for x in mesh.split("x"))
        nproc = 1
        for s in shape:
            nproc *= s
        out_path = Path(args.out) if args.out else RESULTS / ("cost_fidelity.json" if args.precision == "fp32"
                                                              else f"cost_fidelity_{args.precision}.json")
        prof = out_path.with_name(f"{out_path.stem}_profile_{mesh}.json")   # beside the results
        if args.profiles_from:
            prof, prof_s = RESULTS / f"{args.profiles_from}_profile_{mesh}.json", 0.0
        else:
            prof_s = _profile(nproc, mesh, prof)
        rows, same, cal = _mesh_result(_run_mesh(shape, str(prof), args.steps, args.rounds, not args.no_calibrate_ops,
                                                 args.precision))
        for name, info in same.items():
            print(f"mesh {mesh}: candidate {name!r} solves to the same plan as {info['same_plan_as']!r}: scored once")
        solver = same.get("solver", {}).get("same_plan_as", "solver")   # the row with the solver's plan
        res["meshes"][mesh] = {"profile": prof.name, "profile_seconds": prof_s, "plans": rows,
                               "same_plan_as": same, "op_calibration": cal,
                               "score": score(rows, solver=solver),
                               "score_full_step": score(rows, "measured_step_s", solver=solver),
                               "score_cpu_time": score(rows, "measured_fwd_bwd_cpu_s", solver=solver)}
        all_rows.update({f"{mesh}/{k}": v for k, v in rows.items()})
    res["overall"] = score({k: v for k, v in all_rows.items()})
    res["overall_full_step"] = score(all_rows, "measured_step_s")
    res["overall_cpu_time"] = score(all_rows, "measured_fwd_bwd_cpu_s")
    if all("uncalibrated_predicted_s" in r for r in all_rows.values()):   # the roofline's predictions, beside
        def unc(rows: dict) -> dict:
            return {k: {**r, "predicted_s": r["uncalibrated_predicted_s"]} for k, r in rows.items()}
        for m in res["meshes"].values():
            m["score_uncalibrated"] = score(unc(m["plans"]), solver=m["score"].get("solver_plan", "solver"))
        res["overall_uncalibrated"] = score(unc(all_rows))
    res["targets"] = {"spearman": 0.9, "solver_within": 1.10}
    solver_ok = [m["score"].get("solver_within_10pct", False) for m in res["meshes"].values()]
    res["targets_met"] = {"spearman_overall": res["overall"]["spearman"] >= 0.9,
                          "spearman_per_mesh": all(m["score"]["spearman"] >= 0.9 for m in res["meshes"].values()),
                          "solver_within_10pct": all(solver_ok)}
    res["load_average_end"] = list(os.getloadavg())
    res["seconds"] = time.perf_counter() - t_start
    res["machine"] = _machine()
    print(f"{'mesh/plan':28s} {'predicted':>10s} {'roofline':>10s} {'measured':>10s} {'CPU time':>10s} "
          f"{'full step':>10s}")
    for name, r in all_rows.items():
        roof = r.get("uncalibrated_predicted_s", float("nan"))
        print(f"{name:28s} {r['predicted_s'] * 1e3:8.2f}ms {roof * 1e3:8.2f}ms {r['measured_fwd_bwd_s'] * 1e3:8.2f}ms "
              f"{r['measured_fwd_bwd_cpu_s'] * 1e3:8.2f}ms {r['measured_step_s'] * 1e3:8.2f}ms")
    for mesh, m in res["meshes"].items():
        s = m["score"]
        print(f"mesh {mesh}: spearman {s['spearman']:.3f}  MAE {s['mae_s'] * 1e3:.2f} ms  mean rel err "
              f"{s['mean_relative_error']:.2f}  solver/best {s.get('solver_vs_best', float('nan')):.3f}  "
              f"(CPU time: spearman {m['score_cpu_time']['spearman']:.3f})")
    if "overall_uncalibrated" in res:
        print("roofline alone (no op calibration): " + "  ".join(
            f"{mesh} {m['score_uncalibrated']['spearman']:.3f}" for mesh, m in res["meshes"].items())
            + f"  overall {res['overall_uncalibrated']['spearman']:.3f}  MAE "
              f"{res['overall_uncalibrated']['mae_s'] * 1e3:.2f} ms")
    o = res["overall"]
    print(f"overall: spearman {o['spearman']:.3f}  MAE {o['mae_s'] * 1e3:.2f} ms  targets {res['targets_met']}  "
          f"load avg {res['load_average_start'][0]:.1f} -> {res['load_average_end'][0]:.1f}  ({res['seconds']:.0f} s)")
    out = Path(args.out) if args.out else RESULTS / ("cost_fidelity.json" if args.precision == "fp32"
                                                     else f"cost_fidelity_{args.precision}.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
