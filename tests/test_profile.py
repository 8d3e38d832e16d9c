"""ClusterProfile: presets through JSON, which link each mesh dim uses, and every loading error."""
import json
from dataclasses import replace

import pytest

from autopar.core.errors import AutoparError, ClusterProfileError
from autopar.core.mesh import MeshSpec
from autopar.cluster.profile import (COLLECTIVES, PRESETS, AlphaBeta, ClusterProfile, LinkSpec, load_cluster,
                             with_capacity)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trip_through_json(name, tmp_path):
    p = PRESETS[name]
    assert ClusterProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    path = tmp_path / f"{name}.json"
    p.to_json(path)
    assert load_cluster(str(path)) == p
    assert load_cluster(path) == p
    assert json.loads(path.read_text())["version"] == 1


def test_preset_lookup_and_profile_passthrough():
    assert load_cluster("h100-sxm") is PRESETS["h100-sxm"]
    assert load_cluster(PRESETS["cpu-gloo"]) is PRESETS["cpu-gloo"]


def test_presets_cite_sources():
    for p in PRESETS.values():
        assert p.sources.get("device"), p.name
        assert set(p.intra_node.collectives) == set(COLLECTIVES)


def test_h100_numbers():
    p = PRESETS["h100-sxm"]
    assert p.device.flops_for("bfloat16") == 989.5e12
    assert p.device.flops_for("int8") == p.device.peak_flops["float32"]  # unknown dtype: the fp32 peak
    assert p.device.memory_capacity == 80 * 10**9
    assert p.intra_node.collectives["all_reduce"].beta == pytest.approx(1 / (0.8 * 450e9))


def _names(links):
    return tuple(link.name for link in links)


def test_dim_links_8x8_h100():
    p = PRESETS["h100-sxm"]
    assert _names(p.dim_links(MeshSpec.make("8x8"))) == ("infiniband", "nvlink")
    assert _names(p.dim_links(MeshSpec.make("8"))) == ("nvlink",)
    assert _names(p.dim_links(MeshSpec.make("16"))) == ("infiniband",)
    assert _names(p.dim_links(MeshSpec.make("2x2x2"))) == ("nvlink",) * 3
    # a dim crosses nodes once its span (its size times the dims inside it) exceeds 8
    assert _names(p.dim_links(MeshSpec.make("8x2x4"))) == ("infiniband", "nvlink", "nvlink")
    assert _names(p.dim_links(MeshSpec.make("4x4x4"))) == ("infiniband", "infiniband", "nvlink")


def test_dim_links_nodes():
    p = PRESETS["h100-sxm"]
    # 8 devices over 2 nodes: 4 per node, so the inner dim of 4 stays inside, the outer crosses
    assert _names(p.dim_links(MeshSpec.make("2x4"), nodes=2)) == ("infiniband", "nvlink")
    assert _names(p.dim_links(MeshSpec.make("2x4"), nodes=1)) == ("nvlink", "nvlink")
    assert _names(p.dim_links(MeshSpec.make("8x8"), nodes=8)) == ("infiniband", "nvlink")
    with pytest.raises(ClusterProfileError, match="does not split over 3 nodes"):
        p.dim_links(MeshSpec.make("2x4"), nodes=3)
    with pytest.raises(ClusterProfileError, match="--nodes must be >= 1"):
        p.dim_links(MeshSpec.make("2x4"), nodes=0)
    with pytest.raises(ClusterProfileError, match="use --nodes 2"):
        p.dim_links(MeshSpec.make("16"), nodes=1)


def test_measured_dim_links():
    ib, nv = PRESETS["h100-sxm"].inter_node, PRESETS["h100-sxm"].intra_node
    p = replace(PRESETS["h100-sxm"], name="measured", mesh_shape=(2, 4), mesh_dim_links=(ib, nv))
    assert p.dim_links(MeshSpec.make("2x4")) == (ib, nv)
    again = ClusterProfile.from_dict(json.loads(json.dumps(p.to_dict())))
    assert again == p and again.mesh_shape == (2, 4)
    with pytest.raises(ClusterProfileError, match=r"measured on mesh \(2, 4\) but the plan is for \(4, 2\)") as ei:
        p.dim_links(MeshSpec.make("4x2"))
    assert "autopar profile --mesh 4x2" in str(ei.value)


def test_link_sync_round_trips_and_defaults_to_zero():
    from autopar.solver.cost import collective_time

    nv = PRESETS["h100-sxm"].intra_node
    assert nv.sync_s == 0.0
    synced = replace(nv, sync_s=2e-3)
    p = replace(PRESETS["h100-sxm"], name="measured", mesh_shape=(2,), mesh_dim_links=(synced,))
    d = json.loads(json.dumps(p.to_dict()))
    assert ClusterProfile.from_dict(d).mesh_dim_links[0].sync_s == 2e-3
    del d["mesh_dim_links"][0]["sync_s"]   # a profile written before the field existed
    assert ClusterProfile.from_dict(d).mesh_dim_links[0].sync_s == 0.0
    # every collective call pays it once, whatever its size
    for nbytes in (0.5, 1e6):
        assert collective_time("all_gather", nbytes, 2, synced) - collective_time("all_gather", nbytes, 2, nv) \
            == pytest.approx(2e-3)
    with pytest.raises(ClusterProfileError, match="sync_s"):
        replace(nv, sync_s=-1.0)


def test_with_capacity():
    p = with_capacity(PRESETS["h100-sxm"], 40 * 10**9)
    assert p.device.memory_capacity == 40 * 10**9 and PRESETS["h100-sxm"].device.memory_capacity == 80 * 10**9


# --- errors -----------------------------------------------------------------------------------
def test_unknown_preset():
    with pytest.raises(ClusterProfileError, match=r"unknown cluster preset 'h900'.*h100-sxm") as ei:
        load_cluster("h900")
    assert isinstance(ei.value, AutoparError)


def test_missing_file(tmp_path):
    with pytest.raises(ClusterProfileError, match="does not exist.*autopar profile --out"):
        load_cluster(str(tmp_path / "nope.json"))


def test_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"name": "x",\n "device": }')
    with pytest.raises(ClusterProfileError, match="is not valid JSON.*line 2"):
        load_cluster(str(path))


def _dict(**changes):
    d = json.loads(json.dumps(PRESETS["cpu-gloo"].to_dict()))
    d.update(changes)
    return d


@pytest.mark.parametrize("field", ["name", "device", "gpus_per_node", "intra_node", "inter_node", "host_bandwidth"])
def test_missing_top_level_field(field, tmp_path):
    d = _dict()
    del d[field]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ClusterProfileError, match=f"missing field '{field}'") as ei:
        load_cluster(str(path))
    assert str(path) in str(ei.value)


def test_missing_nested_fields():
    d = _dict()
    del d["device"]["memory_bandwidth"]
    with pytest.raises(ClusterProfileError, match="malformed field.*memory_bandwidth"):
        ClusterProfile.from_dict(d)
    d = _dict()
    del d["intra_node"]["collectives"]["all_gather"]
    with pytest.raises(ClusterProfileError, match="lacks alpha/beta for \\['all_gather'\\]"):
        ClusterProfile.from_dict(d)
    d = _dict()
    del d["inter_node"]["collectives"]["all_reduce"]["beta"]
    with pytest.raises(ClusterProfileError, match=r"profile\.inter_node\.collectives\.all_reduce needs 'alpha' and"):
        ClusterProfile.from_dict(d)
    d = _dict()
    del d["intra_node"]["collectives"]
    with pytest.raises(ClusterProfileError, match=r"profile\.intra_node: missing field 'collectives'"):
        ClusterProfile.from_dict(d)


def test_not_an_object_and_version():
    with pytest.raises(ClusterProfileError, match="expected a JSON object"):
        ClusterProfile.from_dict([1, 2])
    with pytest.raises(ClusterProfileError, match="unknown profile version 2"):
        ClusterProfile.from_dict(_dict(version=2))


@pytest.mark.parametrize("bw", [0, -1.0, "fast"])
def test_non_positive_host_bandwidth(bw):
    with pytest.raises(ClusterProfileError, match="host_bandwidth must be a positive number"):
        ClusterProfile.from_dict(_dict(host_bandwidth=bw))


def test_non_positive_link_and_device_numbers():
    d = _dict()
    d["intra_node"]["collectives"]["all_reduce"]["beta"] = 0
    with pytest.raises(ClusterProfileError, match="beta must be a positive s/byte"):
        ClusterProfile.from_dict(d)
    d = _dict()
    d["intra_node"]["collectives"]["all_reduce"]["alpha"] = -1e-6
    with pytest.raises(ClusterProfileError, match="alpha must be a finite latency"):
        ClusterProfile.from_dict(d)
    d = _dict()
    d["device"]["memory_bandwidth"] = -5
    with pytest.raises(ClusterProfileError, match="device.memory_bandwidth must be positive"):
        ClusterProfile.from_dict(d)
    d = _dict()
    d["device"]["peak_flops"] = {"float32": 0}
    with pytest.raises(ClusterProfileError, match=r"peak_flops\['float32'\] must be positive"):
        ClusterProfile.from_dict(d)
    d = _dict()
    d["device"]["peak_flops"] = {"bfloat16": 1e12}
    with pytest.raises(ClusterProfileError, match="needs at least a 'float32'"):
        ClusterProfile.from_dict(d)
    with pytest.raises(ClusterProfileError, match="positive bandwidth"):
        LinkSpec.uniform("x", alpha=0, bandwidth=float("inf"))
    with pytest.raises(ClusterProfileError):
        AlphaBeta(alpha=float("nan"), beta=1e-9)


def test_profile_for_another_mesh_shape_from_file(tmp_path):
    ib, nv = PRESETS["h100-sxm"].inter_node, PRESETS["h100-sxm"].intra_node
    replace(PRESETS["h100-sxm"], name="m", mesh_shape=(8, 8), mesh_dim_links=(ib, nv)).to_json(tmp_path / "m.json")
    p = load_cluster(str(tmp_path / "m.json"))
    assert _names(p.dim_links(MeshSpec.make("8x8"))) == ("infiniband", "nvlink")
    with pytest.raises(ClusterProfileError, match="was measured on mesh"):
        p.dim_links(MeshSpec.make("4x16"))


def test_checkpoint_surcharges_round_trip_and_default_to_zero():
    dev = replace(PRESETS["h100-sxm"].device, selective_op_overhead_s=3e-4, recompute_op_overhead_s=9e-5)
    p = replace(PRESETS["h100-sxm"], name="measured", device=dev)
    d = json.loads(json.dumps(p.to_dict()))
    back = ClusterProfile.from_dict(d).device
    assert (back.selective_op_overhead_s, back.recompute_op_overhead_s) == (3e-4, 9e-5)
    for k in ("selective_op_overhead_s", "recompute_op_overhead_s"):   # a profile written before the fields
        del d["device"][k]
    old = ClusterProfile.from_dict(d).device
    assert old.selective_op_overhead_s == 0.0 and old.recompute_op_overhead_s == 0.0
    d["device"]["selective_op_overhead_s"] = -1e-6
    with pytest.raises(ClusterProfileError, match="selective_op_overhead_s must be a finite time"):
        ClusterProfile.from_dict(d)
