"""Inter-op planner (autopar.solver.pipeline, autopar.frontend.pipeline): DP partitions with known answers, the
predicted bubble against the analytic (p-1)/(m+p-1), schedule choice under memory, the 2-node known
answer (pipeline across a slow inter-node link with TP inside the nodes, ahead of DP/ZeRO or TP across
them), fix= / prefer= with stages, bad input, and the plan JSON."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import autopar
from autopar.cluster.profile import PRESETS, LinkSpec
from autopar.core.errors import ConfigError, MeshError
from autopar.core.options import PipelineOptions
from autopar.core.plan import SCHEMA_PATH, Plan
from autopar.models import build_model, load_example_module
from autopar.solver.pipeline import UnitCost, UnitCosts, partition, search
from autopar.tools.report import render


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
    cfg = PipelineOptions(microbatches=8)
    best = search(lambda m, k: u, batch=8, p=2, dp=1, config=cfg, budget=None, link=None)
    assert best.schedule in ("interleaved",)       # no memory limit: the smallest bubble wins
    tight = search(lambda m, k: u, batch=8, p=2, dp=1, config=dataclasses.replace(cfg, virtual_stages=None),
                   budget=2 * 10.0 * 2, link=None)   # 2 blocks x 10 B x 2 micro-batches in flight
    assert tight.schedule == "1f1b"
    # a micro-batch of 16/m samples costs 1/m of the batch: more micro-batches, smaller bubble, faster step
    auto = search(lambda m, k: _units(4, block=16.0 / m), batch=16, p=2, dp=1, config=PipelineOptions(schedule="1f1b"),
                  budget=None, link=None)
    assert auto.microbatches == 16 and auto.step_time_s == pytest.approx((16 + 1) * 2 * 1.0)


def test_gradient_accumulation_gives_a_best_microbatch_count():
    # stage of 2 blocks: R = 32/m per micro-batch, G = 0.8 s to accumulate its gradients per extra micro-batch:
    # T(m) = m R + (m - 1) G + R (bubble, p = 2) = 48.8, 42.4, 41.6, 46.0 for m = 2, 4, 8, 16
    def units(m, k):
        u = _units(4, block=16.0 / m)
        return dataclasses.replace(u, block=dataclasses.replace(u.block, accum_s=0.4))
    best = search(units, batch=16, p=2, dp=1, config=PipelineOptions(schedule="1f1b"), budget=None, link=None)
    assert best.microbatches == 8
    assert best.step_time_s == pytest.approx(32 + 4 + 7 * 0.8)
    assert best.accum_s == pytest.approx(7 * 0.8) and best.bubble_s == pytest.approx(4.0)
    # without the accumulation term the most micro-batches win
    flat = search(lambda m, k: _units(4, block=16.0 / m), batch=16, p=2, dp=1,
                  config=PipelineOptions(schedule="1f1b"), budget=None, link=None)
    assert flat.microbatches == 16


def test_unit_costs_charge_gradient_accumulation_by_gradient_bytes():
    from autopar.core.capture import capture
    from autopar.core.mesh import MeshSpec
    from autopar.solver.pipeline import unit_costs

    gpt = load_example_module("gpt")
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, max_seq_len=16))
    idx = torch.randint(0, 64, (2, 16))
    prof = PRESETS["cpu-gloo"]
    mesh = MeshSpec.make((1,), ("dp",))
    u = unit_costs(capture(model, {"idx": idx, "labels": idx}), "blocks", mesh, prof, prof.dim_links(mesh))
    block = [p for n, p in model.named_parameters() if n.startswith("blocks.0.")]
    dev = prof.device
    want = sum(dev.op_overhead_s + 3 * p.numel() * 4 / (dev.memory_bandwidth * dev.max_memory_efficiency)
               for p in block)
    assert u.block.accum_s == pytest.approx(want, rel=1e-6)


@pytest.mark.slow
def test_two_nodes_on_ethernet_pipeline_crosses_nodes_tp_inside():
    """Known answer over the whole layout space of 2 nodes x 8 H100: pipeline across the nodes with TP
    inside each, ahead of data parallelism / ZeRO across the nodes and of TP across them.

    The scenario: CodeLlama-34B's shape (48 blocks, d_model 8192, 64 heads, 8 KV heads, d_ff 22016,
    vocabulary 32000: 33.7B parameters) trained in fp32 with AdamW (16 bytes per parameter: 67 GB per
    GPU under 8-way TP, beyond one node's 80 GB GPUs with activations), batch 8 x 2048 tokens, on two
    DGX-class nodes joined by one 100 GbE NIC each instead of InfiniBand (12.5 GB/s per node shared by
    its 8 GPUs: 1.56 GB/s per GPU, 1.25 GB/s at 80 %). Per rank and step over that link:

    * pipeline (pp=2 across, tp=8 inside): the boundary activation, 8 x 2048 x 8192 x 4 B = 537 MB
      forward and its gradient back, 0.86 s, plus the bubble (p-1)/(m+p-1) = 1/9 of ~5 s at m = 8;
    * ZeRO-3 across (dp=2 x tp=8, batch split): all-gather and reduce-scatter of the 16.9 GB a tp rank
      holds, (n-1)/n each: 16.9 GB, 13.5 s (and 8.4 GB more for recomputed blocks); a DP gradient
      all-reduce of replicated weights moves as much; the ILP on (dp, tp) finds it cheaper to leave dp
      idle for the blocks (both nodes compute the same step), i.e. one node's compute time;
    * TP across all 16 GPUs: every block's activation all-reduces cross the slow link.
    """
    from autopar.frontend.layouts import plan_layouts

    ll = load_example_module("llama")
    cfg = ll.LlamaConfig(vocab_size=32000, max_seq_len=2048, n_layer=48, n_head=64, n_kv_head=8, d_model=8192,
                         d_ff=22016)
    with torch.device("meta"):
        model = ll.Llama(cfg)
    idx = torch.empty(8, 2048, dtype=torch.long, device="meta")
    eth = dataclasses.replace(PRESETS["h100-sxm"], name="h100-100gbe",
                              inter_node=LinkSpec.uniform("100gbe", alpha=50e-6, bandwidth=0.8 * 12.5e9 / 8))
    layouts = [((2, 8), ("pp", "tp")), ((2, 8), ("dp", "tp")), ((16,), ("tp",)), ((8,), ("tp",))]
    ranked = plan_layouts(model, {"idx": idx, "labels": idx}, layouts, cluster=eth, nodes=2,
                          pipeline={"microbatches": 8}, time_limit=600)
    times = {(r[0].shape, r[0].dim_names): r for r in ranked}
    best = ranked[0]
    assert (best[0].shape, best[0].dim_names) == ((2, 8), ("pp", "tp")), ranked
    assert eth.dim_links(best[0], 2) == (eth.inter_node, eth.intra_node)   # pp crosses the nodes, tp does not
    dp_tp = times[((2, 8), ("dp", "tp"))]
    assert dp_tp[1] is not None and "optimal" in dp_tp[2] and "not proven" not in dp_tp[2], dp_tp
    assert dp_tp[1] > best[1]                                       # the best (dp, tp) plan, proven optimal
    tp16 = times[((16,), ("tp",))]
    assert tp16[1] is None or tp16[1] > dp_tp[1]
    one_node = times[((8,), ("tp",))]
    # TP alone on one node fits only by moving activations / optimizer states to the host, if at all
    assert one_node[1] is None or one_node[1] > best[1], one_node
    # the analytic traffic of the docstring: ZeRO-3's parameter volume dwarfs the pipeline's activations
    psi_tp_rank = 4 * sum(p.numel() for p in model.parameters()) / 8
    boundary = 8 * 2048 * cfg.d_model * 4
    link_bw = 1 / eth.inter_node.collectives["all_gather"].beta
    assert 2 * (1 / 2) * psi_tp_rank / link_bw > 10 * (2 * boundary / link_bw)


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


def test_pp_only_mesh_with_a_measured_profile(tiny):
    # a profile measured on the (2,) mesh (one link per mesh dim) plans a pp-only pipeline: the units are costed
    # on one device, the stage boundary's send/recv on the measured link, its per-call sync included
    model, inputs = tiny
    gloo = PRESETS["cpu-gloo"]
    link = dataclasses.replace(gloo.intra_node, sync_s=3e-3)
    measured = dataclasses.replace(gloo, name="measured", mesh_shape=(2,), mesh_dim_links=(link,))
    cfg = {"schedule": "gpipe", "microbatches": 2}
    plan = autopar.plan(model, inputs, mesh_shape=(2,), mesh_dim_names=("pp",), cluster=measured, pipeline=cfg)
    base = autopar.plan(model, inputs, mesh_shape=(2,), mesh_dim_names=("pp",), cluster="cpu-gloo", pipeline=cfg)
    # stage 0 sends one activation and receives one gradient per micro-batch: 2 calls, each with its sync
    stage, base_stage = plan.pipeline["stages"], base.pipeline["stages"]
    assert stage[0]["time_s"] - base_stage[0]["time_s"] == pytest.approx(2 * 3e-3)
    assert stage[1]["time_s"] == pytest.approx(base_stage[1]["time_s"])   # the last stage sends nothing


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
    # T = max_r (m R_r + (m - 1) G_r) + (p - 1) max_r R_r with m = p = 2: the bubble is one slowest stage, and
    # the second micro-batch's gradients are added into the first's (G > 0)
    stage_t = [st["time_s"] for st in p["stages"]]
    step, bubble = plan.predicted.step_time_s, plan.predicted.time_breakdown["bubble_s"]
    assert bubble == pytest.approx(max(stage_t)) and p["predicted_accum_s"] > 0
    assert any(step == pytest.approx(2 * t + p["predicted_accum_s"] + bubble) for t in stage_t)
    assert p["predicted_bubble_fraction"] == pytest.approx(bubble / step) and p["predicted_bubble_fraction"] < 1 / 3
    assert Plan.from_json(plan.to_json()) == plan
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(json.loads(plan.to_json()))
    table = render(plan)
    assert f"schedule gpipe, 2 micro-batches, predicted bubble {100 * p['predicted_bubble_fraction']:.1f}%" in table
    assert "blocks.1" in table.split("parameters")[0]
    broken = json.loads(plan.to_json())
    broken["pipeline"]["stages"][1]["pp_rank"] = 0
    with pytest.raises(autopar.PlanFormatError, match=r"plan.pipeline.stages\[1\]"):
        Plan.from_dict(broken)


# --- fix= / prefer= with stages ------------------------------------------------------------------------

def test_fix_and_prefer_apply_to_every_stage(tiny):
    """Placements are written for the whole mesh (R on pp); keys are the model's, shared by identical
    stages (``blocks.*/...``): the pinned weight is column-split on tp in both stages."""
    model, inputs = tiny
    plan = autopar.plan(model, inputs, mesh_shape=(2, 2), mesh_dim_names=("pp", "tp"), cluster="cpu-gloo",
                        pipeline={"schedule": "gpipe", "microbatches": 2},
                        fix={"param:blocks.*.mlp.fc.weight": ["R", "S(0)"]},
                        prefer={"blocks.*/attn.qkv/linear#0": ["R", "S(2)"]})
    for i in range(2):
        assert plan.param_placements[f"blocks.{i}.mlp.fc.weight"] == ("R", "S(0)")
    for st in plan.pipeline["stages"]:
        shardings = st["plan"]["node_shardings"]
        assert shardings["param:blocks.*.mlp.fc.weight"]["outputs"] == [["S(0)"]]
        assert shardings["blocks.*/attn.qkv/linear#0"]["outputs"] == [["S(2)"]]
    # without the pins the cpu-gloo plan of this tiny model keeps everything replicated
    free = autopar.plan(model, inputs, mesh_shape=(2, 2), mesh_dim_names=("pp", "tp"), cluster="cpu-gloo",
                        pipeline={"schedule": "gpipe", "microbatches": 2})
    assert free.param_placements["blocks.0.mlp.fc.weight"] == ("R", "R")


def test_fix_with_stages_bad_input(tiny):
    model, inputs = tiny
    kw = {"mesh_shape": (2, 2), "mesh_dim_names": ("pp", "tp"), "cluster": "cpu-gloo",
              "pipeline": {"schedule": "gpipe", "microbatches": 2}}
    with pytest.raises(ConfigError, match="places the 'pp' mesh dim as S\\(0\\).*write 'R' there"):
        autopar.plan(model, inputs, fix={"param:wte.weight": ["S(0)", "R"]}, **kw)
    with pytest.raises(autopar.AutoparError, match="has 1 placements for the mesh \\['pp', 'tp'\\]"):
        autopar.plan(model, inputs, fix={"param:wte.weight": ["R"]}, **kw)
    with pytest.raises(ConfigError, match="\\['param:nothing.*'\\] match no input, parameter or graph key of any "
                                          "pipeline stage"):
        autopar.plan(model, inputs, fix={"param:nothing.*": ["R", "R"]}, **kw)


def test_per_op_overhead_gives_the_step_time_an_interior_minimum_over_microbatches():
    # every micro-batch pays each op's fixed host overhead again while the bubble shrinks with m: for stage
    # work W split into m micro-batches of O overhead each, T(m) ~ m O + W + (p - 1)(O + W/m) is least at
    # m* = sqrt((p - 1) W / O), inside the range when the overhead is large; without it the most m win.
    # A synthetic device: slow flat-efficiency matmuls, free memory traffic (no accumulation cost) and a
    # free link, so the overhead is the only thing that grows with m.
    gpt = load_example_module("gpt")
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, d_model=64, n_head=2, vocab_size=64, max_seq_len=32))
    idx = torch.randint(0, 64, (32, 32))
    inputs = {"idx": idx, "labels": idx}
    gloo = PRESETS["cpu-gloo"]
    dev = dataclasses.replace(gloo.device, peak_flops={"float32": 1e9}, memory_bandwidth=1e15,
                              matmul_half_efficiency_flops=0.0)
    free_link = LinkSpec.uniform("free", alpha=0.0, bandwidth=1e15)

    def times(overhead):
        prof = dataclasses.replace(gloo, device=dataclasses.replace(dev, op_overhead_s=overhead),
                                   intra_node=free_link, inter_node=free_link)
        return {m: autopar.plan(model, inputs, mesh_shape=(2,), mesh_dim_names=("pp",), cluster=prof,
                                pipeline={"schedule": "gpipe", "microbatches": m}).predicted.step_time_s
                for m in (2, 4, 8, 16, 32)}
    heavy = times(1e-4)
    best = min(heavy, key=heavy.get)
    assert best not in (2, 32), heavy
    assert heavy[32] > heavy[best] * 1.1 and heavy[2] > heavy[best] * 1.1, heavy
    free = times(0.0)
    assert min(free, key=free.get) == 32, free
    assert all(free[a] > free[b] for a, b in zip((2, 4, 8, 16), (4, 8, 16, 32))), free
