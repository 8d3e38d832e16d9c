"""Plan JSON: a hand-made plan round-trips, validates against the shipped schema, and bad files are named."""
import copy
import json

import pytest
from torch.distributed.tensor import Replicate, Shard

from autopar.core.errors import AutoparError, PlanFormatError
from autopar.core.mesh import MeshSpec
from autopar.core.plan import SCHEMA_PATH, FusedKernel, LayerCost, ModelInfo, NodeSharding, Plan, Predicted, SolverStats
from autopar.cluster.profile import PRESETS

QKV = "blocks.0.attn.qkv.weight"


def _plan(**changes) -> Plan:
    fields = dict(
        mesh=MeshSpec.make("2x2", "dp,tp"),
        cluster=PRESETS["cpu-gloo"],
        model=ModelInfo(fingerprint="0123456789abcdef",
                        inputs=({"name": "idx", "shape": [8, 64], "dtype": "int64"},
                                {"name": "labels", "shape": [8, 64], "dtype": "int64"}),
                        folded_layers={"blocks": 12}, num_parameters=124_439_808),
        param_placements={QKV: ("R", "S(0)"), "wte.weight": ("S(0)", "R"), "ln_f.weight": ("R", "R")},
        node_shardings={
            "blocks.*/attn/qkv/linear#0": NodeSharding(inputs=(("S(0)", "R"), ("R", "S(0)"), None),
                                                        outputs=(("S(0)", "S(-1)"),)),
            "root/cross_entropy#0": NodeSharding(inputs=(("S(0)", "R"),), outputs=(("P(avg)", "R"),)),
        },
        predicted=Predicted(step_time_s=0.125, time_breakdown={"compute": 0.1, "comm": 0.02, "recompute": 0.005},
                            peak_memory_bytes=3 * 2**30, memory_breakdown={"params": 2**30, "activations": 2**31}),
        solver=SolverStats(backend="cbc", status="Optimal", optimal=True, objective=0.125, num_variables=1234,
                           num_constraints=567, phase_times_s={"build": 0.5, "solve": 1.25}),
        layers=(LayerCost(name="blocks.*", count=12, time_s=0.01, comm_s=0.002, memory_bytes=1 << 20),),
        checkpoint=("blocks.*/mlp/gelu#0",),
        offload=("blocks.*/attn/scaled_dot_product_attention#0",),
        optimizer_sharding={QKV: ("S(0)", "S(0)")},
        optimizer_offload=True,
        gradient_sharding={QKV: ("S(0)", "S(0)")},
        pipeline={"pp_dim": "dp", "layer_list": "blocks", "schedule": "1f1b", "microbatches": 4, "virtual_stages": 1,
                  "predicted_bubble_fraction": 0.2,
                  "stages": [{"index": 0, "pp_rank": 0, "layers": ["blocks.0"], "params": ["wte.weight"], "plan": None},
                             {"index": 1, "pp_rank": 1, "layers": ["blocks.1"], "params": ["ln_f.weight"],
                              "plan": None}]},
        precision={"param_dtype": "float32", "compute_dtype": "bfloat16"},
        nodes_fallback=("root/cumsum#0",),
        fusions=(FusedKernel(kind="swiglu", root="blocks.*/mlp/mul#0", nodes=("blocks.*/mlp/silu#0", "blocks.*/mlp/mul#0"),
                             count=12, time_saved_s=1.5e-4),),
    )
    fields.update(changes)
    return Plan(**fields)


@pytest.fixture(scope="module")
def schema():
    jsonschema = pytest.importorskip("jsonschema")
    s = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(s)
    return jsonschema.Draft202012Validator(s)


def test_round_trip_text_and_file(tmp_path):
    plan = _plan()
    assert Plan.from_json(plan.to_json()) == plan
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert Plan.from_json(path) == plan and Plan.from_json(str(path)) == plan
    minimal = _plan(layers=(), checkpoint=(), offload=(), optimizer_sharding={}, gradient_sharding={}, pipeline=None,
                    nodes_fallback=(), fusions=())
    assert Plan.from_json(minimal.to_json()) == minimal


def test_node_sharding_parses():
    ns = _plan().node_shardings["blocks.*/attn/qkv/linear#0"]
    assert ns.input_sharding(1) == (Replicate(), Shard(0))
    assert ns.input_sharding(2) is None and ns.output_sharding(0)[1].dim == -1


def test_schema_ships_with_the_package():
    assert SCHEMA_PATH.name == "plan_schema.json" and SCHEMA_PATH.is_file()


def test_schema_accepts_plans(schema):
    schema.validate(_plan().to_dict())
    schema.validate(json.loads(_plan(pipeline=None, cluster=PRESETS["h100-sxm"]).to_json()))


def _errors(schema, d) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in schema.iter_errors(d)]


@pytest.mark.parametrize("path,value,where", [
    (("version",), 2, "version"),
    (("param_placements", QKV), ["R", "S(x)"], f"param_placements/{QKV}/1"),
    (("param_placements", QKV), ["R", "P(prod)"], f"param_placements/{QKV}/1"),
    (("node_shardings", "root/cross_entropy#0", "outputs"), [["Shard(0)", "R"]],
     "node_shardings/root/cross_entropy#0/outputs/0"),
    (("optimizer_sharding", QKV), ["S(0)", "ZeRO"], f"optimizer_sharding/{QKV}/1"),
    (("optimizer_offload",), "yes", "optimizer_offload"),
    (("gradient_sharding", QKV), ["S(0)", 0], f"gradient_sharding/{QKV}/1"),
    (("mesh", "shape"), [2, 0], "mesh/shape/1"),
    (("cluster", "host_bandwidth"), 0, "cluster/host_bandwidth"),
    (("cluster", "intra_node", "collectives", "all_reduce", "beta"), 0, "cluster/intra_node/collectives/all_reduce"),
    (("predicted", "peak_memory_bytes"), -1, "predicted/peak_memory_bytes"),
    (("solver", "optimal"), "yes", "solver/optimal"),
    (("fusions", 0, "count"), 0, "fusions/0/count"),
    (("fusions", 0, "nodes"), [], "fusions/0/nodes"),
    (("surprise",), 1, ""),
])
def test_schema_rejects(schema, path, value, where):
    d = _plan().to_dict()
    target = d
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    errors = _errors(schema, d)
    assert errors and any(e.startswith(where) for e in errors), errors


@pytest.mark.parametrize("field", ["version", "mesh", "cluster", "model", "param_placements", "node_shardings",
                                   "predicted", "solver"])
def test_schema_requires(schema, field):
    d = _plan().to_dict()
    del d[field]
    assert any(f"'{field}' is a required property" in e for e in _errors(schema, d))


# --- loading errors ---------------------------------------------------------------------------
def test_malformed_json_names_line(tmp_path):
    text = _plan().to_json()
    lines = text.splitlines()
    bad_line = next(i for i, line in enumerate(lines) if '"mesh"' in line) + 2  # the line after "mesh": {
    lines[bad_line - 1] = lines[bad_line - 1].rstrip(",") + ",,"
    broken = "\n".join(lines)
    with pytest.raises(PlanFormatError, match=rf"plan text is not valid JSON \(line {bad_line}, column \d+\)"):
        Plan.from_json(broken)
    path = tmp_path / "broken.json"
    path.write_text(broken)
    with pytest.raises(PlanFormatError, match=rf"plan file '{path}' is not valid JSON \(line {bad_line},"):
        Plan.from_json(path)


def test_missing_file(tmp_path):
    with pytest.raises(PlanFormatError, match="does not exist"):
        Plan.from_json(tmp_path / "none.json")


def _load(d: dict) -> Plan:
    return Plan.from_json(json.dumps(d))


@pytest.mark.parametrize("path,field", [
    (("mesh",), "plan.mesh"),
    (("mesh", "shape"), "plan.mesh.shape"),
    (("model", "fingerprint"), "plan.model.fingerprint"),
    (("param_placements",), "plan.param_placements"),
    (("node_shardings", "root/cross_entropy#0", "outputs"), "plan.node_shardings['root/cross_entropy#0'].outputs"),
    (("predicted", "step_time_s"), "plan.predicted.step_time_s"),
    (("version",), "plan.version"),
])
def test_missing_field_is_named(path, field):
    d = _plan().to_dict()
    target = d
    for k in path[:-1]:
        target = target[k]
    del target[path[-1]]
    with pytest.raises(PlanFormatError) as ei:
        _load(d)
    assert str(ei.value).startswith(f"{field}: missing field"), str(ei.value)


def test_missing_cluster_field_is_named():
    d = _plan().to_dict()
    del d["cluster"]["device"]
    with pytest.raises(AutoparError, match=r"plan\.cluster: missing field 'device'"):
        _load(d)


def test_optimizer_offload_must_be_a_bool():
    d = _plan().to_dict()
    assert d["optimizer_offload"] is True and _load(d).optimizer_offload is True
    d["optimizer_offload"] = "cpu"
    with pytest.raises(PlanFormatError, match=r"plan\.optimizer_offload: expected true or false, got 'cpu'"):
        _load(d)


def test_wrong_type_is_named():
    d = _plan().to_dict()
    d["mesh"] = [2, 2]
    with pytest.raises(PlanFormatError, match=r"plan\.mesh: expected dict, got list"):
        _load(d)


def test_wrong_placement_names_fqn():
    d = _plan().to_dict()
    d["param_placements"][QKV] = ["R", "Shard(0)"]
    with pytest.raises(PlanFormatError) as ei:
        _load(d)
    assert f"plan.param_placements['{QKV}'][1]" in str(ei.value) and "'Shard(0)'" in str(ei.value)


def test_zero_fields_are_checked():
    d = _plan().to_dict()
    d["gradient_sharding"][QKV] = ["R", "S(0)"]      # ZeRO-2 needs the optimizer_sharding entry's placements
    with pytest.raises(PlanFormatError, match=rf"plan\.gradient_sharding\['{QKV}'\].*same placements"):
        _load(d)
    d = _plan().to_dict()
    d["optimizer_sharding"][QKV] = ["S(0)"]
    with pytest.raises(PlanFormatError, match=rf"plan\.optimizer_sharding\['{QKV}'\]: 1 placements for a 2-D mesh"):
        _load(d)


def test_wrong_node_placement_and_count():
    d = _plan().to_dict()
    d["node_shardings"]["root/cross_entropy#0"]["inputs"] = [["S(0)", "Q"]]
    with pytest.raises(PlanFormatError, match=r"plan\.node_shardings\['root/cross_entropy#0'\]\.inputs\[0\]\[1\]"):
        _load(d)
    d = _plan().to_dict()
    d["param_placements"][QKV] = ["R"]
    with pytest.raises(PlanFormatError, match=rf"plan\.param_placements\['{QKV}'\]: 1 placements for a 2-D mesh"):
        _load(d)


@pytest.mark.parametrize("version", [2, 0])
def test_unknown_version(version):
    d = _plan().to_dict()
    d["version"] = version
    with pytest.raises(PlanFormatError, match=rf"plan\.version: unknown plan version {version}.*reads version 1"):
        _load(d)


def test_not_an_object():
    with pytest.raises(PlanFormatError, match="expected a JSON object"):
        Plan.from_dict([1])


def test_dict_is_a_copy():
    plan = _plan()
    d = plan.to_dict()
    before = copy.deepcopy(d)
    d["param_placements"][QKV][0] = "S(1)"
    assert plan.to_dict() == before


@pytest.mark.parametrize("change,where", [
    ({"count": 0}, r"plan\.fusions\[0\]\.count: must be >= 1"),
    ({"nodes": []}, r"plan\.fusions\[0\]\.nodes: expected a non-empty list"),
    ({"kind": None}, r"plan\.fusions\[0\]\.kind: expected str"),
])
def test_bad_fusion_record_is_named(change, where):
    d = _plan().to_dict()
    d["fusions"][0].update(change)
    with pytest.raises(PlanFormatError, match=where):
        _load(d)


def test_plan_without_fusions_field_loads_unfused():
    d = _plan().to_dict()
    del d["fusions"]
    assert _load(d).fusions == ()
