"""Per-op calibration (issue 5, Build 3): the cost model charges an op's measured time where the profile's
``op_times`` has it and the roofline otherwise; the table round-trips through JSON and rejects bad input
with OpTableError; calibrate_ops times every distinct (op, local shapes) the ILP considers, on every rank
at once, and a plan's predicted compute follows the table."""
import dataclasses
import json

import pytest
import torch

from autopar.core.errors import AutoparError, ClusterProfileError
from autopar.cluster.profile import PRESETS, ClusterProfile, OpTable, OpTableError, OpTime, load_cluster
from op_calibration_check import calibrate_on_ranks

CPU = PRESETS["cpu-gloo"]


@pytest.fixture(scope="module")
def tiny():
    from autopar.core.capture import capture
    from autopar.core.graph import index_graph
    from autopar.models import build_model

    torch.manual_seed(0)
    model, inputs = build_model("gpt-tiny", batch=2, seq=16, device="cpu")
    cap = capture(model, inputs)
    return model, inputs, cap, index_graph(cap)


def _linear_with_strategies(gi, mesh_shape):
    """A contraction node and its strategies (several local shapes on the mesh), with its input metas."""
    from autopar.solver.cost import contraction_flops
    from autopar.solver.strategies import strategies_for
    from autopar.solver.strategies.base import in_meta

    for node in gi.nodes.values():
        if node.kind != "op":
            continue
        metas = [in_meta(node, gi.nodes, i) for i in range(len(node.inputs))]
        if contraction_flops(node, metas):
            return node, metas, strategies_for(node, gi.nodes, mesh_shape)[0]
    raise AssertionError("gpt-tiny has no contraction")


def test_lookup_is_used_where_present_and_roofline_otherwise(tiny):
    from autopar.solver.cost import compute_cost, op_key

    gi = tiny[3]
    node, metas, strategies = _linear_with_strategies(gi, (2,))
    keys = [op_key(node, s, metas, (2,)) for s in strategies]
    assert len(set(k[1] for k in keys)) >= 2, "strategies give different local shapes"
    timed, other = strategies[0], next(s for s, k in zip(strategies, keys) if k[1] != keys[0][1])
    roof = compute_cost(node, timed, metas, CPU, (2,))
    table = OpTable(times={keys[0]: OpTime(fwd_s=0.25, bwd_s=0.5)}, extra_op_s=0.01)
    prof = dataclasses.replace(CPU, op_times=table)
    got = compute_cost(node, timed, metas, prof, (2,))
    assert (got.fwd_s, got.bwd_s) == pytest.approx((0.26, 0.52))   # a contraction: the extra per gradient
    assert got != roof
    assert compute_cost(node, other, metas, prof, (2,)) == compute_cost(node, other, metas, CPU, (2,))


def test_local_shapes_divide_sharded_dims():
    from autopar.core.graph import TensorMeta
    from autopar.core.placement import Partial, Replicate, Shard
    from autopar.solver.cost import local_shape

    m = TensorMeta(shape=(8, 6, 5), dtype=torch.float32)
    assert local_shape(m, (Shard(0), Shard(2)), (2, 2)) == (4, 6, 3)    # ceil, as torch.chunk's first shard
    assert local_shape(m, (Replicate(), Partial("sum")), (2, 2)) == (8, 6, 5)
    assert local_shape(m, (Shard(1), Shard(1)), (2, 3)) == (8, 1, 5)


def test_collect_ops_dedupes_the_strategies_the_ilp_considers(tiny):
    from autopar.cluster.calibrate import collect_ops
    from autopar.solver.cost import FREE_OPS, op_key
    from autopar.solver.ilp import collect_keys
    from autopar.core.mesh import MeshSpec

    gi = tiny[3]
    calls = collect_ops(tiny[2], (2, 2))
    pairs = 0
    for info in collect_keys(gi, MeshSpec.make((2, 2)), CPU).values():
        if info.node.kind != "op" or info.node.target in FREE_OPS:
            continue
        for s in info.strategies:
            pairs += 1
            assert op_key(info.node, s, info.in_metas, (2, 2)) in calls
    assert 0 < len(calls) < pairs
    assert all(k[0] != "aten.view.default" for k in calls)


def _table(**kw) -> dict:
    d = {"ranks": 1, "extra_op_s": 1e-5, "entries": [
        {"op": "aten.mm.default", "shapes": [[4, 8], [8, 2]], "dtype": "float32", "args": "((T,T),{})",
         "fwd_s": 1e-4, "bwd_s": 2e-4}]}
    d.update(kw)
    return d


def test_json_round_trip(tmp_path):
    prof = dataclasses.replace(CPU, op_times=OpTable.from_dict(_table()))
    path = tmp_path / "cluster.json"
    prof.to_json(path)
    back = load_cluster(str(path))
    assert back == prof and back.op_times.lookup(("aten.mm.default", ((4, 8), (8, 2)), "float32", "((T,T),{})")) \
        == OpTime(fwd_s=1e-4, bwd_s=2e-4)
    assert "op_times" not in CPU.to_dict()            # profiles without calibration are written as before
    assert ClusterProfile.from_dict(CPU.to_dict()).op_times is None


@pytest.mark.parametrize("table, match", [
    ({"entries": "mm"}, r"entries must be a list"),
    (_table(entries=[{"op": "aten.mm.default", "shapes": [[4]], "dtype": "float32", "fwd_s": 1.0, "bwd_s": 1.0}]),
     r"entries\[0\]: missing field\(s\) \['args'\]"),
    (_table(entries=[{**_table()["entries"][0], "fwd_s": -1.0}]), r"entries\[0\]: fwd_s must be a finite time"),
    (_table(entries=[{**_table()["entries"][0], "bwd_s": "fast"}]), r"entries\[0\]: bwd_s must be a finite time"),
    (_table(entries=[{**_table()["entries"][0], "shapes": [[4, 8.5]]}]), r"entries\[0\].shapes must be a list"),
    (_table(entries=[{**_table()["entries"][0], "op": 3}]), r"op, dtype and args must be strings"),
    (_table(ranks=0), r"ranks must be an integer >= 1"),
    (_table(extra_op_s=float("inf")), r"extra_op_s must be a finite time"),
    ("table", r"expected an object"),
])
def test_schema_errors_name_the_field(table, match):
    d = {**CPU.to_dict(), "op_times": table}
    with pytest.raises(OpTableError, match=match) as ei:
        ClusterProfile.from_dict(d, where="cluster.json")
    assert isinstance(ei.value, ClusterProfileError) and isinstance(ei.value, AutoparError)
    assert "cluster.json.op_times" in str(ei.value)


def test_a_table_belongs_to_its_world_size():
    measured = dataclasses.replace(CPU, mesh_shape=(2, 2), mesh_dim_links=(CPU.intra_node, CPU.intra_node))
    with pytest.raises(OpTableError, match=r"measured with 1 rank\(s\) at once but the profile is for a mesh of 4"):
        dataclasses.replace(measured, op_times=OpTable.from_dict(_table()))
    ok = dataclasses.replace(measured, op_times=OpTable.from_dict(_table(ranks=4)))
    assert ClusterProfile.from_dict(json.loads(json.dumps(ok.to_dict()))) == ok
    # a pipeline costs its stages on a sub-mesh without the measured links: the table stays
    assert dataclasses.replace(ok, mesh_shape=None, mesh_dim_links=None).op_times is ok.op_times


def test_plan_follows_the_measured_times(tiny):
    """calibrate_ops times every op of the replicated plan; its predicted compute is then exactly the table's
    times (plus the per-op extra), and scaling the table scales it; the roofline plan differs."""
    import autopar
    from autopar.cluster.calibrate import OpCalibrationOptions, calibrate_ops
    from autopar.core.plan import SCHEMA_PATH

    model, inputs, cap, _ = tiny
    table = calibrate_ops(cap, (2,), CPU, options=OpCalibrationOptions(trials=2, warmup=1, min_trial_s=2e-4))
    assert table.ranks == 1 and table.times and all(t.fwd_s > 0 for t in table.times.values())
    assert "0 over the cap" in table.sources["ops"]
    rep = {"fix": {"input:*": ["R"], "param:*": ["R"]}, "prefer": {"*": ["R"]}}
    plan = lambda prof: autopar.plan(model, inputs, mesh_shape=(2,), cluster=prof, **rep)  # noqa: E731
    bare = dataclasses.replace(table, extra_op_s=0.0)
    p1 = plan(dataclasses.replace(CPU, op_times=bare))
    twice = dataclasses.replace(bare, times={k: OpTime(fwd_s=2 * t.fwd_s, bwd_s=2 * t.bwd_s)
                                             for k, t in bare.times.items()})
    p2 = plan(dataclasses.replace(CPU, op_times=twice))
    c1, c2 = p1.predicted.time_breakdown["compute_s"], p2.predicted.time_breakdown["compute_s"]
    assert c2 == pytest.approx(2 * c1, rel=1e-6), "every op of the replicated plan is charged from the table"
    assert c1 != pytest.approx(plan(CPU).predicted.time_breakdown["compute_s"], rel=1e-3)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(json.loads(p1.to_json()))


def test_ranks_time_the_ops_together(dist2):
    """On a process group every rank times the same ops at once (slowest rank's median): both ranks return
    the same table, recorded as measured by 2 ranks, which a 2-rank profile takes and a 1-rank one refuses."""
    t0, t1 = dist2.run(calibrate_on_ranks, (2,))
    same = lambda t: {k: v for k, v in t.items() if k != "sources"}  # noqa: E731 - sources: each rank's clock
    assert same(t0) == same(t1) and t0["ranks"] == 2 and t0["entries"] and t0["scale"] > 0
    table = OpTable.from_dict(t0)
    two = dataclasses.replace(CPU, mesh_shape=(2,), mesh_dim_links=(CPU.intra_node,))
    assert dataclasses.replace(two, op_times=table).op_times.ranks == 2
    with pytest.raises(OpTableError, match="2 rank"):
        dataclasses.replace(two, mesh_shape=(1,), mesh_dim_links=(CPU.intra_node,), op_times=table)


def test_scale_and_extra_are_charged(tiny):
    from autopar.solver.cost import compute_cost, op_key

    node, metas, strategies = _linear_with_strategies(tiny[3], (2,))
    key = op_key(node, strategies[0], metas, (2,))
    table = OpTable(times={key: OpTime(fwd_s=0.1, bwd_s=0.3)}, extra_op_s=0.01, scale=2.0)
    got = compute_cost(node, strategies[0], metas, dataclasses.replace(CPU, op_times=table), (2,))
    assert (got.fwd_s, got.bwd_s) == pytest.approx((0.21, 0.62))
    with pytest.raises(OpTableError, match="scale must be a finite factor > 0"):
        OpTable.from_dict(_table(scale=0))


def test_cli_profile_ops_of_writes_a_table_the_planner_charges(tmp_path, capsys):
    from autopar.tools.cli import main

    out = tmp_path / "cluster.json"
    assert main(["profile", "--nproc", "2", "--quick", "--max-bytes", "1MiB", "--ops-of", "gpt-tiny", "--batch", "2",
                 "--seq", "16", "--out", str(out)]) == 0
    assert "op times:" in capsys.readouterr().out
    prof = load_cluster(str(out))
    assert prof.op_times is not None and prof.op_times.ranks == 2 and prof.op_times.times
    plan = tmp_path / "plan.json"
    assert main(["plan", "--model", "gpt-tiny", "--batch", "2", "--seq", "16", "--mesh", "2", "--cluster", str(out),
                 "--out", str(plan)]) == 0
    without = dataclasses.replace(prof, op_times=None)
    without.to_json(tmp_path / "roofline.json")
    assert main(["plan", "--model", "gpt-tiny", "--batch", "2", "--seq", "16", "--mesh", "2",
                 "--cluster", str(tmp_path / "roofline.json"), "--out", str(tmp_path / "plan0.json")]) == 0
    from autopar.core.plan import Plan
    p1, p0 = Plan.from_json(plan), Plan.from_json(tmp_path / "plan0.json")
    assert p1.cluster.op_times == prof.op_times
    assert p1.predicted.time_breakdown["compute_s"] != pytest.approx(p0.predicted.time_breakdown["compute_s"], rel=1e-3)


def test_capped_calibration_leaves_the_rest_to_the_roofline(tiny):
    from autopar.cluster.calibrate import OpCalibrationOptions, calibrate_ops, collect_ops
    from autopar.solver.cost import compute_cost, op_key

    cap, gi = tiny[2], tiny[3]
    table = calibrate_ops(cap, (2,), CPU, options=OpCalibrationOptions(trials=1, warmup=0, min_trial_s=1e-4,
                                                                       max_ops=3))
    n = len(collect_ops(cap, (2,)))
    assert len(table.times) == 3 and f"{n - 3} over the cap" in table.sources["ops"]
    node, metas, strategies = _linear_with_strategies(gi, (2,))
    prof = dataclasses.replace(CPU, op_times=table)
    for s in strategies:
        if op_key(node, s, metas, (2,)) not in table.times:
            assert compute_cost(node, s, metas, prof, (2,)) == compute_cost(node, s, metas, CPU, (2,))
