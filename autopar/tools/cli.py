"""The ``autopar`` command line: plan, show (``--explain``: why each node got its sharding), emit,
profile (measure this cluster into a profile JSON), predict (cost a hand-written GPT plan).

Exit codes: 0 success; 1 an autopar error (bad input, infeasible budget, ...: the message says
what to do); 2 bad command-line usage (argparse).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from autopar.cluster.measure import run_profile
from autopar.cluster.predict import GPTPlan, predict
from autopar.cluster.profile import ClusterProfile, load_cluster
from autopar.cluster.timing import ProfileOptions, sizes_between
from autopar.codegen import build_parallel_graph
from autopar.codegen.emit import check_rank, emit_source, place_factories
from autopar.core.capture import capture
from autopar.core.errors import AutoparError, ConfigError, PlanMismatchError
from autopar.core.mesh import PP_DIM, MeshSpec
from autopar.core.options import PipelineOptions, PlanOptions, parse_bytes
from autopar.core.plan import Plan
from autopar.frontend.applying import apply, parallelize
from autopar.frontend.explicit import compare_modes
from autopar.frontend.planning import capture_exact
from autopar.frontend.planning import plan as autopar_plan
from autopar.inference.commands import add_inference_commands
from autopar.models import build_model
from autopar.tools.explain import explain, render_explanation
from autopar.tools.report import fmt_bytes, fmt_time, render, summary
from autopar.tools.sweep import plot, render_sweep, sweep_memory
from autopar.train import load_train_config, train

EPILOG = "Exit codes: 0 ok, 1 autopar error (message says what to fix), 2 bad usage."


def _status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Phase:
    """Prints '[phase] ...' on start and the wall time when done (stderr)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> "_Phase":
        self.t0 = time.perf_counter()
        print(f"[{self.name}] ...", end="", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        print(f" {'done' if exc[0] is None else 'failed'} in {self.seconds:.2f}s", file=sys.stderr, flush=True)


def _placements_arg(values: list[str] | None, flag: str) -> dict[str, list[str]] | None:
    """``--fix 'input:*=S(0),R'`` (repeatable) -> {pattern: placements}."""
    if not values:
        return None
    out = {}
    for v in values:
        pat, sep, rhs = v.rpartition("=")
        places = [x for x in rhs.replace(",", " ").split() if x]
        if not sep or not pat or not places:
            raise ConfigError(f"{flag} {v!r}: write PATTERN=PLACEMENTS, one placement per mesh dim, e.g. "
                              f"{flag} 'input:*=S(0),R'")
        out[pat] = places
    return out


def plan_options(args: argparse.Namespace) -> PlanOptions:
    """The ``plan`` command's flags as the PlanOptions ``autopar.plan`` takes."""
    pipeline: object = None
    fixed = {k: getattr(args, k) for k in ("stages", "schedule", "microbatches", "virtual_stages")
             if getattr(args, k) is not None}
    if args.no_pipeline:
        if fixed:
            raise ConfigError(f"--no-pipeline contradicts {sorted('--' + k.replace('_', '-') for k in fixed)}")
        pipeline = False
    elif fixed:
        pipeline = PipelineOptions(**fixed)
    return PlanOptions(memory_budget=args.memory, fix=_placements_arg(args.fix, "--fix"),
                       prefer=_placements_arg(args.prefer, "--prefer"), backend=args.backend,
                       time_limit=args.time_limit, nodes=args.nodes, fold_layers=not args.no_fold,
                       precision=args.precision, fuse=args.fuse, offload=False if args.no_offload else None,
                       recompute=args.recompute, zero=args.zero, pipeline=pipeline,
                       **({"training": False, "kv_cache_bytes": args.kv_cache} if getattr(args, "inference", False)
                          else {"kv_cache_bytes": getattr(args, "kv_cache", None)}))


def cmd_plan(args: argparse.Namespace) -> int:
    opts = plan_options(args)
    mesh = MeshSpec.make(args.mesh, args.mesh_names)
    profile = load_cluster(args.cluster)
    profile.dim_links(mesh, args.nodes)  # validate the topology before any work
    _check_sweep_args(args)
    with _Phase(f"build {args.model} on meta"):
        model, inputs = build_model(args.model, batch=args.batch, seq=args.seq, device="meta")
    if not opts.training and isinstance(inputs, dict):
        inputs.pop("labels", None)   # inference: the forward to the logits, no loss
    if args.sweep_memory:
        with _Phase("capture (torch.export)"):
            cap = capture_exact(model, inputs, fold_layers=opts.fold_layers)   # as autopar.plan captures
        return _sweep(args, cap, mesh, profile, opts)
    what = "pipeline stages + ILPs" if PP_DIM in mesh.dim_names and opts.pipeline is not False else "ILP"
    with _Phase(f"capture + strategies + {what}"):
        plan = autopar_plan(model, inputs, mesh_shape=mesh.shape, mesh_dim_names=mesh.dim_names, cluster=profile,
                            options=opts)
    plan.to_json(args.out)
    print(render(plan))
    _status(f"wrote {args.out}")
    if args.compare:
        _compare(args, model, inputs, plan, profile, opts)
    return 0


def _compare(args: argparse.Namespace, model, inputs, free: Plan, profile, opts: PlanOptions) -> None:
    """``plan --compare`` / ``show --compare``: each explicit mode (DataParallel, TensorParallel 1D/2D/2.5D/3D)
    on the same devices beside the solver's plan (autopar.frontend.explicit.compare_modes)."""
    keep = ("memory_budget", "backend", "time_limit", "nodes", "fold_layers", "fuse", "offload", "recompute")
    with _Phase("explicit modes"):
        rows = compare_modes(model, inputs, free.mesh.size, cluster=profile, free=free,
                             **{k: getattr(opts, k) for k in keep})
    base = free.predicted.step_time_s
    table = [[r["mode"], r["mesh"] or "-", fmt_time(r["step_time_s"]), fmt_time(r["comm_s"] or 0.0),
              fmt_bytes(r["peak_memory_bytes"]), f"{r['step_time_s'] / base:.2f}x"] if "error" not in r else
             [r["mode"], "-", "-", "-", "-", "n/a"] for r in rows]
    print("\nexplicit modes beside the solver's plan (predicted; time relative to the solver's)")
    print(_table(["mode", "mesh", "step time", "comm", "peak memory", "vs free"], table))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']}: {r['error'].split(': ', 1)[1]}")


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    def line(r):
        return "  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _sweep(args: argparse.Namespace, cap, mesh, profile, opts: PlanOptions) -> int:
    """``plan --sweep-memory``: the time-memory frontier as a table (stdout) and optionally a PNG."""
    budget = opts.memory_budget or profile.device.memory_capacity
    with _Phase(f"memory sweep ({args.sweep_points} budgets)"):
        points = sweep_memory(cap, mesh, profile, top_budget=budget, points=args.sweep_points,
                              options=opts.replace(pipeline=False))
    mesh_text = "x".join(map(str, mesh.shape))
    print(f"time-memory sweep: {args.model} batch {args.batch} x {args.seq}, mesh {mesh_text}, cluster {profile.name}")
    print(render_sweep(points))
    if args.sweep_out:
        plot(points, args.sweep_out, title=f"{args.model} on {mesh_text} {profile.name}")
        _status(f"wrote {args.sweep_out}")
    return 0


def _check_sweep_args(args: argparse.Namespace) -> None:

    if not args.sweep_memory:
        if args.sweep_out:
            raise ConfigError("--sweep-out plots a memory sweep: add --sweep-memory")
        return
    if args.sweep_points < 2:
        raise ConfigError(f"--sweep-points must be at least 2 (the top budget and the smallest feasible one), "
                          f"got {args.sweep_points}")
    if args.sweep_out and not str(args.sweep_out).lower().endswith(".png"):
        raise ConfigError(f"--sweep-out writes a PNG; give a path ending in .png, got {args.sweep_out!r}")
    if args.sweep_out:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--sweep-out needs matplotlib: pip install 'autopar[plot]' (or matplotlib>=3.7)") from None


COMPARE_MODES = "<explicit modes>"   # `show --compare` without a file: the explicit modes beside the plan


def _model_of(plan: Plan, spec: str):
    """The built-in model ``spec`` on meta at the plan's input shapes; PlanMismatchError if it is not the
    model the plan was made for."""
    shapes = {i["name"]: i["shape"] for i in plan.model.inputs}
    batch, seq = (list(next(iter(shapes.values()), [1, 1])) + [1, 1])[:2]
    model, inputs = build_model(spec, batch=batch, seq=seq, device="meta")
    if capture(model, inputs, fold_layers=bool(plan.model.folded_layers)).fingerprint() != plan.model.fingerprint:
        raise PlanMismatchError(f"{spec} with inputs {shapes} is not the model the plan was made for; give the "
                                f"--model the plan was made with")
    return model, inputs


def cmd_show(args: argparse.Namespace) -> int:

    plan = Plan.from_json(args.plan)
    if args.compare == COMPARE_MODES:
        if args.explain or not args.model:
            raise ConfigError("show --compare re-plans the model under each explicit mode beside this plan: give "
                              "--model, the spec the plan was made with (e.g. --model llama-tiny), and no --explain")
        model, inputs = _model_of(plan, args.model)
        print(render(plan))
        opts = PlanOptions(fold_layers=bool(plan.model.folded_layers), nodes=args.nodes, time_limit=args.time_limit)
        _compare(args, model, inputs, plan, plan.cluster, opts)
        return 0
    if args.explain:

        if not args.model:
            raise ConfigError("show --explain recaptures the model to cost the alternatives: give --model, the spec "
                              "the plan was made with (e.g. --model gpt-tiny)")
        print(summary(plan) + "\n\n" + render_explanation(explain(plan, args.model, top=args.alternatives)))
        return 0
    print(render(plan))
    if args.compare:
        print("\n" + show_compare(plan, args.compare))
    return 0


def show_compare(plan: Plan, path: str) -> str:
    """``show --compare PREDICTION``: the plan beside a configuration priced by ``autopar predict --json`` (e.g. a
    published Megatron-LM configuration of the same model on the same devices): step time, its parts, peak memory."""
    try:
        pred = json.loads(Path(path).read_text())
        other_time, parts = float(pred["step_time_s"]), dict(pred["breakdown"]["time"])
        other_mem, other_mesh = int(pred["peak_memory_bytes"]), dict(pred["mesh"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"show --compare reads the JSON `autopar predict --json` prints (e.g. `autopar predict "
                          f"... --json > published.json`); {path!r} is not one: {e}") from None
    devices = 1
    for v in other_mesh.values():
        devices *= int(v)
    if devices != plan.mesh.size:
        raise ConfigError(f"show --compare compares configurations on the same devices: the plan's mesh has "
                          f"{plan.mesh.size}, the prediction's {other_mesh} has {devices}")
    mine = plan.predicted.time_breakdown
    keys = [k for k in dict.fromkeys([*mine, *parts]) if mine.get(k) or parts.get(k)]
    pipe = plan.pipeline
    how = (f"{pipe['schedule']}, {pipe['microbatches']} micro-batches" if pipe else "no pipeline")
    other_how = (f"{(pred.get('plan') or {}).get('schedule', '?')}, {pred.get('micro_batches', '?')} micro-batches "
                 f"per dp rank")
    mesh = " x ".join(f"{n}={s}" for n, s in zip(plan.mesh.dim_names, plan.mesh.shape))
    rows = [["this plan", mesh, how, fmt_time(plan.predicted.step_time_s)]
            + [fmt_time(mine[k]) if k in mine else "-" for k in keys]
            + [fmt_bytes(plan.predicted.peak_memory_bytes), "1.00x"],
            ["compared", " x ".join(f"{k}={v}" for k, v in other_mesh.items()), other_how, fmt_time(other_time)]
            + [fmt_time(parts[k]) if k in parts else "-" for k in keys]
            + [fmt_bytes(other_mem), f"{other_time / plan.predicted.step_time_s:.2f}x"]]
    head = ["", "mesh", "schedule", "step time", *(k.removesuffix("_s") for k in keys), "peak memory", "time vs plan"]
    return (f"beside {path} (predicted; `time vs plan` > 1: this plan is faster)\n" + _table(head, rows))


def _progress(what: str, done: int, total: int) -> None:
    """A one-line progress bar on stderr (module level: spawned ranks pickle it)."""
    width = 24
    fill = int(width * done / max(total, 1))
    end = "\n" if done >= total else ""
    print(f"\r[profile] [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {what:<32.32}", end=end,
          file=sys.stderr, flush=True)


def cmd_profile(args: argparse.Namespace) -> int:


    lo, hi = ("64KiB", "256MiB") if args.backend == "nccl" else ("4KiB", "4MiB")
    sizes = sizes_between(parse_bytes(args.min_bytes or lo), parse_bytes(args.max_bytes or hi), args.num_sizes)
    opts = ProfileOptions.for_backend(args.backend, sizes, args.trials)
    if args.quick:  # a rough profile in seconds: fewer points, fp32 only
        opts = ProfileOptions(message_sizes=sizes_between(sizes[0], sizes[-1], 3), trials=3, warmup=1,
                              matmul_sizes=(32, 128), stream_bytes=(1 << 16, 1 << 20), dtypes=("float32",),
                              probes=())
    if args.ops_of:
        opts = dataclasses.replace(opts, ops_of=(args.ops_of, args.batch, args.seq),
                                   ops_trial_s=2e-3 if args.quick else opts.ops_trial_s)
    mesh = MeshSpec.make(args.mesh, args.mesh_names) if args.mesh else None
    nproc = args.nproc or (mesh.size if mesh else 2)
    _status(f"[profile] {nproc} {args.backend} rank(s) on mesh {mesh.shape if mesh else (nproc,)}")
    t0 = time.perf_counter()
    data = run_profile(nproc=nproc, mesh_shape=mesh.shape if mesh else None,
                       dim_names=mesh.dim_names if mesh else None, backend=args.backend, opts=opts,
                       progress=_progress)
    prof = ClusterProfile.from_dict(data)  # what `plan --cluster` will read
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    _status(f"[profile] done in {time.perf_counter() - t0:.2f}s")
    print(_profile_table(prof, data.get("measurements", {}).get("dim_names")))
    _status(f"wrote {args.out}")
    return 0


def _profile_table(prof, dim_names) -> str:
    lines = [f"{prof.name}: {prof.device.name}",
             "  matmul " + ", ".join(f"{k} {v / 1e9:.2f} GFLOP/s" for k, v in prof.device.peak_flops.items())
             + f"; memory {prof.device.memory_bandwidth / 1e9:.2f} GB/s; op overhead "
             f"{fmt_time(prof.device.op_overhead_s)}", "",
             f"{'dim':6s} {'collective':15s} {'alpha':>10s} {'bandwidth':>12s}"]
    for i, link in enumerate(prof.mesh_dim_links or ()):
        name = dim_names[i] if dim_names else str(i)
        for kind, ab in link.collectives.items():
            lines.append(f"{name:6s} {kind:15s} {fmt_time(ab.alpha):>10s} {1 / ab.beta / 1e9:>8.3f} GB/s")
        lines.append(f"{name:6s} {'sync per call':15s} {fmt_time(link.sync_s):>10s}")
    if prof.op_times is not None:
        t = prof.op_times
        lines += ["", f"op times: {t.sources.get('ops', f'{len(t.times)} timed')} ({t.ranks} rank(s) at once), "
                      f"scale {t.scale:.3f}, extra {fmt_time(t.extra_op_s)} per op"]
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:

    plan = GPTPlan(layers=args.layers, hidden=args.hidden, heads=args.heads, seq=args.seq, vocab=args.vocab,
                   global_batch=args.global_batch, micro_batch=args.micro_batch, tp=args.tp, pp=args.pp, dp=args.dp,
                   sequence_parallel=args.sequence_parallel, recompute=args.recompute, interleave=args.interleave,
                   zero=args.zero, schedule=args.schedule, dtype=args.dtype, scatter_gather=args.scatter_gather,
                   dropout=args.dropout, grad_dtype=args.grad_dtype)
    pred = predict(plan, load_cluster(args.cluster), nodes=args.nodes, gpus=args.gpus)
    if args.json:
        print(json.dumps(pred.to_dict()))
    else:
        print(_prediction_text(pred))
    return 0


def _prediction_text(pred) -> str:
    c = pred.plan
    mesh = " x ".join(f"{k}={v}" for k, v in pred.mesh.items())
    tb = ", ".join(f"{k.removesuffix('_s')} {fmt_time(v)}" for k, v in pred.time_breakdown.items() if v)
    mb = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in pred.memory_breakdown.items())
    lines = [f"GPT L={c.layers} h={c.hidden} a={c.heads} s={c.seq} V={c.vocab}  batch {c.global_batch} "
             f"(micro {c.micro_batch}, {pred.micro_batches} per dp rank)  mesh {mesh}  cluster {pred.cluster}",
             f"predicted iteration time {fmt_time(pred.step_time_s)}  ({tb})",
             f"predicted memory per GPU {fmt_bytes(pred.peak_memory_bytes)}  ({mb})",
             f"model FLOP/s per GPU {pred.extras['achieved_flops_per_gpu'] / 1e12:.1f} TFLOP/s", "",
             f"{'communication':20s} {'ranks':>5s} {'count':>7s} {'each':>10s} {'traffic':>10s} {'time':>10s}"]
    for name, col in pred.communication.items():
        if col.count:
            lines.append(f"{name:20s} {col.ranks:5d} {col.count:7d} {fmt_bytes(col.bytes_each):>10s} "
                         f"{fmt_bytes(col.traffic_bytes):>10s} {fmt_time(col.time_s):>10s}")
    return "\n".join(lines)


def cmd_emit(args: argparse.Namespace) -> int:

    plan = Plan.from_json(args.plan)
    check_rank(args.rank, plan)
    shapes = {i["name"]: i["shape"] for i in plan.model.inputs}
    first = next(iter(shapes.values()), [1, 1])
    batch, seq = (first + [1, 1])[:2]
    model, inputs = build_model(args.model, batch=batch, seq=seq, device="meta")
    cap = capture(model, inputs, fold_layers=False)
    if cap.fingerprint() != plan.model.fingerprint:
        raise PlanMismatchError(f"{args.model} with inputs {shapes} is not the model the plan was made for; "
                                f"give the --model the plan was made with")
    # as apply does: fused kernels where the module runs on CUDA
    fuse = args.device.startswith("cuda") if args.fuse is None else args.fuse
    gm, _ = build_parallel_graph(cap, plan, fuse=fuse)
    print(emit_source(place_factories(gm, args.device), plan, rank=args.rank), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    import torch.distributed as dist

    cfg = load_train_config(args.config, args.set)
    try:
        result = train(cfg, parallelize=parallelize, apply=apply)
    finally:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.losses and int(os.environ.get("RANK", "0")) == 0:
        steps = sorted(result.losses)
        _status(f"trained steps {steps[0]}..{steps[-1]} of {cfg.training.steps}: loss {result.losses[steps[0]]:.4f}"
                f" -> {result.losses[steps[-1]]:.4f}")
    if world > 1:   # gloo's destructors sometimes abort a finished run at interpreter exit: leave now
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autopar", description="Compiler-style auto-parallelizer for PyTorch.",
                                epilog=EPILOG)
    p.add_argument("-v", "--verbose", action="store_true", help="log planner details")
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("plan", help="capture a model and solve a sharding plan (no GPU or process group needed)",
                        epilog=EPILOG)
    pl.add_argument("--model", required=True,
                    help="gpt2-small|gpt2-medium|gpt2-large|gpt2-xl|llama3-1b|llama3-8b|llama3-70b|gpt-tiny|"
                         "llama-tiny, or module:callable returning (model, example_inputs)")
    pl.add_argument("--batch", type=int, default=8, help="global batch size (default 8)")
    pl.add_argument("--seq", type=int, default=1024, help="sequence length (default 1024)")
    pl.add_argument("--mesh", default="8", help="mesh shape, e.g. 8x8 (default 8)")
    pl.add_argument("--mesh-names", default=None,
                    help="mesh dim names, e.g. dp,tp (default dp / dp,tp / dp,sp,tp); a dim named pp is laid out as "
                         "pipeline stages")
    pl.add_argument("--cluster", default="h100-sxm",
                    help="preset (h100-sxm, h200-sxm, a100-80g-sxm, cpu-gloo) or profile JSON path")
    pl.add_argument("--nodes", type=int, default=None,
                    help="number of nodes the mesh spans; the outer mesh dims cross nodes")
    pl.add_argument("--memory", default=None, help="memory budget per device, e.g. 80GiB (default: capacity)")
    pl.add_argument("--backend", default="auto", choices=["auto", "highs", "cbc"], help="ILP solver")
    pl.add_argument("--time-limit", type=float, default=60.0, help="ILP time limit in seconds (default 60)")
    pl.add_argument("--no-fold", action="store_true", help="capture every repeated block (slower)")
    pl.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                    help="cost the ops that run as one fused kernel (autopar.runtime_kernels) as that kernel's "
                         "traffic and list them in the plan (default: on for a GPU cluster, off for cpu-gloo)")
    pl.add_argument("--no-offload", action="store_true",
                    help="keep activations and optimizer states on the device (by default the ILP may move them to "
                         "host memory where the host is not the device)")
    pl.add_argument("--recompute", default=None, choices=["none", "selective", "full", "offload"],
                    help="recompute every repeated block this way, or offload its saved activations to host "
                         "memory (a GPU profile; default: the solver decides; pipelined plans: none or full)")
    pl.add_argument("--zero", type=int, default=None, choices=[0, 1, 2],
                    help="ZeRO stage for every parameter that can shard its state (default: the solver decides)")
    pl.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                    help="compute dtype under autocast with fp32 master weights (default fp32)")
    pl.add_argument("--fix", action="append", metavar="PATTERN=PLACEMENTS",
                    help="pin placements of what PATTERN matches (graph key or FQN glob), one per mesh dim, e.g. "
                         "--fix 'input:*=S(0),R' (repeatable)")
    pl.add_argument("--prefer", action="append", metavar="PATTERN=PLACEMENTS",
                    help="like --fix, for op outputs where the op has such a strategy (repeatable)")
    pl.add_argument("--inference", action="store_true",
                    help="plan inference: the forward alone (a built-in model without labels; no gradients, "
                         "optimizer states, recompute, ZeRO or offload); e.g. --batch 64 --seq 1 for a decode step")
    pl.add_argument("--kv-cache", default=None, metavar="BYTES",
                    help="with --inference: the KV cache the engine holds, as one device would (e.g. 32GiB); "
                         "charged per device by how the plan splits the attention heads")
    pl.add_argument("--no-pipeline", action="store_true",
                    help="on a mesh with a pp dim, plan without pipeline stages (pp as an ordinary dim)")
    pl.add_argument("--stages", type=int, default=None, help="pipeline stages in all (default: the planner's)")
    pl.add_argument("--schedule", default=None, choices=["gpipe", "1f1b", "interleaved"],
                    help="pipeline schedule (default: the planner's)")
    pl.add_argument("--microbatches", type=int, default=None, help="pipeline micro-batches (default: the planner's)")
    pl.add_argument("--virtual-stages", type=int, default=None, help="stages per pp rank (interleaved schedule)")
    pl.add_argument("--out", default="plan.json", help="where to write the plan (default plan.json)")
    pl.add_argument("--compare", action="store_true",
                    help="also plan the explicit modes (DataParallel, TensorParallel 1D/2D/2.5D/3D) on the same "
                         "devices and print their predicted step time and peak memory beside this plan's")
    pl.add_argument("--sweep-memory", action="store_true",
                    help="instead of one plan, solve at --sweep-points budgets from --memory (default: capacity) "
                         "down to the smallest feasible one and print the time-memory Pareto frontier (no plan "
                         "file is written)")
    pl.add_argument("--sweep-points", type=int, default=6, help="with --sweep-memory: budgets solved (default 6)")
    pl.add_argument("--sweep-out", default=None,
                    help="with --sweep-memory: also plot the frontier to this PNG (needs matplotlib: autopar[plot])")
    pl.set_defaults(func=cmd_plan)

    sh = sub.add_parser("show", help="print a plan's tables", epilog=EPILOG)
    sh.add_argument("plan", help="plan JSON written by `autopar plan`")
    sh.add_argument("--explain", action="store_true",
                    help="per node: chosen sharding, its compute/comm/memory, and the next-best alternatives "
                         "(recaptures --model)")
    sh.add_argument("--model", default=None, help="with --explain or --compare: the model spec the plan was made for")
    sh.add_argument("--nodes", type=int, default=None, help="with --compare: nodes the devices span")
    sh.add_argument("--time-limit", type=float, default=60.0, help="with --compare: ILP time limit per mode (s)")
    sh.add_argument("--alternatives", type=int, default=2, help="with --explain: alternatives per node (default 2)")
    sh.add_argument("--compare", nargs="?", const=COMPARE_MODES, default=None, metavar="PREDICTION_JSON",
                    help="also print a configuration priced by `autopar predict ... --json` (e.g. a published "
                         "Megatron-LM configuration on the same devices) beside this plan: step time and its parts, "
                         "peak memory. Without a file (needs --model): plan the explicit modes (DataParallel, "
                         "TensorParallel 1D/2D/2.5D/3D) on the plan's devices and cluster and print their predicted "
                         "step time and peak memory beside this plan's")
    sh.set_defaults(func=cmd_show)

    pr = sub.add_parser("profile", help="measure this cluster (collectives per mesh dim, matmul, memory) into a "
                                        "profile JSON for `plan --cluster`", epilog=EPILOG)
    pr.add_argument("--nproc", type=int, default=None,
                    help="ranks to spawn on this host (default: the mesh size, or 2); under torchrun the "
                         "existing ranks are used")
    pr.add_argument("--mesh", default=None, help="mesh shape to measure per dim, e.g. 2x2 (default: --nproc)")
    pr.add_argument("--mesh-names", default=None, help="mesh dim names, e.g. dp,tp")
    pr.add_argument("--backend", default="gloo", choices=["gloo", "nccl"], help="process group backend")
    pr.add_argument("--min-bytes", default=None, help="smallest message (default 4KiB on gloo, 64KiB on nccl)")
    pr.add_argument("--max-bytes", default=None, help="largest message (default 4MiB on gloo, 256MiB on nccl)")
    pr.add_argument("--num-sizes", type=int, default=5, help="message sizes between them (default 5)")
    pr.add_argument("--trials", type=int, default=5, help="timed trials per point; medians are used (default 5)")
    pr.add_argument("--quick", action="store_true",
                    help="a rough profile in seconds (3 sizes, 3 trials, fp32 only, no calibration; "
                         "with --ops-of, 2 ms op trials)")
    pr.add_argument("--ops-of", default=None, metavar="MODEL",
                    help="per-op calibration: also time this model's own ops (a --model spec as `plan` takes it) at "
                         "the local shapes of every strategy on the mesh, on all ranks at once; the planner charges "
                         "these times instead of the roofline (plan it with the same --batch and --seq)")
    pr.add_argument("--batch", type=int, default=8, help="with --ops-of: global batch size (default 8)")
    pr.add_argument("--seq", type=int, default=1024, help="with --ops-of: sequence length (default 1024)")
    pr.add_argument("--out", default="cluster.json", help="where to write the profile (default cluster.json)")
    pr.set_defaults(func=cmd_profile)

    pd = sub.add_parser("predict", help="iteration time and memory per GPU of a hand-written GPT plan",
                        epilog=EPILOG)
    for name, hlp in (("layers", "transformer layers L"), ("hidden", "hidden size h"), ("heads", "attention heads a"),
                      ("seq", "sequence length s"), ("vocab", "vocabulary size V"),
                      ("global-batch", "global batch B (sequences per step)"), ("micro-batch", "micro-batch b")):
        pd.add_argument(f"--{name}", type=int, required=True, help=hlp)
    pd.add_argument("--tp", type=int, default=1, help="tensor parallel size (Megatron 1-D)")
    pd.add_argument("--pp", type=int, default=1, help="pipeline stages")
    pd.add_argument("--dp", type=int, default=1, help="data parallel size")
    pd.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism with TP")
    pd.add_argument("--recompute", default="none", choices=["none", "selective", "full"], help="activation recompute")
    pd.add_argument("--interleave", type=int, default=1, help="virtual stages per pipeline rank (interleaved 1F1B)")
    pd.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"], help="pipeline schedule")
    pd.add_argument("--scatter-gather", action="store_true",
                    help="pipeline sends split over the tp ranks, all-gathered by the receiver (Megatron-LM)")
    pd.add_argument("--dropout", action="store_true", help="the model has attention and hidden dropout")
    pd.add_argument("--grad-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="dtype gradients are kept and data-parallel reduced in (default --dtype)")
    pd.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="ZeRO stage over dp")
    pd.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="parameter and compute dtype (AdamW states fp32)")
    pd.add_argument("--cluster", default="h100-sxm",
                    help="preset (h100-sxm, h200-sxm, a100-80g-sxm, cpu-gloo) or profile JSON path")
    pd.add_argument("--nodes", type=int, default=None, help="nodes; dp x tp x pp must equal nodes x GPUs per node")
    pd.add_argument("--gpus", type=int, default=None, help="total GPUs (default nodes x GPUs per node)")
    pd.add_argument("--json", action="store_true", help="print one JSON object")
    pd.set_defaults(func=cmd_predict)

    em = sub.add_parser("emit", help="print the rewritten module's Python source for a plan", epilog=EPILOG)
    em.add_argument("plan", help="plan JSON written by `autopar plan`")
    em.add_argument("--model", required=True, help="the model spec the plan was made for (see `autopar plan`)")
    em.add_argument("--rank", type=int, default=None,
                    help="note this rank's mesh coordinate in the header (the code is the same on every rank)")
    em.add_argument("--device", default="cpu", help="device for tensors the graph creates (default cpu)")
    em.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                    help="substitute the fused kernels (calls to autopar.runtime_kernels) as apply does on a "
                         "CUDA mesh (default: on when --device is cuda)")
    em.set_defaults(func=cmd_emit)

    tr = sub.add_parser("train", help="train a model from a TOML job file (one process, or under torchrun)",
                        epilog="Sections and every key's default: autopar/train/config.py. A mesh dim named pp "
                               "runs pipeline stages (--set 'parallel.dim_names=[\"pp\",\"dp\"]'). " + EPILOG)
    tr.add_argument("--config", required=True, help="the job's TOML file (e.g. examples/llama/tiny.toml)")
    tr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one key (repeatable), e.g. --set training.steps=10 --set parallel.mesh=[2,2]")
    tr.set_defaults(func=cmd_train)
    add_inference_commands(sub)   # generate, serve (autopar/inference/commands.py)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except AutoparError as e:
        print(f"autopar: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
