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
    python benchmarks/plan_speed.py --models hf-llama3-8b,hf-mixtral-8x7b,hf-t5-large

The ``hf-*`` rows are HuggingFace ``transformers`` models as users write them (built from the published
config on the meta device, wrapped so ``forward(**kw)`` returns ``.loss``) planned through the front end
``autopar.plan`` (capture with exact folding, fused kernels on a GPU cluster, the device's capacity as
budget); their rows add ``nodes_fallback`` (the replicate-fallback count) and the keys that fell back.
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

# benchmarks/ (sys.path[0] when run as a script) comes off sys.path, so that no script here shadows a package
# of the same name; tests/ goes on it for the zoo's LossOf wrapper
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent / "tests"))

import torch  # noqa: E402

from autopar.core.capture import capture  # noqa: E402
from autopar.core.mesh import MeshSpec  # noqa: E402
from autopar.models import build_model  # noqa: E402
from autopar.cluster.profile import load_cluster  # noqa: E402
from autopar.core.errors import AutoparError  # noqa: E402
from autopar.solver import plan_graph  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "plan_speed.json"
DEFAULT_MODELS = ("gpt2-xl", "llama3-8b", "llama3-70b", "hf-llama3-8b", "hf-mixtral-8x7b", "hf-t5-large")
BATCH = 8
SEQ = {"gpt2": 1024, "llama": 2048}
TARGETS_S = {"llama3-8b": 10.0, "llama3-70b": 20.0,   # capture -> plan, 2 CPU cores
             "hf-llama3-8b": 10.0, "hf-mixtral-8x7b": 10.0, "hf-t5-large": 10.0}
HF_SEQ = {"hf-llama3-8b": 2048, "hf-mixtral-8x7b": 2048, "hf-t5-large": 512}
PHASES = ("build_model", "capture", "index", "strategies", "build_ilp", "solve", "write_plan")


def seq_for(model: str) -> int:
    if model in HF_SEQ:
        return HF_SEQ[model]
    return SEQ["llama"] if model.startswith("llama") else SEQ["gpt2"]


def build_hf(name: str, batch: int, seq: int):
    """An HF model of a published shape on the meta device, and its keyword inputs (token ids, labels)."""
    import transformers as tf
    if name == "hf-llama3-8b":
        cls, cfg = tf.LlamaForCausalLM, tf.LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    elif name == "hf-mixtral-8x7b":
        cls, cfg = tf.MixtralForCausalLM, tf.MixtralConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)
    elif name == "hf-t5-large":
        cls, cfg = tf.T5ForConditionalGeneration, tf.T5Config(
            d_model=1024, d_ff=4096, d_kv=64, num_layers=24, num_decoder_layers=24, num_heads=16,
            vocab_size=32128, decoder_start_token_id=0, pad_token_id=0)
    else:
        raise ValueError(f"unknown HF row {name!r}")
    from zoo.models import LossOf
    with torch.device("meta"):
        model = LossOf(cls(cfg))
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return model, {"input_ids": ids, "labels": ids}


def plan_hf_once(model_name: str, mesh: MeshSpec, cluster: str, batch: int, seq: int) -> dict:
    """One timed run of an HF row through the front end (autopar.plan): capture -> plan."""
    import autopar
    t0 = time.perf_counter()
    model, kw = build_hf(model_name, batch, seq)
    t1 = time.perf_counter()
    plan = autopar.plan(model, kw, mesh_shape=mesh.shape, mesh_dim_names=mesh.dim_names, cluster=cluster)
    t2 = time.perf_counter()
    phases = {"build_model": t1 - t0, **plan.solver.phase_times_s}
    return {"phases_s": {k: phases.get(k, 0.0) for k in PHASES}, "capture_to_plan_s": t2 - t1,
            "num_variables": plan.solver.num_variables, "num_constraints": plan.solver.num_constraints,
            "backend": plan.solver.backend, "status": plan.solver.status, "optimal": plan.solver.optimal,
            "step_time_s": plan.predicted.step_time_s, "peak_memory_bytes": plan.predicted.peak_memory_bytes,
            "num_parameters": plan.model.num_parameters, "folded_layers": dict(plan.model.folded_layers),
            "nodes_fallback": len(plan.nodes_fallback), "fallback_keys": list(plan.nodes_fallback)}


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
    failed: dict[str, str] = {}
    for name in models:
        once = plan_hf_once if name in HF_SEQ else plan_once
        try:
            runs = [once(name, mesh, args.cluster, args.batch, seq_for(name)) for _ in range(args.repeats)]
        except AutoparError as e:   # e.g. no plan within the ILP's time limit: a row saying so, not a crash
            failed[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED {failed[name]}", file=sys.stderr, flush=True)
            continue
        results[name] = {"batch": args.batch, "seq": seq_for(name), **median_run(runs)}
        print(f"{name}: capture->plan {results[name]['capture_to_plan_s']:.2f}s", file=sys.stderr, flush=True)

    checked = {n: results[n]["capture_to_plan_s"] <= t and results[n]["optimal"]
               for n, t in TARGETS_S.items() if n in results}
    checked.update({n: False for n in failed if n in TARGETS_S})
    report = {"benchmark": "plan_speed", "mesh": list(mesh.shape), "cluster": args.cluster, "repeats": args.repeats,
              "statistic": "median", "warmup": "gpt-tiny on (2,) cpu-gloo, untimed", "machine": machine_info(),
              "targets_s": TARGETS_S, "target_results": checked,
              "targets_met": all(checked.values()) if checked else None, "models": results, "failed": failed}
    print(render_table(results))
    print(f"targets met: {report['targets_met']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
