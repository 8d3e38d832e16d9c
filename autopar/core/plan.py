"""Plan: everything the planner decided, as a frozen dataclass with a versioned JSON form.

A plan loaded from JSON can be applied without solving. Loading parses JSON only (never executes
code) and checks every field, naming the one that is wrong. The JSON Schema ships beside this file
(``plan_schema.json``). This module imports only autopar's core.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopar.cluster.profile import ClusterProfile
from autopar.core.errors import PlanFormatError
from autopar.core.mesh import MeshSpec
from autopar.core.placement import Sharding, parse_sharding

PLAN_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("plan_schema.json")


PLAN_MODES = ("training", "inference")   # what a plan was solved for (Plan.mode)
PRECISION_DTYPES = ("float32", "bfloat16", "float16")   # compute dtypes a plan may run in
LOSS_SCALING = ("none", "dynamic")


def check_precision(precision: dict) -> dict[str, str]:
    """The precision dict with defaults filled in; a bad field raises PlanFormatError naming it."""
    if not isinstance(precision, dict):
        raise PlanFormatError(f"plan.precision: expected an object, got {type(precision).__name__}")
    unknown = set(precision) - {"param_dtype", "compute_dtype", "loss_scaling"}
    if unknown:
        raise PlanFormatError(f"plan.precision: unknown field(s) {sorted(unknown)}; known: param_dtype, "
                              f"compute_dtype, loss_scaling")
    param = precision.get("param_dtype", "float32")
    if param != "float32":
        raise PlanFormatError(f"plan.precision.param_dtype: {param!r} is not supported; parameters are float32 "
                              f"master weights (lower the compute with compute_dtype instead)")
    comp = precision.get("compute_dtype", "float32")
    if comp not in PRECISION_DTYPES:
        raise PlanFormatError(f"plan.precision.compute_dtype: {comp!r} is not one of {list(PRECISION_DTYPES)}")
    scaling = precision.get("loss_scaling", "dynamic" if comp == "float16" else "none")
    if scaling not in LOSS_SCALING:
        raise PlanFormatError(f"plan.precision.loss_scaling: {scaling!r} is not one of {list(LOSS_SCALING)}")
    if scaling == "dynamic" and comp != "float16":
        raise PlanFormatError(f"plan.precision.loss_scaling: 'dynamic' is for float16 compute; with "
                              f"{comp} use 'none'")
    return {"param_dtype": param, "compute_dtype": comp, "loss_scaling": scaling}


@dataclass(frozen=True, kw_only=True)
class NodeSharding:
    """Placements of one graph node: per tensor input (in argument order) and per output."""

    inputs: tuple[tuple[str, ...] | None, ...]
    outputs: tuple[tuple[str, ...] | None, ...]

    def input_sharding(self, i: int) -> Sharding | None:
        s = self.inputs[i]
        return parse_sharding(list(s)) if s is not None else None

    def output_sharding(self, i: int) -> Sharding | None:
        s = self.outputs[i]
        return parse_sharding(list(s)) if s is not None else None


@dataclass(frozen=True, kw_only=True)
class Predicted:
    """Predicted per-step time (s) and per-rank peak memory (bytes), each with its breakdown."""

    step_time_s: float
    time_breakdown: dict[str, float]
    peak_memory_bytes: int
    memory_breakdown: dict[str, int]


@dataclass(frozen=True, kw_only=True)
class SolverStats:
    backend: str
    status: str
    optimal: bool
    objective: float
    num_variables: int
    num_constraints: int
    phase_times_s: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    fingerprint: str
    inputs: tuple[dict, ...]                  # {"name", "shape", "dtype"}
    folded_layers: dict[str, int] = field(default_factory=dict)
    num_parameters: int = 0
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)   # FQN -> shape


@dataclass(frozen=True, kw_only=True)
class LayerCost:
    """One row of the per-layer table: a module (or repeated block) with its time and memory."""

    name: str
    count: int
    time_s: float
    comm_s: float
    memory_bytes: int


@dataclass(frozen=True, kw_only=True)
class FusedKernel:
    """Ops the cost model priced as one fused kernel of ``autopar.runtime_kernels`` (codegen's
    fuse_kernels substitutes it when the module runs on CUDA, where no reshard sits between the ops)."""

    kind: str                  # rms_norm | add_norm | layer_norm | bias_gelu | swiglu | rotary | cross_entropy
    root: str                  # graph key of the node whose value the kernel returns
    nodes: tuple[str, ...]     # graph keys of the ops whose work it does, root last
    count: int                 # instances in the full model
    time_saved_s: float        # forward + backward compute it saves per step (all instances), as predicted


@dataclass(frozen=True, kw_only=True)
class Plan:
    mesh: MeshSpec
    cluster: ClusterProfile
    model: ModelInfo
    param_placements: dict[str, tuple[str, ...]]       # FQN -> ("S(0)", "R")
    node_shardings: dict[str, NodeSharding]            # graph key -> placements
    predicted: Predicted
    solver: SolverStats
    layers: tuple[LayerCost, ...] = ()
    checkpoint: tuple[str, ...] = ()
    offload: tuple[str, ...] = ()
    optimizer_sharding: dict[str, tuple[str, ...]] = field(default_factory=dict)   # ZeRO-1/2: FQN -> state placements
    gradient_sharding: dict[str, tuple[str, ...]] = field(default_factory=dict)    # ZeRO-2: FQN -> gradient placements
    optimizer_offload: bool = False    # optimizer states, fp32 master weights and the step on the host CPU
    pipeline: dict | None = None
    precision: dict[str, str] = field(default_factory=lambda: {"param_dtype": "float32", "compute_dtype": "float32"})
    nodes_fallback: tuple[str, ...] = ()              # ops planned by the replicate fallback
    fusions: tuple[FusedKernel, ...] = ()             # fused kernels the costs assume (empty: unfused)
    # "training": a training step (forward + backward + optimizer); "inference": the forward alone, as
    # autopar.plan(training=False) prices it; apply() then builds a module without gradient synchronization
    mode: str = "training"
    version: int = PLAN_VERSION

    @property
    def training(self) -> bool:
        return self.mode == "training"

    # --- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "mode": self.mode,
            "mesh": {"shape": list(self.mesh.shape), "dim_names": list(self.mesh.dim_names)},
            "cluster": self.cluster.to_dict(),
            "model": {"fingerprint": self.model.fingerprint, "inputs": [dict(i) for i in self.model.inputs],
                      "folded_layers": dict(self.model.folded_layers), "num_parameters": self.model.num_parameters,
                      "param_shapes": {k: list(v) for k, v in self.model.param_shapes.items()}},
            "param_placements": {k: list(v) for k, v in self.param_placements.items()},
            "node_shardings": {k: {"inputs": [list(s) if s is not None else None for s in v.inputs],
                                   "outputs": [list(s) if s is not None else None for s in v.outputs]}
                               for k, v in self.node_shardings.items()},
            "checkpoint": list(self.checkpoint),
            "offload": list(self.offload),
            "optimizer_sharding": {k: list(v) for k, v in self.optimizer_sharding.items()},
            "optimizer_offload": self.optimizer_offload,
            "gradient_sharding": {k: list(v) for k, v in self.gradient_sharding.items()},
            "pipeline": self.pipeline,
            "precision": dict(self.precision),
            "predicted": {"step_time_s": self.predicted.step_time_s,
                          "time_breakdown": dict(self.predicted.time_breakdown),
                          "peak_memory_bytes": self.predicted.peak_memory_bytes,
                          "memory_breakdown": dict(self.predicted.memory_breakdown)},
            "solver": {"backend": self.solver.backend, "status": self.solver.status, "optimal": self.solver.optimal,
                       "objective": self.solver.objective, "num_variables": self.solver.num_variables,
                       "num_constraints": self.solver.num_constraints,
                       "phase_times_s": dict(self.solver.phase_times_s)},
            "layers": [{"name": r.name, "count": r.count, "time_s": r.time_s, "comm_s": r.comm_s,
                        "memory_bytes": r.memory_bytes} for r in self.layers],
            "nodes_fallback": list(self.nodes_fallback),
            "fusions": [{"kind": f.kind, "root": f.root, "nodes": list(f.nodes), "count": f.count,
                         "time_saved_s": f.time_saved_s} for f in self.fusions],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @staticmethod
    def from_json(path_or_text: str | Path) -> "Plan":
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        if p is not None and not p.exists():
            raise PlanFormatError(f"plan file {str(p)!r} does not exist; write one with `autopar plan --out {p}`")
        text = p.read_text() if p is not None else str(path_or_text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanFormatError(f"plan {'file ' + repr(str(p)) if p else 'text'} is not valid JSON "
                                  f"(line {e.lineno}, column {e.colno}): {e.msg}") from None
        return Plan.from_dict(data)

    @staticmethod
    def from_dict(d: Any) -> "Plan":
        if not isinstance(d, dict):
            raise PlanFormatError("plan: expected a JSON object at the top level")
        version = _field(d, "version", int, "plan")
        if version != PLAN_VERSION:
            raise PlanFormatError(f"plan.version: unknown plan version {version!r}; this autopar reads version "
                                  f"{PLAN_VERSION} (re-plan with `autopar plan`)")
        mode = d.get("mode", "training")   # optional: plans written before inference plans are training plans
        if mode not in PLAN_MODES:
            raise PlanFormatError(f"plan.mode: {mode!r:.60} is not one of {list(PLAN_MODES)}")
        mesh_d = _field(d, "mesh", dict, "plan")
        shape = _field(mesh_d, "shape", list, "plan.mesh")
        names = _field(mesh_d, "dim_names", list, "plan.mesh")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape):
            raise PlanFormatError(f"plan.mesh.shape: expected positive integers, got {shape!r}")
        if not all(isinstance(x, str) for x in names):
            raise PlanFormatError(f"plan.mesh.dim_names: expected strings, got {names!r}")
        mesh = MeshSpec.make(tuple(shape), tuple(names))
        cluster = ClusterProfile.from_dict(_field(d, "cluster", dict, "plan"), where="plan.cluster")
        md = _field(d, "model", dict, "plan")
        inputs = _field(md, "inputs", list, "plan.model")
        for i, spec in enumerate(inputs):
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or \
                    not isinstance(spec.get("shape"), list) or not isinstance(spec.get("dtype"), str):
                raise PlanFormatError(f"plan.model.inputs[{i}]: expected {{name: str, shape: [int], dtype: str}}")
        folded = md.get("folded_layers", {})
        if not isinstance(folded, dict) or not all(isinstance(v, int) for v in folded.values()):
            raise PlanFormatError("plan.model.folded_layers: expected an object of list name -> int")
        pshapes = md.get("param_shapes", {})
        if not isinstance(pshapes, dict) or not all(
                isinstance(v, list) and all(isinstance(x, int) for x in v) for v in pshapes.values()):
            raise PlanFormatError("plan.model.param_shapes: expected an object of FQN -> list of ints")
        model = ModelInfo(fingerprint=_field(md, "fingerprint", str, "plan.model"), inputs=tuple(inputs),
                          folded_layers=dict(folded), param_shapes={k: tuple(v) for k, v in pshapes.items()},
                          num_parameters=_field(md, "num_parameters", int, "plan.model") if "num_parameters" in md
                          else 0)
        params = {}
        for fqn, pl in _field(d, "param_placements", dict, "plan").items():
            parse_sharding(pl, field=f"plan.param_placements[{fqn!r}]")
            if len(pl) != mesh.ndim:
                raise PlanFormatError(f"plan.param_placements[{fqn!r}]: {len(pl)} placements for a "
                                      f"{mesh.ndim}-D mesh; give one per mesh dim")
            params[fqn] = tuple(pl)
        nodes = {}
        for key, ns in _field(d, "node_shardings", dict, "plan").items():
            where = f"plan.node_shardings[{key!r}]"
            if not isinstance(ns, dict):
                raise PlanFormatError(f"{where}: expected an object with 'inputs' and 'outputs'")
            nodes[key] = NodeSharding(inputs=_shardings(_field(ns, "inputs", list, where), f"{where}.inputs", mesh),
                                      outputs=_shardings(_field(ns, "outputs", list, where), f"{where}.outputs", mesh))
        pr = _field(d, "predicted", dict, "plan")
        predicted = Predicted(step_time_s=float(_field(pr, "step_time_s", (int, float), "plan.predicted")),
                              time_breakdown=dict(_field(pr, "time_breakdown", dict, "plan.predicted")),
                              peak_memory_bytes=int(_field(pr, "peak_memory_bytes", (int, float), "plan.predicted")),
                              memory_breakdown=dict(_field(pr, "memory_breakdown", dict, "plan.predicted")))
        sv = _field(d, "solver", dict, "plan")
        solver = SolverStats(backend=str(sv.get("backend", "")), status=str(sv.get("status", "")),
                             optimal=bool(sv.get("optimal", False)), objective=float(sv.get("objective", 0.0)),
                             num_variables=int(sv.get("num_variables", 0)),
                             num_constraints=int(sv.get("num_constraints", 0)),
                             phase_times_s=dict(sv.get("phase_times_s", {})))
        layers = []
        for i, r in enumerate(_list(d, "layers", "plan")):
            w = f"plan.layers[{i}]"
            if not isinstance(r, dict):
                raise PlanFormatError(f"{w}: expected an object")
            layers.append(LayerCost(name=_field(r, "name", str, w), count=_field(r, "count", int, w),
                                    time_s=float(_field(r, "time_s", (int, float), w)),
                                    comm_s=float(_field(r, "comm_s", (int, float), w)),
                                    memory_bytes=int(_field(r, "memory_bytes", (int, float), w))))
        for name in ("time_breakdown", "memory_breakdown"):
            for k, v in getattr(predicted, name).items():
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise PlanFormatError(f"plan.predicted.{name}.{k}: expected a number, got {v!r}")
        opt = _zero_field(d, "optimizer_sharding", mesh)
        grads = _zero_field(d, "gradient_sharding", mesh)
        for k, v in grads.items():
            if opt.get(k) != v:
                raise PlanFormatError(f"plan.gradient_sharding[{k!r}]: a sharded gradient (ZeRO-2) needs the same "
                                      f"placements in plan.optimizer_sharding, which has {opt.get(k)!r}")
        if mode == "inference" and (d.get("pipeline") or opt or d.get("checkpoint") or d.get("offload") or
                                    d.get("optimizer_offload")):
            raise PlanFormatError("plan.mode: an inference plan has no pipeline stages, ZeRO, recompute or offload "
                                  "fields (they are training decisions); re-plan with autopar.plan(training=False)")
        opt_offload = d.get("optimizer_offload", False)
        if not isinstance(opt_offload, bool):
            raise PlanFormatError(f"plan.optimizer_offload: expected true or false, got {opt_offload!r:.60}")
        return Plan(mesh=mesh, cluster=cluster, model=model, param_placements=params, node_shardings=nodes,
                    predicted=predicted, solver=solver, layers=tuple(layers),
                    checkpoint=tuple(_list(d, "checkpoint", "plan", str)), offload=tuple(_list(d, "offload", "plan", str)),
                    optimizer_sharding={k: tuple(v) for k, v in opt.items()},
                    gradient_sharding={k: tuple(v) for k, v in grads.items()}, optimizer_offload=opt_offload,
                    pipeline=_pipeline(d.get("pipeline"), mesh), precision=dict(d.get("precision", {})) or
                    {"param_dtype": "float32", "compute_dtype": "float32"},
                    nodes_fallback=tuple(_list(d, "nodes_fallback", "plan", str)),
                    fusions=tuple(_fusion(f, f"plan.fusions[{i}]") for i, f in enumerate(_list(d, "fusions", "plan"))),
                    mode=mode, version=version)


def _zero_field(d: dict, name: str, mesh: MeshSpec) -> dict[str, list[str]]:
    """``optimizer_sharding`` / ``gradient_sharding``: FQN -> one placement per mesh dim."""
    v = d.get(name, {})
    if not isinstance(v, dict):
        raise PlanFormatError(f"plan.{name}: expected an object of FQN -> placements")
    for k, pl in v.items():
        parse_sharding(pl, field=f"plan.{name}[{k!r}]")
        if len(pl) != mesh.ndim:
            raise PlanFormatError(f"plan.{name}[{k!r}]: {len(pl)} placements for a {mesh.ndim}-D mesh; give one "
                                  f"per mesh dim")
    return v


PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved")


def _fusion(f: Any, where: str) -> FusedKernel:
    if not isinstance(f, dict):
        raise PlanFormatError(f"{where}: expected an object with kind, root, nodes, count, time_saved_s")
    nodes = _field(f, "nodes", list, where)
    if not nodes or not all(isinstance(n, str) for n in nodes):
        raise PlanFormatError(f"{where}.nodes: expected a non-empty list of graph keys")
    count = _field(f, "count", int, where)
    if count < 1:
        raise PlanFormatError(f"{where}.count: must be >= 1, got {count}")
    return FusedKernel(kind=_field(f, "kind", str, where), root=_field(f, "root", str, where), nodes=tuple(nodes),
                       count=count, time_saved_s=float(_field(f, "time_saved_s", (int, float), where)))


def _pipeline(p: Any, mesh: MeshSpec) -> dict | None:
    """Check the ``pipeline`` field (structure in plan_schema.json, written by autopar.frontend.pipeline): schedule,
    micro-batches, virtual stages and per stage its pp rank, layers, parameter FQNs and intra-op plan."""
    if p is None:
        return None
    w = "plan.pipeline"
    if not isinstance(p, dict):
        raise PlanFormatError(f"{w}: expected an object or null")
    pp_dim = _field(p, "pp_dim", str, w)
    if pp_dim not in mesh.dim_names:
        raise PlanFormatError(f"{w}.pp_dim: {pp_dim!r} is not a dim of the plan's mesh {mesh.dim_names}")
    _field(p, "layer_list", str, w)
    if _field(p, "schedule", str, w) not in PIPELINE_SCHEDULES:
        raise PlanFormatError(f"{w}.schedule: {p['schedule']!r} is not one of {PIPELINE_SCHEDULES}")
    for k in ("microbatches", "virtual_stages"):
        if _field(p, k, int, w) < 1:
            raise PlanFormatError(f"{w}.{k}: must be >= 1, got {p[k]}")
    _field(p, "predicted_bubble_fraction", (int, float), w)
    stages = _field(p, "stages", list, w)
    pp = mesh.shape[mesh.dim_names.index(pp_dim)]
    if len(stages) != pp * p["virtual_stages"]:
        raise PlanFormatError(f"{w}.stages: {len(stages)} stages for {pp} pp ranks x {p['virtual_stages']} virtual "
                              f"stages")
    for i, st in enumerate(stages):
        ws = f"{w}.stages[{i}]"
        if not isinstance(st, dict):
            raise PlanFormatError(f"{ws}: expected an object")
        if _field(st, "index", int, ws) != i or _field(st, "pp_rank", int, ws) != i % pp:
            raise PlanFormatError(f"{ws}: expected index {i} on pp rank {i % pp}")
        for k in ("layers", "params"):
            if not all(isinstance(x, str) for x in _field(st, k, list, ws)):
                raise PlanFormatError(f"{ws}.{k}: expected a list of strings")
        if "plan" not in st:
            raise PlanFormatError(f"{ws}.plan: missing field")
        if "send_placements" in st:
            _send_placements(st, ws, mesh, pp_dim, i == len(stages) - 1)
        if st["plan"] is not None:
            try:
                Plan.from_dict(st["plan"])
            except PlanFormatError as e:
                raise PlanFormatError(f"{ws}.plan: {e}") from None
    return p


def _send_placements(st: dict, ws: str, mesh: MeshSpec, pp_dim: str, last: bool) -> None:
    """A stage's ``send_placements``: per output, one placement per non-pp mesh dim, shards or replicated."""
    sends = st["send_placements"]
    w = f"{ws}.send_placements"
    if last:
        raise PlanFormatError(f"{w}: the last stage sends nothing on; drop the field")
    if not isinstance(sends, list) or ("outputs" in st and len(sends) != len(st["outputs"])):
        raise PlanFormatError(f"{w}: expected one list of placements per output")
    for j, sh in enumerate(sends):
        if not isinstance(sh, list) or len(sh) != mesh.ndim - 1:
            raise PlanFormatError(f"{w}[{j}]: expected {mesh.ndim - 1} placements (the mesh dims besides "
                                  f"{pp_dim!r}), got {sh!r:.60}")
        parse_sharding(sh, field=f"{w}[{j}]")
        for x in sh:
            if x.startswith("P("):
                raise PlanFormatError(f"{w}[{j}]: a partial sum cannot be sent per rank; use 'R' (summed first)")


def _field(d: dict, key: str, typ, where: str):
    if key not in d:
        raise PlanFormatError(f"{where}.{key}: missing field")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise PlanFormatError(f"{where}.{key}: expected {names}, got {type(v).__name__} {v!r:.60}")
    return v


def _list(d: dict, key: str, where: str, item_type: type | None = None) -> list:
    v = d.get(key, [])
    if not isinstance(v, list) or (item_type is not None and not all(isinstance(x, item_type) for x in v)):
        what = f"a list of {item_type.__name__}" if item_type else "a list"
        raise PlanFormatError(f"{where}.{key}: expected {what}, got {v!r:.60}")
    return v


def _shardings(items: list, where: str, mesh: MeshSpec) -> tuple[tuple[str, ...] | None, ...]:
    out = []
    for i, s in enumerate(items):
        if s is None:
            out.append(None)
            continue
        parse_sharding(s, field=f"{where}[{i}]")
        if len(s) != mesh.ndim:
            raise PlanFormatError(f"{where}[{i}]: {len(s)} placements for a {mesh.ndim}-D mesh")
        out.append(tuple(s))
    return tuple(out)
