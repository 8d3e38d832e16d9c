"""Pipeline step time on gloo against the number of micro-batches, next to the planner's prediction.

Two CPU processes form a mesh ``("pp",)`` of 2; a 4-block GPT (d_model 256, batch 16 x 64 tokens) is
planned with ``pipeline={"schedule": S, "microbatches": m}`` for each m and schedule, applied, and
``autopar.forward_backward`` steps are timed (median of ``--steps`` after one warm-up). Printed and
written to benchmarks/results/pipeline.json with the predicted step time and bubble fraction of each
plan and the machine. Measured and predicted times are both expected to fall as m grows (the bubble
(p-1)/(m+p-1) shrinks) until per-micro-batch overheads dominate. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline.json"
GPT = dict(n_layer=4, d_model=256, n_head=4, vocab_size=512, max_seq_len=64)
BATCH, SEQ = 16, 64


def _worker(rank: int, world: int, port: int, ms: list[int], schedules: list[str], steps: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import autopar
        from autopar.models import load_example_module
        from torch.distributed.device_mesh import init_device_mesh

        gpt = load_example_module("gpt")
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
        gen = torch.Generator().manual_seed(0)
        idx = torch.randint(0, GPT["vocab_size"], (BATCH, SEQ), generator=gen)
        inputs = {"idx": idx, "labels": torch.randint(0, GPT["vocab_size"], (BATCH, SEQ), generator=gen)}
        rows = []
        for sched in schedules:
            for m in ms:
                torch.manual_seed(0)
                model = gpt.GPT(gpt.GPTConfig(**GPT))
                pm = autopar.parallelize(model, mesh, inputs, cluster="cpu-gloo",
                                         pipeline={"schedule": sched, "microbatches": m})
                autopar.forward_backward(pm, inputs)   # warm-up (builds the schedule)
                times = []
                for _ in range(steps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    autopar.forward_backward(pm, inputs)
                    times.append(time.perf_counter() - t0)
                    for p in pm.parameters():
                        p.grad = None
                t = torch.tensor([statistics.median(times)])
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                rows.append({"schedule": sched, "microbatches": m, "measured_s": float(t),
                             "predicted_s": pm.plan.predicted.step_time_s,
                             "predicted_bubble_fraction": pm.plan.pipeline["predicted_bubble_fraction"],
                             "analytic_bubble_fraction": (world - 1) / (m + world - 1)})
        if rank == 0:
            q.put({"rows": rows})
    except Exception as e:  # noqa: BLE001 - reported to the parent
        q.put({"error": f"rank {rank}: {type(e).__name__}: {e}"})
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--microbatches", default="1,2,4,8,16", help="comma-separated micro-batch counts")
    ap.add_argument("--schedules", default="gpipe,1f1b")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    args = ap.parse_args(argv)
    ms = [int(x) for x in args.microbatches.split(",")]
    schedules = args.schedules.split(",")
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_worker, args=(r, 2, port, ms, schedules, args.steps, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=1800)
    for p in procs:
        p.join(60)
    if "error" in res:
        print(res["error"], file=sys.stderr)
        return 1
    print(f"{'schedule':9s} {'m':>3s} {'measured':>10s} {'predicted':>10s} {'bubble (pred)':>13s} {'analytic':>9s}")
    for r in res["rows"]:
        print(f"{r['schedule']:9s} {r['microbatches']:3d} {r['measured_s'] * 1e3:8.1f}ms {r['predicted_s'] * 1e3:8.2f}ms "
              f"{r['predicted_bubble_fraction']:13.3f} {r['analytic_bubble_fraction']:9.3f}")
    res["config"] = {"gpt": GPT, "batch": BATCH, "seq": SEQ, "mesh": {"pp": 2}, "steps": args.steps,
                     "cluster": "cpu-gloo"}
    res["machine"] = machine()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
