"""Inter-op planner (autopar.solver.pipeline, autopar.pipeline): DP partitions with known answers, the
predicted bubble against the analytic (p-1)/(m+p-1), schedule choice under memory, the 2-node known
answer (pipeline across the slow inter-node link, TP inside nodes), bad input, and the plan JSON."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import autopar
from autopar.errors import ConfigError, MeshError
from autopar.models import build_model, load_example_module
from autopar.plan import SCHEMA_PATH, Plan
from autopar.profile import PRESETS, LinkSpec
from autopar.report import render
from autopar.solver.pipeline import PipelineConfig, UnitCost, UnitCosts, partition, search


def _units(n: int, block: float = 1.0, prefix: float = 0.0, suffix: float = 0.0, w: float = 0.0,
           a: float = 0.0) -> UnitCosts:
    return UnitCosts(prefix=UnitCost(time_s=prefix, static_bytes=0.0, act_bytes=0.0),
                     block=UnitCost(time_s=block, static_bytes=w, act_bytes=a),
                     suffix=UnitCost(time_s=suffix, static_bytes=0.0, act_bytes=0.0), num_blocks=n,
                     boundary_bytes=0.0)


def test_dp_balances_uniform_blocks():
    part = partition(_units(8), p=4, v=1, m=4, schedule="1f1b", budget=None, link=None)
    assert part.stages == ((0, 1), (2, 3), (4, 5), (6, 7))


def test_dp_gives_the_embedding_stage_fewer_blocks():
    # prefix (embeddings) costs 2 blocks: stage 0 = prefix + 2 blocks, stage 1 = 4 blocks (4 s each)
    part = partition(_units(6, prefix=2.0), p=2, v=1, m=4, schedule="gpipe", budget=None, link=None)
    assert part.stages == ((0, 1), (2, 3, 4, 5))
    assert part.stage_time_s == (4.0, 4.0)
    # and a heavy head pushes blocks the other way
    part = partition(_units(6, suffix=2.0), p=2, v=1, m=4, schedule="gpipe", budget=None, link=None)
    assert part.stages == ((0, 1, 2, 3), (4, 5))


def test_dp_respects_stage_memory():
    # 6 blocks of 10 bytes, budget 30 on 3 stages: only 2+2+2 fits although time does not care
    part = partition(_units(6, w=10.0), p=3, v=1, m=1, schedule="gpipe", budget=30.0, link=None)
    assert [len(s) for s in part.stages] == [2, 2, 2]
    assert partition(_units(6, w=10.0), p=2, v=1, m=1, schedule="gpipe", budget=25.0, link=None) is None


@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (4, 4), (4, 8), (4, 16)])
def test_bubble_matches_analytic(p, m):
    for sched in ("gpipe", "1f1b"):
        part = partition(_units(8), p=p, v=1, m=m, schedule=sched, budget=None, link=None)
        assert part.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    part = partition(_units(8), p=p, v=2, m=m, schedule="interleaved", budget=None, link=None)
    assert part.bubble_fraction == pytest.approx((p - 1) / (2 * m + p - 1))


def test_more_microbatches_less_bubble_and_1f1b_when_memory_is_short():
    # activations of 10 bytes per block per micro-batch; GPipe holds all 8 micro-batches, 1F1B at most p
    u = _units(4, a=10.0)
    cfg = PipelineConfig(microbatches=8)
    best = search(lambda m, k: u, batch=8, p=2, dp=1, config=cfg, budget=None, link=None)
    assert best.schedule in ("interleaved",)       # no memory limit: the smallest bubble wins
    tight = search(lambda m, k: u, batch=8, p=2, dp=1, config=dataclasses.replace(cfg, virtual_stages=None),
                   budget=2 * 10.0 * 2, link=None)   # 2 blocks x 10 B x 2 micro-batches in flight
    assert tight.schedule == "1f1b"
    # a micro-batch of 16/m samples costs 1/m of the batch: more micro-batches, smaller bubble, faster step
    auto = search(lambda m, k: _units(4, block=16.0 / m), batch=16, p=2, dp=1, config=PipelineConfig(schedule="1f1b"),
                  budget=None, link=None)
    assert auto.microbatches == 16 and auto.step_time_s == pytest.approx((16 + 1) * 2 * 1.0)


def test_two_node_preset_pipelines_across_nodes_and_tp_inside():
    """400M-parameter Llama, 2 nodes x 8 H100 with a slow (2 GB/s) inter-node link, 1 GB per device:
    8 devices with TP alone fit only by offloading activations and optimizer states to the host (the ILP
    does so on h100-sxm), slower than the pipeline; of the 16-device layouts the planner predicts the pipeline
    across the nodes (pp outer) with TP inside each node fastest, ahead of TP across the nodes with the
    pipeline inside a node, and of TP over all 16 devices."""
    from autopar.pipeline import plan_layouts

    ll = load_example_module("llama")
    with torch.device("meta"):
        model = ll.Llama(ll.LlamaConfig(vocab_size=32000, max_seq_len=1024, n_layer=4, n_head=8, n_kv_head=8,
                                        d_model=2048, d_ff=8192))
    idx = torch.empty(8, 1024, dtype=torch.long, device="meta")
    slow = dataclasses.replace(PRESETS["h100-sxm"], name="h100-slow-inter-node",
                               inter_node=LinkSpec.uniform("slow", alpha=50e-6, bandwidth=2e9))
    ranked = plan_layouts(model, {"idx": idx, "labels": idx},
                          [((2, 8), ("pp", "tp")), ((8, 2), ("tp", "pp")), ((16,), ("tp",)), ((8,), ("tp",))],
                          cluster=slow, memory_budget="1GB", nodes=2, pipeline={"microbatches": 8})
    best, *rest = ranked
    assert (best[0].shape, best[0].dim_names) == ((2, 8), ("pp", "tp")) and best[1] is not None
    assert slow.dim_links(best[0], 2) == (slow.inter_node, slow.intra_node)   # pp crosses nodes, tp does not
    assert all(r[1] is None or r[1] > best[1] for r in rest)
    one_node = next(r for r in ranked if r[0].shape == (8,))
    assert one_node[1] is not None and one_node[1] > best[1]


# --- bad input -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return build_model("gpt-tiny", batch=4, seq=8, device="meta")


def test_more_stages_than_layers(tiny):
    model, inputs = tiny
    with pytest.raises(ConfigError, match="4 pipeline stages but the model has only 2 layers"):
        autopar.plan(model, inputs, mesh_shape=(2,), mesh_dim_names=("pp",), pipeline={"stages": 4})
    with pytest.raises(ConfigError, match="only 2 layers"):
        autopar.plan(model, inputs, mesh_shape=(4,), mesh_dim_names=("pp",))


def test_microbatches_must_divide_the_batch(tiny):
    model, inputs = tiny
    with pytest.raises(ConfigError, match="3 micro-batches do not divide the batch of 4"):
        autopar.plan(model, inputs, mesh_shape=(2,), mesh_dim_names=("pp",), pipeline={"microbatches": 3})


def test_pp_dim_must_match_the_mesh(tiny):
    model, inputs = tiny
    with pytest.raises(MeshError, match="stages=3 does not match the mesh's 'pp' dim of size 2"):
        autopar.plan(model, inputs, mesh_shape=(2,), mesh_dim_names=("pp",), pipeline={"stages": 3})
    with pytest.raises(MeshError, match="needs a mesh dim named 'pp'"):
        autopar.plan(model, inputs, mesh_shape=(2,), mesh_dim_names=("dp",), pipeline="auto")
    with pytest.raises(ConfigError, match="unknown pipeline option"):
        autopar.plan(model, inputs, mesh_shape=(2,), mesh_dim_names=("pp",), pipeline={"stage": 2})


# --- the plan ----------------------------------------------------------------------------------------

def test_pipelined_plan_json_schema_and_table(tiny):
    model, inputs = tiny
    plan = autopar.plan(model, inputs, mesh_shape=(2,), mesh_dim_names=("pp",), cluster="cpu-gloo",
                        pipeline={"schedule": "gpipe", "microbatches": 2})
    p = plan.pipeline
    assert [st["layers"] for st in p["stages"]] == [["blocks.0"], ["blocks.1"]]
    assert "wte.weight" in p["stages"][0]["params"] and "ln_f.weight" in p["stages"][1]["params"]
    assert p["predicted_bubble_fraction"] == pytest.approx(1 / 3)
    assert plan.predicted.time_breakdown["bubble_s"] > 0
    assert Plan.from_json(plan.to_json()) == plan
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(json.loads(plan.to_json()))
    table = render(plan)
    assert "schedule gpipe, 2 micro-batches, predicted bubble 33.3%" in table
    assert "blocks.1" in table.split("parameters")[0]
    broken = json.loads(plan.to_json())
    broken["pipeline"]["stages"][1]["pp_rank"] = 0
    with pytest.raises(autopar.PlanFormatError, match=r"plan.pipeline.stages\[1\]"):
        Plan.from_dict(broken)
