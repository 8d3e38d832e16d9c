"""Explicit tensor-parallel modes (1D / 2D / 2.5D / 3D, and DataParallel) beside the solver's free plan.

Part 1, planning only (no process group): for the built-in GPT (gpt2-medium, batch 16 x 1024) and LLaMA
(llama3-1b, batch 8 x 2048) on 4 and 8 devices, and the built-in 70B shape (llama3-70b, batch 32 x 2048) on a
64-device h100 preset (8 nodes of 8), the predicted step time, communication and peak memory of each explicit
mode (``autopar.frontend.explicit.compare_modes``: the mode's layout as plan constraints, the rest solved),
of the free plan on a 1-D mesh of the same devices ("vs free") and of the free plan on the mode's own mesh. A mode whose device count or sizes do not fit, or
whose plan does not fit the memory, is listed with the reason.

Part 2, measured on gloo: a small LLaMA (``--d-model``, 2 blocks, 8 heads) on ``--ranks`` CPU processes (default
4), each explicit mode that fits plus the free plan, planned against the ``cpu-gloo`` preset, applied, and
timed (forward + backward + AdamW step, the slower rank's wall time; ``--rounds`` rounds alternate the modes,
``--steps`` steps each, after a warm-up; the median of all is reported).
Measured and predicted step times are printed side by side with Kendall's tau of their rankings. On 2
shared cores with 4 ranks the processes time-share the cores: the measured times include that contention
(compare ratios within one run only). Writes benchmarks/results/tp_modes.json with the machine. Not a test.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from _common import exit_worker, free_port, machine

RESULTS = Path(__file__).parent / "results" / "tp_modes.json"
MODES = ("DP", "1D", "2D", "2.5D", "3D")
PLANNING = [("gpt2-medium", 16, 1024, 4, None), ("gpt2-medium", 16, 1024, 8, None),
            ("llama3-1b", 8, 2048, 4, None), ("llama3-1b", 8, 2048, 8, None), ("llama3-70b", 32, 2048, 64, 8)]


def _rowjson(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "plan"}


def planning(points, time_limit: float) -> list[dict]:
    from autopar.frontend.explicit import compare_modes
    from autopar.models import build_model

    out = []
    for spec, batch, seq, n, nodes in points:
        t0 = time.perf_counter()
        model, inputs = build_model(spec, batch=batch, seq=seq, device="meta")
        rows = compare_modes(model, inputs, n, cluster="h100-sxm", time_limit=time_limit, nodes=nodes,
                             free_on_mode_mesh=True)
        out.append({"model": spec, "batch": batch, "seq": seq, "devices": n, "nodes": nodes,
                    "seconds": time.perf_counter() - t0, "rows": [_rowjson(r) for r in rows]})
        _print_rows(f"{spec} batch {batch} x {seq} on {n} h100-sxm" + (f" ({nodes} nodes)" if nodes else ""),
                    out[-1]["rows"])
    return out


def _print_rows(title: str, rows: list[dict], measured: dict | None = None) -> None:
    print(f"\n{title}")
    free = next(r for r in rows if r["mode"] == "free")["step_time_s"]
    print(f"{'mode':5s} {'mesh':28s} {'step (pred)':>12s} {'comm (pred)':>12s} {'peak mem':>10s} {'vs free':>8s}"
          + (f" {'measured':>10s}" if measured else f" {'free on mesh':>12s}"))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:5s} n/a: {r['error'][:110]}")
            continue
        m = f" {measured[r['mode']] * 1e3:8.2f}ms" if measured and r["mode"] in measured else \
            (f" {r['free_on_mesh_step_time_s'] * 1e3:10.3f}ms" if "free_on_mesh_step_time_s" in r else
             " no plan" if "free_on_mesh_error" in r else "")
        print(f"{r['mode']:5s} {r['mesh']:28s} {r['step_time_s'] * 1e3:10.3f}ms {(r['comm_s'] or 0) * 1e3:10.3f}ms "
              f"{r['peak_memory_bytes'] / 2**30:8.2f}GiB {r['step_time_s'] / free:7.2f}x{m}")


# ------------------------------------------------------------------------------------------ measured

def _model(cfg):
    from autopar.models.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=cfg["vocab"], max_seq_len=cfg["seq"], n_layer=2, n_head=8, n_kv_head=8,
                              d_model=cfg["d_model"], d_ff=2 * cfg["d_model"]))
    gen = torch.Generator().manual_seed(1)
    shape = (cfg["batch"], cfg["seq"])
    inputs = {"idx": torch.randint(0, cfg["vocab"], shape, generator=gen),
              "labels": torch.randint(0, cfg["vocab"], shape, generator=gen)}
    return model, inputs


def _step(pm, opt, inputs) -> float:
    """One training step; the slower rank's wall time."""
    dist.barrier()
    t0 = time.perf_counter()
    loss = pm(**inputs)
    loss.backward()
    opt.step()
    opt.zero_grad()
    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _worker(rank: int, world: int, port: int, cfg: dict, out_q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        import autopar
        from autopar.frontend import explicit as E

        rows, runs = [], {}
        for mode in (*cfg["modes"], "free"):
            model, inputs = _model(cfg)
            try:
                if mode == "free":
                    pm = autopar.parallelize(model, init_device_mesh("cpu", (world,), mesh_dim_names=("d",)), inputs,
                                             cluster="cpu-gloo")
                else:
                    wrapped = E.DataParallel(model) if mode == "DP" else E.TensorParallel(model, mode)
                    pm = wrapped.materialize(inputs, cluster="cpu-gloo")
            except autopar.AutoparError as e:
                rows.append({"mode": mode, "error": f"{type(e).__name__}: {e}"})
                continue
            opt = autopar.zero.optimizer(pm, torch.optim.AdamW, lr=1e-4)
            runs[mode] = (pm, opt, [])
            for _ in range(cfg["warmup"]):
                _step(pm, opt, inputs)
        for _ in range(cfg["rounds"]):   # rounds alternate the modes: a drift of the host hits all alike
            for mode, (pm, opt, times) in runs.items():
                for _ in range(cfg["steps"]):
                    times.append(_step(pm, opt, inputs))
        for mode, (pm, _, times) in runs.items():
            p = pm.plan
            rows.append({"mode": mode, "mesh": "x".join(f"{n}={s}" for n, s in zip(p.mesh.dim_names, p.mesh.shape)),
                         "measured_s": statistics.median(times), "samples_s": times,
                         "step_time_s": p.predicted.step_time_s, "comm_s": p.predicted.time_breakdown.get("comm_s"),
                         "peak_memory_bytes": p.predicted.peak_memory_bytes})
        order = [*cfg["modes"], "free"]
        rows.sort(key=lambda r: order.index(r["mode"]))
        if rank == 0:
            out_q.put({"rows": rows})
    except Exception:  # noqa: BLE001 - reported to the parent, which exits 1
        import traceback
        out_q.put({"error": f"rank {rank}: {traceback.format_exc()}"})
    exit_worker(out_q)


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau over the pairs that neither list ties (two modes with the same plan predict the same time:
    their measured order is noise, not a ranking)."""
    pairs = [(i, j) for i, j in itertools.combinations(range(len(a)), 2) if a[i] != a[j] and b[i] != b[j]]
    s = sum(1 if (a[i] - a[j]) * (b[i] - b[j]) > 0 else -1 for i, j in pairs)
    return s / len(pairs) if pairs else float("nan")


def measured(world: int, cfg: dict) -> dict:
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=3600)
    for p in procs:
        p.join(60)
    if "error" in res:
        raise RuntimeError(res["error"])
    ok = [r for r in res["rows"] if "error" not in r]
    res["kendall_tau"] = kendall_tau([r["measured_s"] for r in ok], [r["step_time_s"] for r in ok])
    _print_rows(f"measured on gloo, {world} ranks, llama d_model {cfg['d_model']} batch {cfg['batch']} x {cfg['seq']}"
                f" (cpu-gloo preset predictions)", res["rows"], {r["mode"]: r["measured_s"] for r in ok})
    print(f"Kendall tau (measured vs predicted ranking): {res['kendall_tau']:.2f} over {len(ok)} plans")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", default="4", help="comma-separated gloo world sizes to measure (default 4)")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all modes (median of all their steps)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=60.0, help="ILP time limit per plan (planning part)")
    ap.add_argument("--skip-planning", action="store_true")
    ap.add_argument("--skip-measured", action="store_true")
    ap.add_argument("--planning-from", default=None, help="take the planning part from this earlier result JSON")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    load_start = list(os.getloadavg())
    res: dict = {}
    if args.planning_from:
        prev = json.loads(Path(args.planning_from).read_text())
        res["planning"], res["planning_machine"] = prev["planning"], prev["machine"]
    elif not args.skip_planning:
        res["planning"] = planning(PLANNING, args.time_limit)
    if not args.skip_measured:
        cfg = {"d_model": args.d_model, "batch": args.batch, "seq": args.seq, "vocab": args.vocab, "steps": args.steps,
               "warmup": args.warmup, "rounds": args.rounds, "modes": list(MODES)}
        res["measured"] = {str(w): measured(int(w), cfg) for w in args.ranks.split(",")}
        res["measured_config"] = cfg
    res["machine"] = machine(load_average_start=load_start, load_average_end=list(os.getloadavg()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
