"""autopar.plan / apply / the parallel module fail with clear AutoparError subclasses that name what is
wrong: a mesh or world size that does not fit the plan, a plan made for another model, inputs of other
shapes than planned or missing, placements that cannot split a dimension, and arguments that are not
plans or meshes.

Planning-only and argument cases run in this process (no process group); the rest run in the shared
gloo pools (``dist2`` / ``dist4``), where every rank raises the same error and the pool re-raises it here.
"""
from __future__ import annotations

import json

import pytest
import torch

import autopar
from autopar.core.errors import AutoparError, ConfigError, MeshError, PlanFormatError, PlanMismatchError, ShardingError
from autopar.models import build_model, load_example_module

DP = {"input:*": ["S(0)"], "param:*": ["R"]}


# ------------------------------------------------------------------------------------ worker side


def _model(kind: str):
    """gpt-tiny, and models that differ from it in parameter names or shapes."""
    torch.manual_seed(0)
    if kind == "gpt":
        return build_model("gpt-tiny", batch=4, seq=16, device="cpu")[0]
    if kind == "llama":
        return build_model("llama-tiny", batch=4, seq=16, device="cpu")[0]
    gpt = load_example_module("gpt")
    cfg = {"gpt-nobias": dict(bias=False), "gpt-vocab128": dict(vocab_size=128)}[kind]
    return gpt.GPT(gpt.GPTConfig(**{**dict(n_layer=2, d_model=64, n_head=4, vocab_size=256, max_seq_len=64), **cfg}))


def _device_mesh(mesh):
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if mesh == "first-two-ranks":
        return DeviceMesh("cpu", torch.arange(2))
    return init_device_mesh("cpu", mesh)


def apply_plan(rank: int, world: int, plan_json: str, kind: str, mesh) -> None:
    """Apply the plan to a model of ``kind`` on ``mesh`` (raises what apply raises)."""
    autopar.apply(_model(kind), autopar.Plan.from_json(plan_json), _device_mesh(mesh))


def parallelize_over_budget(rank: int, world: int) -> dict:
    """parallelize() with a budget no plan fits: rank 0 plans and fails; every rank raises its error
    (the others used to wait for a plan in the broadcast until the process group timed out)."""
    import time
    from torch.distributed.device_mesh import init_device_mesh

    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="cpu")
    t0 = time.perf_counter()
    try:
        autopar.parallelize(model, init_device_mesh("cpu", (world,)), inputs, memory_budget=1000)
    except autopar.InfeasiblePlanError as e:
        return {"error": type(e).__name__, "message": str(e), "min_feasible_bytes": e.min_feasible_bytes,
                "seconds": time.perf_counter() - t0}
    return {"error": None}


def call_with(rank: int, world: int, plan_json: str, input_mode: str, calls: dict) -> dict:
    """Apply the plan to gpt-tiny, then call it with each of ``calls`` (name -> kwargs of shapes):
    name -> the exception raised (None when the call worked)."""
    torch.manual_seed(0)
    pm = autopar.apply(_model("gpt"), autopar.Plan.from_json(plan_json), _device_mesh((world,)),
                       input_mode=input_mode)
    out = {}
    for name, kwargs in calls.items():
        try:
            pm(**{k: torch.zeros(shape, dtype=torch.long) for k, shape in kwargs.items()})
            out[name] = None
        except Exception as e:  # noqa: BLE001 - returned to the parent and checked there
            out[name] = e
    return out


# ------------------------------------------------------------------------------------ parent side


def _plan(mesh, *, spec="gpt-tiny", batch=4, seq=16, **options):
    model, inputs = build_model(spec, batch=batch, seq=seq, device="meta")
    return autopar.plan(model, inputs, mesh_shape=mesh, cluster="cpu-gloo", **options)


@pytest.fixture(scope="module")
def plan2() -> str:
    """gpt-tiny, batch 4 x seq 16, data parallel on (2,) (inputs S(0): local shapes differ from global)."""
    return _plan((2,), fix=DP).to_json()


@pytest.fixture(scope="module")
def plan4() -> str:
    return _plan((4,), fix=DP).to_json()


# ---- mesh and world size


def test_plan_for_four_ranks_on_a_two_rank_mesh(dist2, plan4):
    with pytest.raises(MeshError) as ei:
        dist2.run(apply_plan, plan4, "gpt", (2,))
    assert "(4,)" in str(ei.value) and "(2,)" in str(ei.value), str(ei.value)


def test_device_mesh_shape_differs_from_plan_mesh(dist4, plan4):
    with pytest.raises(MeshError) as ei:
        dist4.run(apply_plan, plan4, "gpt", (2, 2))
    assert "(4,)" in str(ei.value) and "(2, 2)" in str(ei.value), str(ei.value)


def test_world_size_differs_from_plan_mesh(dist4, plan2):
    """A (2,) DeviceMesh over ranks 0-1 fits the plan's shape, but the process group has 4 ranks."""
    with pytest.raises(MeshError) as ei:
        dist4.run(apply_plan, plan2, "gpt", "first-two-ranks")
    msg = str(ei.value)
    assert "needs 2 ranks" in msg and "has 4" in msg, msg


def test_mesh_that_is_not_a_device_mesh(plan2):
    model = build_model("gpt-tiny", batch=4, seq=16, device="meta")[0]
    with pytest.raises(MeshError, match="DeviceMesh"):
        autopar.apply(model, autopar.Plan.from_json(plan2), (2,))


# ---- a plan made for another model


@pytest.mark.parametrize(("kind", "error", "named"), [
    ("llama", PlanMismatchError, ["'embed.weight'", "not in the plan"]),           # a parameter the plan lacks
    ("gpt-nobias", PlanMismatchError, ["'blocks.0.ln_1.bias'", "does not have"]),  # a planned one the model lacks
    ("gpt-vocab128", PlanMismatchError, ["'wte.weight'", "[128, 64]", "[256, 64]"]),  # same FQNs, other shape
], ids=["other-fqns", "missing-fqn", "other-shape"])
def test_plan_for_another_model(dist2, plan2, kind, error, named):
    with pytest.raises(error) as ei:
        dist2.run(apply_plan, plan2, kind, (2,))
    assert all(s in str(ei.value) for s in named), str(ei.value)


def test_hand_edited_placement_that_cannot_split(dist2, plan2):
    """A plan file edited to split a 1-D parameter on dim 1: apply refuses before touching the model."""
    d = json.loads(plan2)
    d["param_placements"]["blocks.0.ln_1.weight"] = ["S(1)"]
    with pytest.raises(ShardingError) as ei:
        dist2.run(apply_plan, json.dumps(d), "gpt", (2,))
    assert "'blocks.0.ln_1.weight'" in str(ei.value) and "[64]" in str(ei.value), str(ei.value)


# ---- inputs that do not fit the plan


def test_inputs_that_differ_from_the_planned_ones(dist2, plan2):
    calls = {
        "planned": {"idx": (4, 16), "labels": (4, 16)},
        "batch": {"idx": (2, 16), "labels": (2, 16)},
        "seq": {"idx": (4, 8), "labels": (4, 16)},
        "missing": {"idx": (4, 16)},
        "unknown": {"idx": (4, 16), "labels": (4, 16), "mask": (4, 16)},
    }
    for rank, got in enumerate(dist2.run(call_with, plan2, "global", calls)):
        assert got["planned"] is None, got["planned"]
        for name in ("batch", "seq", "missing", "unknown"):
            assert isinstance(got[name], PlanMismatchError), (rank, name, got[name])
        assert all(s in str(got["batch"]) for s in ("'idx'", "[2, 16]", "[4, 16]")), str(got["batch"])
        assert all(s in str(got["seq"]) for s in ("'idx'", "[4, 8]", "[4, 16]")), str(got["seq"])
        assert "'labels'" in str(got["missing"]) and "not given" in str(got["missing"]), str(got["missing"])
        assert "mask" in str(got["unknown"]), str(got["unknown"])


def test_local_input_mode_wants_this_ranks_shard(dist2, plan2):
    calls = {"local": {"idx": (2, 16), "labels": (2, 16)}, "global": {"idx": (4, 16), "labels": (4, 16)}}
    for got in dist2.run(call_with, plan2, "local", calls):
        assert got["local"] is None, got["local"]
        err = got["global"]
        assert isinstance(err, PlanMismatchError), err
        assert all(s in str(err) for s in ("'idx'", "[4, 16]", "[2, 16]", "local")), str(err)


# ---- placements that cannot split a dimension (planning only)


@pytest.mark.parametrize(("mesh", "batch", "fix", "named"), [
    ((3,), 4, {"param:*attn.qkv.weight": ["S(1)"]}, ["qkv.weight", "192, 64", "(3,)"]),
    ((2,), 1, {"input:idx": ["S(0)"]}, ["input:idx", "1, 16", "(2,)"]),
    ((4,), 2, {"input:*": ["S(0)"]}, ["input:", "2, 16", "(4,)"]),
    ((2, 2), 4, {"input:*": ["S(0)"]}, ["1 placements", "2-D mesh"]),
], ids=["weight-dim-by-3", "batch-1-by-2", "batch-2-by-4", "placements-per-dim"])
def test_fix_that_cannot_split(mesh, batch, fix, named):
    with pytest.raises(ShardingError) as ei:
        _plan(mesh, batch=batch, fix=fix)
    assert all(s in str(ei.value) for s in named), str(ei.value)


def test_fix_with_a_malformed_placement():
    with pytest.raises(AutoparError) as ei:
        _plan((2,), fix={"input:*": ["S0"]})
    assert isinstance(ei.value, (PlanFormatError, ConfigError)) and "'S0'" in str(ei.value), repr(ei.value)


def test_unknown_plan_option():
    with pytest.raises(ConfigError, match="fixx"):
        _plan((2,), fixx={"input:*": ["S(0)"]})


# ---- arguments that are not plans


@pytest.mark.parametrize("bad", [None, {"version": 1}, "plan.json", '{"version": 1}'],
                         ids=["none", "dict", "path", "json-text"])
def test_apply_wants_a_plan(bad):
    model = build_model("gpt-tiny", batch=4, seq=16, device="meta")[0]
    with pytest.raises(ConfigError) as ei:
        autopar.apply(model, bad, None)
    assert "autopar.Plan" in str(ei.value) and "Plan.from_json" in str(ei.value), str(ei.value)


def test_planning_error_reaches_every_rank(dist2):
    results = dist2.run(parallelize_over_budget)
    assert [r["error"] for r in results] == ["InfeasiblePlanError"] * 2, results
    assert results[0]["message"] == results[1]["message"] and "smallest feasible budget" in results[1]["message"]
    assert results[1]["min_feasible_bytes"] == results[0]["min_feasible_bytes"] > 1000
    assert results[1]["seconds"] < 50, "rank 1 got the error at once, not at a process-group timeout"
