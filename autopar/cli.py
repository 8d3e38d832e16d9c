"""The ``autopar`` command line: plan, show (and the commands of later issues).

Exit codes: 0 success; 1 an autopar error (bad input, infeasible budget, ...: the message says
what to do); 2 bad command-line usage (argparse).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from autopar.errors import AutoparError

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


def cmd_plan(args: argparse.Namespace) -> int:
    from autopar.api import parse_bytes
    from autopar.capture import capture
    from autopar.mesh import MeshSpec
    from autopar.models import build_model
    from autopar.profile import load_cluster
    from autopar.report import render
    from autopar.solver import plan_graph

    mesh = MeshSpec.make(args.mesh, args.mesh_names)
    profile = load_cluster(args.cluster)
    budget = parse_bytes(args.memory) if args.memory else profile.device.memory_capacity
    profile.dim_links(mesh, args.nodes)  # validate the topology before any work
    with _Phase(f"build {args.model} on meta"):
        model, inputs = build_model(args.model, batch=args.batch, seq=args.seq, device="meta")
    with _Phase("capture (torch.export)") as cap_phase:
        cap = capture(model, inputs, fold_layers=not args.no_fold)
    with _Phase("strategies + ILP"):
        plan = plan_graph(cap, mesh, profile, nodes=args.nodes, budget=budget, backend=args.backend,
                          time_limit=args.time_limit, phase_times={"capture": cap_phase.seconds})
    plan.to_json(args.out)
    print(render(plan))
    _status(f"wrote {args.out}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from autopar.plan import Plan
    from autopar.report import render

    print(render(Plan.from_json(args.plan)))
    return 0


def cmd_emit(args: argparse.Namespace) -> int:
    from autopar.capture import capture
    from autopar.codegen import build_parallel_graph
    from autopar.codegen.emit import check_rank, emit_source, place_factories
    from autopar.errors import PlanMismatchError
    from autopar.models import build_model
    from autopar.plan import Plan

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
    gm, _ = build_parallel_graph(cap, plan)
    print(emit_source(place_factories(gm, args.device), plan, rank=args.rank), end="")
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
    pl.add_argument("--mesh-names", default=None, help="mesh dim names, e.g. dp,tp (default dp / dp,tp / dp,sp,tp)")
    pl.add_argument("--cluster", default="h100-sxm",
                    help="preset (h100-sxm, h200-sxm, a100-80g-sxm, cpu-gloo) or profile JSON path")
    pl.add_argument("--nodes", type=int, default=None,
                    help="number of nodes the mesh spans; the outer mesh dims cross nodes")
    pl.add_argument("--memory", default=None, help="memory budget per device, e.g. 80GiB (default: capacity)")
    pl.add_argument("--backend", default="auto", choices=["auto", "highs", "cbc"], help="ILP solver")
    pl.add_argument("--time-limit", type=float, default=60.0, help="ILP time limit in seconds (default 60)")
    pl.add_argument("--no-fold", action="store_true", help="capture every repeated block (slower)")
    pl.add_argument("--out", default="plan.json", help="where to write the plan (default plan.json)")
    pl.set_defaults(func=cmd_plan)

    sh = sub.add_parser("show", help="print a plan's tables", epilog=EPILOG)
    sh.add_argument("plan", help="plan JSON written by `autopar plan`")
    sh.set_defaults(func=cmd_show)

    em = sub.add_parser("emit", help="print the rewritten module's Python source for a plan", epilog=EPILOG)
    em.add_argument("plan", help="plan JSON written by `autopar plan`")
    em.add_argument("--model", required=True, help="the model spec the plan was made for (see `autopar plan`)")
    em.add_argument("--rank", type=int, default=None,
                    help="note this rank's mesh coordinate in the header (the code is the same on every rank)")
    em.add_argument("--device", default="cpu", help="device for tensors the graph creates (default cpu)")
    em.set_defaults(func=cmd_emit)
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
