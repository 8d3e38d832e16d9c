"""Pipeline step time on gloo against the number of micro-batches, next to the bubble model.

Two CPU processes form a mesh ``("pp",)`` of 2, each pinned to its own core with one thread, so the
stages really run side by side. The model is the example GPT, compute-heavy enough that a
micro-batch's matmuls dominate its fixed costs (schedule, send/recv, per-op overhead) even at the
largest count: by default 4 blocks of d_model 512 (2 per stage), batch 16 x 128 tokens, about 150
GFLOP per step. For every schedule and micro-batch count m the model is planned with
``pipeline={"schedule": S, "microbatches": m}`` and applied; then ``autopar.forward_backward`` steps
are timed in rounds that alternate the configurations (so a slow drift of the host hits all of them
alike), the step time of a round being the slower rank's; the median over all steps is reported.
Each rank's CPU time over the step's wall time is its busy fraction: gloo waits block, so on an idle
machine 1 - busy is the time a stage sat in the bubble (or waited for the other stage).

With balanced stages of full-batch time t a step takes (m + p - 1) t / m: relative to the smallest m
the step time should fall like ((m + 1) / m) / ((m0 + 1) / m0) for p = 2 (33 % from m = 2 to m = 16).
The table shows measured and analytic ratios side by side, with the plan's predicted step time, its
ratio to the smallest m, bubble and gradient accumulation. The plans are made against a profile of this
machine measured first with ``autopar profile --nproc 2`` (``--cluster cpu-gloo`` uses the preset instead),
so the per-micro-batch costs the planner charges (per-op overhead, send/recv latency, adding each
micro-batch's gradients into the accumulated ones) are measured numbers. By default the plans also use
per-op calibration: both ranks, pinned, time the model's own ops at every micro-batch size
(``autopar.cluster.calibrate.calibrate_ops``), so small GEMMs cost what they measure rather than what a roofline
fitted on square GEMMs says; the roofline's predictions are listed beside (``--no-calibrate-ops`` plans
with the roofline alone). Printed and written to benchmarks/results/pipeline.json with the machine and the load average
before and after (run it on an otherwise idle machine: other processes on the two cores stretch the
stages unevenly). Not a test.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_worker, free_port, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline.json"


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _pin(rank: int) -> None:
    """This rank on its own core (the stages must not share one), when the host has two."""
    cpus = _cpus()
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[rank]})


def _worker(rank: int, world: int, port: int, cfg: dict, out_q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cfg["pin"]:
        _pin(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import autopar
        from autopar.models import load_example_module
        from torch.distributed.device_mesh import init_device_mesh

        gpt = load_example_module("gpt")
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
        gen = torch.Generator().manual_seed(0)
        shape = (cfg["batch"], cfg["seq"])
        inputs = {"idx": torch.randint(0, cfg["gpt"]["vocab_size"], shape, generator=gen),
                  "labels": torch.randint(0, cfg["gpt"]["vocab_size"], shape, generator=gen)}
        cluster, cal_info, uncal = _op_calibration(cfg, gpt, inputs)
        runs, roofline = {}, {}
        for sched in cfg["schedules"]:
            for m in cfg["microbatches"]:
                torch.manual_seed(0)
                model = gpt.GPT(gpt.GPTConfig(**cfg["gpt"]))
                pm = autopar.parallelize(model, mesh, inputs, cluster=cluster,
                                         pipeline={"schedule": sched, "microbatches": m})
                if uncal is not None and rank == 0:   # the roofline's prediction of the same configuration
                    roofline[(sched, m)] = autopar.plan(model, inputs, mesh_shape=(world,), mesh_dim_names=("pp",),
                                                   cluster=uncal, pipeline={"schedule": sched, "microbatches": m})
                for _ in range(cfg["warmup"]):   # builds the schedule, warms the allocator
                    _step(pm, inputs)
                runs[(sched, m)] = pm
        samples = {k: [] for k in runs}
        busy = {k: [] for k in runs}     # per step, per rank: CPU seconds / step seconds
        for _ in range(cfg["rounds"]):
            for key, pm in runs.items():
                for _ in range(cfg["steps"]):
                    dist.barrier()
                    wall, cpu = _step(pm, inputs)
                    t = torch.tensor([wall], dtype=torch.float64)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)   # the slower stage is the step time
                    cpus = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
                    dist.all_gather(cpus, torch.tensor([cpu], dtype=torch.float64))
                    samples[key].append(float(t))
                    busy[key].append([float(c) / float(t) for c in cpus])
        if rank == 0:
            rows = []
            for (sched, m), pm in runs.items():
                rows.append({"schedule": sched, "microbatches": m, "measured_s": statistics.median(samples[(sched, m)]),
                             "samples_s": samples[(sched, m)],
                             "busy_fraction_per_rank": [statistics.median(b[r] for b in busy[(sched, m)])
                                                        for r in range(world)],
                             "predicted_s": pm.plan.predicted.step_time_s,
                             "predicted_breakdown": pm.plan.predicted.time_breakdown,
                             "predicted_bubble_fraction": pm.plan.pipeline["predicted_bubble_fraction"],
                             "predicted_accum_s": pm.plan.pipeline.get("predicted_accum_s", 0.0),
                             "analytic_bubble_fraction": (world - 1) / (m + world - 1),
                             "stages": [st["layers"] for st in pm.plan.pipeline["stages"]]})
                if (sched, m) in roofline:
                    rows[-1]["uncalibrated_predicted_s"] = roofline[(sched, m)].predicted.step_time_s
                    rows[-1]["uncalibrated_predicted_breakdown"] = roofline[(sched, m)].predicted.time_breakdown
            out_q.put({"rows": rows, "op_calibration": cal_info})
    except Exception:
        import traceback
        out_q.put({"error": f"rank {rank}: {traceback.format_exc()}"})
    exit_worker(out_q)


def _op_calibration(cfg: dict, gpt, inputs):
    """(cluster to plan with, calibration summary, the uncalibrated profile or None): with per-op
    calibration both ranks, pinned as they will run, time the model's ops at every micro-batch size
    (autopar.cluster.calibrate.calibrate_ops on the one-device stage mesh the pipeline planner costs units on)."""
    import dataclasses

    from autopar.cluster.calibrate import calibrate_ops
    from autopar.core.capture import capture
    from autopar.frontend.pipeline import _as_inputs, microbatch_inputs
    from autopar.cluster.profile import load_cluster

    prof = load_cluster(cfg["cluster"])
    if not cfg["calibrate_ops"]:
        return prof, None, None
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(**cfg["gpt"]))
    caps = [capture(model, _as_inputs(*microbatch_inputs(inputs, m))) for m in cfg["microbatches"]]
    table = calibrate_ops(caps, (1,), prof)
    info = {"seconds": time.perf_counter() - t0, "ops": len(table.times), "scale": table.scale,
            "extra_op_s": table.extra_op_s, "sources": table.sources}
    cluster = dataclasses.replace(prof, op_times=table)
    if dist.get_rank() == 0 and cfg.get("ops_profile_out"):
        cluster.to_json(cfg["ops_profile_out"])
    return cluster, info, prof


def _step(pm, inputs) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one forward_backward."""
    import autopar

    t0, c0 = time.perf_counter(), time.process_time()
    autopar.forward_backward(pm, inputs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for p in pm.parameters():
        p.grad = None
    return wall, cpu


def _relative(rows: list[dict]) -> None:
    """Measured and analytic step time relative to the smallest micro-batch count of each schedule."""
    for sched in {r["schedule"] for r in rows}:
        mine = [r for r in rows if r["schedule"] == sched]
        base = min(mine, key=lambda r: r["microbatches"])
        m0 = base["microbatches"]
        for r in mine:
            m = r["microbatches"]
            r["measured_vs_smallest_m"] = r["measured_s"] / base["measured_s"]
            r["analytic_vs_smallest_m"] = ((m + 1) / m) / ((m0 + 1) / m0)
            r["predicted_vs_smallest_m"] = r["predicted_s"] / base["predicted_s"]
            if "uncalibrated_predicted_s" in r:
                r["uncalibrated_predicted_vs_smallest_m"] = (r["uncalibrated_predicted_s"]
                                                              / base["uncalibrated_predicted_s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--microbatches", default="2,4,8,16", help="comma-separated micro-batch counts (>= 2)")
    ap.add_argument("--schedules", default="gpipe,1f1b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all configurations (median of all steps)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-pin", action="store_true", help="do not pin each rank to its own core")
    ap.add_argument("--cluster", default="profile",
                    help="'profile' (default): measure this machine with `autopar profile --nproc 2` first and plan "
                         "against it; or a preset name / profile JSON")
    ap.add_argument("--no-calibrate-ops", action="store_true",
                    help="plan with the profile's roofline alone (default: per-op calibration, the model's ops timed "
                         "at every micro-batch size on both pinned ranks; the roofline's predictions beside)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    ms = [int(x) for x in args.microbatches.split(",")]
    if min(ms) < 2 or any(args.batch % m for m in ms):
        ap.error(f"micro-batch counts must be >= 2 (one per stage) and divide --batch {args.batch}")
    cfg = {"gpt": dict(n_layer=args.layers, d_model=args.d_model, n_head=args.heads, vocab_size=args.vocab,
                       max_seq_len=args.seq),
           "batch": args.batch, "seq": args.seq, "microbatches": ms, "schedules": args.schedules.split(","),
           "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "pin": not args.no_pin,
           "cluster": args.cluster, "calibrate_ops": not args.no_calibrate_ops}
    load_start = list(os.getloadavg())
    cfg["ops_profile_out"] = str(Path(args.out).with_name(Path(args.out).stem + "_profile_2_ops.json"))
    if args.cluster == "profile":
        prof = Path(args.out).with_name(Path(args.out).stem + "_profile_2.json")
        subprocess.run([sys.executable, "-m", "autopar.tools.cli", "profile", "--nproc", "2", "--out", str(prof)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        cfg["cluster"] = str(prof)
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_worker, args=(r, 2, port, cfg, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=3600)
    for p in procs:
        p.join(60)
    if "error" in res:
        print(res["error"], file=sys.stderr)
        return 1
    _relative(res["rows"])
    print(f"{'schedule':9s} {'m':>3s} {'measured':>10s} {'vs min m':>9s} {'analytic':>9s} {'predicted':>10s} "
          f"{'pred vs min':>11s} {'roofline vs min':>15s} {'bubble (pred)':>13s} {'accum (pred)':>12s} "
          f"{'busy r0/r1':>11s}")
    for r in res["rows"]:
        b0, b1 = r["busy_fraction_per_rank"]
        print(f"{r['schedule']:9s} {r['microbatches']:3d} {r['measured_s'] * 1e3:8.1f}ms "
              f"{r['measured_vs_smallest_m']:9.3f} {r['analytic_vs_smallest_m']:9.3f} {r['predicted_s'] * 1e3:8.1f}ms "
              f"{r['predicted_vs_smallest_m']:11.3f} "
              f"{r.get('uncalibrated_predicted_vs_smallest_m', float('nan')):15.3f} "
              f"{r['predicted_bubble_fraction']:13.3f} {r['predicted_accum_s'] * 1e3:10.1f}ms {b0:5.2f}/{b1:4.2f}")
    if res.get("op_calibration"):
        c = res["op_calibration"]
        print(f"op calibration: {c['ops']} ops in {c['seconds']:.0f} s, scale {c['scale']:.3f}, "
              f"extra {c['extra_op_s'] * 1e6:.1f} us per op")
    pinned = _cpus()[:2] if cfg["pin"] and len(_cpus()) >= 2 else []
    res["config"] = {**cfg, "mesh": {"pp": 2}, "cluster": args.cluster if args.cluster != "profile"
                     else Path(cfg["cluster"]).name, "pinned_cpus": pinned}
    res["machine"] = machine(load_average_start=load_start, load_average_end=list(os.getloadavg()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
