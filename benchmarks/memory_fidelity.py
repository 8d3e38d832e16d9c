"""Memory fidelity: the plan's predicted per-rank peak next to the peak autopar.memory measures.

For the GPT and LLaMA examples (gpt-tiny / llama-tiny widths, 8 blocks instead of 2, batch 16,
sequence 64: activations outweigh parameters and AdamW states there, as in real LLM training; with
2 blocks, batch 8 and sequence 32 parameters and optimizer states dominate and no plan fits 40 % of
the data-parallel peak) on 2- and 4-rank gloo meshes (one mesh dim, ``dp``, batch split), every row
on the same shapes, one training step (forward, backward, AdamW step; after one
untracked warm-up step, so optimizer states exist as in steady state) is measured per rank by
category (params, grads, optimizer, activations, other, host) for these plans:

  none       the data-parallel plan (batch S(0), parameters R), told ``recompute="none"``, ``zero=0``
  selective  the same, told ``recompute="selective"`` (every block)
  full       the same, told ``recompute="full"``
  offload    told ``recompute="offload"``: every block's saved activations to host memory (see below)
  zero1      told ``zero=1``: optimizer states sharded over dp (autopar.zero)
  zero2      told ``zero=2``: gradients too
  zero3      parameters S(0) on dp (ZeRO-3 through placements), solved
  budget40   the solver's own choice under 40 % of none's predicted peak (recompute, ZeRO, placements)

Every row runs in each of ``--precisions`` (default fp32 and bf16): a bf16 row is solved with
``precision="bf16"`` and runs under CPU autocast with float32 parameters, gradients and AdamW states; its
prediction counts activations at autocast's dtypes and the bf16 copies of weights the matmuls keep.

Every row is solved with its decisions, so its prediction is the planner's own. On ``cpu-gloo`` the
device is the host and the planner offers no offload (it frees nothing there); the offload row is
solved against the same profile with its CPU taken for a device that has a host beside it
(``HOST_BESIDE``), which is how autopar.memory measures: offloaded copies are made inside
``host_allocations`` and counted as host bytes, apart from the device peak.
Writes benchmarks/results/memory_fidelity.json with machine info.

    python benchmarks/memory_fidelity.py [--worlds 2,4] [--layers 8] [--batch 16] [--seq 64]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_worker, free_port, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "memory_fidelity.json"
MODELS = ("gpt-tiny", "llama-tiny")
DP = {"input:*": ["S(0)"]}
REPLICATED = {"input:*": ["S(0)"], "param:*": ["R"]}   # plain data parallel: ZeRO-1/2 have every parameter to shard
ZERO3 = {"input:*": ["S(0)"], "param:*": ["S(0)"]}


def _host_beside():
    """cpu-gloo with its device named apart from the host (ClusterProfile.host_is_device reads the name):
    the planner then offers activation offload over the profile's host link."""
    from autopar.cluster.profile import load_cluster
    prof = load_cluster("cpu-gloo")
    return dataclasses.replace(prof, device=dataclasses.replace(prof.device, name="cpu-as-device"))


def _plans(model, inputs, world: int, precision: str = "fp32") -> list[tuple[str, object, bool]]:
    """(name, plan) per row; solved on rank 0 and shared as JSON. ``precision``: every row solved with
    ``precision=`` (bf16: autocast compute, float32 parameters, gradients and AdamW states)."""
    import autopar
    from autopar.core.plan import Plan

    def solve(**kw):
        text = [None]
        if dist.get_rank() == 0:
            try:
                kw.setdefault("cluster", "cpu-gloo")
                if precision != "fp32":
                    kw["precision"] = precision
                text = [autopar.plan(model, inputs, mesh_shape=(world,), mesh_dim_names=("dp",), **kw).to_json()]
            except Exception as e:   # e.g. an infeasible budget: reported, not fatal
                text = [json.dumps({"error": f"{type(e).__name__}: {e}"})]
        dist.broadcast_object_list(text, src=0)
        d = json.loads(text[0])
        return d if "error" in d else Plan.from_json(text[0])

    base = solve(fix=REPLICATED, recompute="none", zero=0)
    rows = [("none", base),
            ("selective", solve(fix=REPLICATED, recompute="selective", zero=0)),
            ("full", solve(fix=REPLICATED, recompute="full", zero=0)),
            ("offload", solve(fix=REPLICATED, recompute="offload", zero=0, cluster=_host_beside(), fuse=False)),
            ("zero1", solve(fix=REPLICATED, recompute="none", zero=1)),
            ("zero2", solve(fix=REPLICATED, recompute="none", zero=2)),
            ("zero3", solve(fix=ZERO3, recompute="none", zero=0)),
            ("budget40", solve(fix=DP, memory_budget=int(0.4 * base.predicted.peak_memory_bytes)))]
    return rows


def _measure(pm, inputs) -> dict:
    from autopar.runtime import memory, zero
    opt = zero.optimizer(pm, torch.optim.AdamW, lr=1e-4)   # steps the ZeRO shards where the plan has them
    pm(**inputs).backward()          # warm-up: optimizer states exist from here on, as in steady state
    opt.step()
    opt.zero_grad(set_to_none=True)
    with memory.track(pm, getattr(opt, "optimizer", opt)) as t:
        pm(**inputs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return t.report.to_dict()


def _worker(rank: int, world: int, port: int, layers: int, batch: int, seq: int, out_q,
            only: tuple[str, ...] = (), precisions: tuple[str, ...] = ("fp32",)) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import autopar
        from autopar.models import build_model
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
        rows = []
        for spec, prec in [(m, p) for p in precisions for m in MODELS]:
            torch.manual_seed(0)
            model, inputs = build_model(spec, batch=batch, seq=seq, device="cpu", n_layer=layers)
            for name, plan in _plans(model, inputs, world, prec):
                if only and name not in only:
                    continue
                row = {"model": spec, "world": world, "plan": name, "precision": prec}
                if isinstance(plan, dict):
                    rows.append({**row, "error": plan["error"]})
                    continue
                pm = autopar.apply(copy.deepcopy(model), plan, mesh)
                got = _measure(pm, inputs)
                per_rank = [None] * world
                dist.all_gather_object(per_rank, got)
                row.update(checkpoint=list(plan.checkpoint), offload=list(plan.offload),
                           zero={"optimizer": len(plan.optimizer_sharding), "gradients": len(plan.gradient_sharding),
                                 "sharded_params": sum(any(x != "R" for x in v)
                                                       for v in plan.param_placements.values())},
                           predicted_peak_bytes=plan.predicted.peak_memory_bytes,
                           predicted_breakdown=dict(plan.predicted.memory_breakdown), measured=per_rank)
                rows.append(row)
        if rank == 0:
            out_q.put(rows)
    except Exception:
        import traceback
        if rank == 0:
            out_q.put({"error": traceback.format_exc()})
    exit_worker(out_q)


def run_world(world: int, layers: int, batch: int, seq: int, timeout: float, only: tuple[str, ...] = (),
              precisions: tuple[str, ...] = ("fp32",)) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    env = {"OMP_NUM_THREADS": "1"}
    os.environ.update(env)
    procs = [ctx.Process(target=_worker, args=(r, world, port, layers, batch, seq, q, only,
                                                                    precisions)) for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=timeout)
    for p in procs:
        p.join(60)
    if isinstance(res, dict):
        raise RuntimeError(res["error"])
    return res


def _summarize(row: dict) -> dict:
    """Per-rank relative error of the predicted peak, and the worst rank."""
    pred = row["predicted_peak_bytes"]
    errs = [(pred - m["peak_bytes"]) / m["peak_bytes"] for m in row["measured"]]
    row["relative_error_per_rank"] = errs
    row["worst_relative_error"] = max(errs, key=abs)
    return row


def _short(checkpoint: list[str]) -> list[str]:
    """``blocks.0:full, blocks.1:full`` -> ``full x2``."""
    modes = [c.rsplit(":", 1)[1] for c in checkpoint]
    return [f"{m} x{modes.count(m)}" for m in dict.fromkeys(modes)]


def _mib(n: float) -> str:
    return f"{n / 2**20:7.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", default="2,4", help="comma-separated rank counts (default 2,4)")
    ap.add_argument("--layers", type=int, default=8, help="blocks per model (default 8)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated plan precisions (default fp32,bf16; "
                                                             "bf16: autocast on the CPU, fp32 master weights)")
    ap.add_argument("--rows", default="", help="comma-separated rows to measure (default all; a partial run "
                                                 "does not write the results file)")
    args = ap.parse_args(argv)
    t0 = time.time()
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        rows += run_world(world, args.layers, args.batch, args.seq, args.timeout,
                          tuple(r for r in args.rows.split(",") if r), tuple(args.precisions.split(",")))
    rows = [_summarize(r) if "measured" in r else r for r in rows]
    print(f"{'model':10s} {'ranks':>5s} {'prec':4s} {'plan':9s} {'pred MiB':>8s} {'meas MiB':>8s} {'err':>7s}  "
          f"{'params':>7s} {'grads':>7s} {'optim':>7s} {'acts':>7s} {'other':>7s} {'host':>7s}  decisions")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:10s} {r['world']:5d} {r['precision']:4s} {r['plan']:9s} error: {r['error'][:80]}")
            continue
        m = max(r["measured"], key=lambda x: x["peak_bytes"])     # the worst rank
        b = m["breakdown"]
        z = r["zero"]
        zdec = [f"zero1/2:{z['optimizer']}/{z['gradients']}"] if z["optimizer"] else []
        zdec += [f"sharded:{z['sharded_params']}"] if z["sharded_params"] else []
        dec = ",".join(_short(r["checkpoint"]) + [f"offload:{o}" for o in r["offload"]] + zdec) or "-"
        print(f"{r['model']:10s} {r['world']:5d} {r['precision']:4s} {r['plan']:9s} {_mib(r['predicted_peak_bytes'])} "
              f"{_mib(m['peak_bytes'])} {r['worst_relative_error']:+7.1%}  {_mib(b['params'])} {_mib(b['grads'])} "
              f"{_mib(b['optimizer'])} {_mib(b['activations'])} {_mib(b['other'])} {_mib(m['host_peak_bytes'])}  "
              f"{dec}")
    print("breakdown: at the measured peak (worst rank), host: peak host bytes")
    scored = [r for r in rows if "measured" in r]
    within = [r for r in scored if abs(r["worst_relative_error"]) <= 0.10]
    print(f"solved plans predicted within +-10% on every rank: {len(within)}/{len(scored)}")
    by_prec = {p: [sum(abs(r["worst_relative_error"]) <= 0.10 for r in scored if r["precision"] == p),
                   sum(r["precision"] == p for r in scored)] for p in args.precisions.split(",")}
    for p, (k, n) in by_prec.items():
        print(f"  {p}: {k}/{n}")
    out = {"rows": rows, "target": 0.10, "solved_within_target": len(within), "solved_rows": len(scored),
           "within_target_by_precision": by_prec,
           "config": {"models": list(MODELS), "n_layer": args.layers, "batch": args.batch, "seq": args.seq,
                      "worlds": args.worlds, "precisions": args.precisions,
                      "cluster": "cpu-gloo", "optimizer": "AdamW(lr=1e-4)", "step": "forward+backward+step"},
           "wall_s": time.time() - t0, "machine": machine()}
    if args.rows:
        return 0
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
