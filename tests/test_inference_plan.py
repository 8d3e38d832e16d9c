"""Inference plans: ``autopar.plan(..., training=False)`` prices the forward alone.

Checks: the options refuse training-only decisions (and pipeline stages) in inference mode; the inference ILP
has only the forward's terms (no gradient, optimizer, kept-activation, bucket, recompute or ZeRO term, one
memory row: parameters + live activations + KV cache); ``price_plan`` equals its objective term by term for the
solver's plan and for a pinned Megatron plan (forward compute and forward resharding only), and
``planned_collectives`` lists forward collectives only; the declared KV cache is charged by the attention's head
split; the live activations are the forward's peak (a hand-computed MLP); the plan JSON records the mode;
``apply`` of an inference plan on (2,) gloo builds a module without gradients or reducer whose logits equal
one device's; and on h100-sxm a LLaMA-8B-shaped decode step on (8,) gets Megatron heads/MLP sharding with the
KV cache sharded by kv heads, the planner's own choice.
"""
from __future__ import annotations

import json

import pytest
import torch

import autopar
from autopar.cluster.profile import load_cluster
from autopar.core.capture import capture
from autopar.core.errors import ConfigError
from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.solver import ilp
from autopar.solver import runtime_model as RM
from autopar.solver.categories import MemCategory, TimeCategory

transformers = pytest.importorskip("transformers")

MEGATRON = {"model.layers.*.self_attn.[qkv]_proj.weight": ["S(0)"], "model.layers.*.self_attn.o_proj.weight": ["S(1)"],
            "model.layers.*.mlp.gate_proj.weight": ["S(0)"], "model.layers.*.mlp.up_proj.weight": ["S(0)"],
            "model.layers.*.mlp.down_proj.weight": ["S(1)"]}


def tiny_llama(layers: int = 2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(batch=4, tokens=1):
    return {"input_ids": torch.zeros(batch, tokens, dtype=torch.long)}


def test_options_refuse_training_decisions_in_inference_mode():
    for bad in ({"recompute": "full"}, {"zero": 1}, {"offload": True}):
        with pytest.raises(ConfigError, match="inference plan"):
            autopar.PlanOptions(training=False, **bad)
    with pytest.raises(ConfigError, match="training=False"):
        autopar.PlanOptions(kv_cache_bytes="1GiB")
    with pytest.raises(ConfigError, match="training must be"):
        autopar.PlanOptions(training="no")
    with pytest.raises(ConfigError, match="kv_cache_bytes"):
        autopar.PlanOptions(training=False, kv_cache_bytes=-1)
    assert autopar.PlanOptions(training=False, kv_cache_bytes="2MiB").kv_cache_bytes == 2 << 20
    with pytest.raises(ConfigError, match="pipeline stages"):
        autopar.plan(tiny_llama(), ids(), mesh_shape=(2,), mesh_dim_names=("pp",), training=False)


def _ilp(training: bool, kv=None):
    cap = capture(tiny_llama(), ids())
    gi, mesh, prof = index_graph(cap), MeshSpec.make((2,)), load_cluster("cpu-gloo")
    keys = ilp.collect_keys(gi, mesh, prof, training=training)
    m = ilp.ShardingILP(gi, keys, mesh, prof.dim_links(mesh, None), 1e12, remat=True, training=training,
                        kv_cache_bytes=kv)
    m.build()
    return m


def test_inference_ilp_has_the_forward_terms_alone():
    inf, train = _ilp(False, kv=1 << 20), _ilp(True)
    assert list(inf.memory_exprs()) == ["forward"]
    for cat in (MemCategory.GRADS, MemCategory.OPTIMIZER, MemCategory.ACTIVATIONS, MemCategory.BACKWARD_GRAD,
                MemCategory.GRAD_BUCKETS, MemCategory.BLOCKS, MemCategory.RECOMPUTE):
        assert not inf.mem_terms(cat), cat
    assert inf.mem_terms(MemCategory.LIVE) and inf.mem_terms(MemCategory.KV_CACHE)
    assert not inf.time_terms(TimeCategory.RECOMPUTE) and not inf.time_terms(TimeCategory.OFFLOAD)
    # a training ILP is untouched by the inference parts
    assert set(train.memory_exprs()) >= {"backward", "step"}
    assert not train.mem_terms(MemCategory.LIVE) and not train.mem_terms(MemCategory.KV_CACHE)
    assert train.mem_terms(MemCategory.GRADS) and train.mem_terms(MemCategory.OPTIMIZER)
    # compute: forward seconds in inference, forward + backward in training, for the same strategies
    fwd = sum(c for c, _ in inf.time_terms(TimeCategory.COMPUTE))
    both = sum(c for c, _ in train.time_terms(TimeCategory.COMPUTE))
    assert 0 < fwd < both / 2


@pytest.mark.parametrize("fix", [None, MEGATRON], ids=["solver", "megatron"])
def test_price_plan_equals_the_inference_objective(fix):
    model = tiny_llama()
    plan = autopar.plan(model, ids(), mesh_shape=(2,), cluster="cpu-gloo", training=False, fix=fix,
                        fold_layers=False)
    assert plan.mode == "inference" and not plan.optimizer_sharding and not plan.checkpoint
    gi = index_graph(capture(model, ids(), fold_layers=False))
    keys = ilp.collect_keys(gi, plan.mesh, plan.cluster, training=False)
    price = RM.price_plan(plan, gi, keys, plan.cluster.dim_links(plan.mesh, None))
    assert price.total_s == pytest.approx(plan.solver.objective, rel=1e-9)
    assert price.total_s == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
    cols = RM.planned_collectives(plan, gi)
    assert all(c.phase == "fwd" for c in cols)
    if fix is not None:   # Megatron: one all-reduce after o_proj and one after down_proj per layer, forward only
        assert price.comm_s > 0
        assert sorted((c.kind, c.bytes) for c in cols) == [("all_reduce", 4 * 64 * 4)] * 4
        mb = plan.predicted.memory_breakdown
        assert mb["grads"] == mb["optimizer"] == 0
        sharded = sum(p.numel() for n, p in model.named_parameters() if "proj" in n) // 2
        assert mb["params"] == 4 * (sum(p.numel() for p in model.parameters()) - sharded)


def test_live_activations_are_the_forward_peak():
    """Linear(64, 256) -> ReLU -> Linear(256, 64) on 8 rows, fp32, everything replicated: the peak is at the ReLU,
    its input and output live (8 x 256 x 4 B each); the model's input is dead after the first linear. Parameters
    are their bytes alone."""
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    plan = autopar.plan(m, (torch.randn(8, 64),), mesh_shape=(2,), cluster="cpu-gloo", training=False,
                        fix={"*": ["R"]})
    mb = plan.predicted.memory_breakdown
    assert mb["activations"] == 2 * 8 * 256 * 4
    assert mb["params"] == 4 * sum(p.numel() for p in m.parameters())
    assert plan.predicted.peak_memory_bytes == mb["params"] + mb["activations"]


def test_kv_cache_follows_the_attention_head_split():
    kv = 4 << 20
    free = autopar.plan(tiny_llama(), ids(), mesh_shape=(2,), cluster="cpu-gloo", training=False, kv_cache_bytes=kv)
    tight = autopar.plan(tiny_llama(), ids(), mesh_shape=(2,), cluster="cpu-gloo", training=False, kv_cache_bytes=kv,
                         memory_budget="2.3MiB")
    assert free.predicted.memory_breakdown["kv_cache"] == kv            # replicated: the whole cache per rank
    assert tight.predicted.memory_breakdown["kv_cache"] == kv // 2      # heads split 2 ways
    sdpa = next(ns for k, ns in tight.node_shardings.items() if "scaled_dot_product_attention" in k)
    assert [s[0] for s in sdpa.inputs[:3]] == ["S(1)"] * 3
    mb = tight.predicted.memory_breakdown
    assert tight.predicted.peak_memory_bytes == pytest.approx(mb["params"] + mb["activations"] + mb["kv_cache"], abs=2)
    assert tight.predicted.peak_memory_bytes <= 2.3 * 2**20
    with pytest.raises(autopar.InfeasiblePlanError, match="kv_cache_bytes"):
        autopar.plan(tiny_llama(), ids(), mesh_shape=(2,), cluster="cpu-gloo", training=False, kv_cache_bytes=kv,
                     memory_budget="1.5MiB")


def test_plan_json_records_the_mode(tmp_path):
    plan = autopar.plan(tiny_llama(), ids(), mesh_shape=(2,), cluster="cpu-gloo", training=False)
    d = json.loads(plan.to_json())
    assert d["mode"] == "inference" and d["version"] == 1
    assert autopar.Plan.from_json(plan.to_json()).mode == "inference"
    del d["mode"]
    assert autopar.Plan.from_dict(d).mode == "training"   # plans written before the field are training plans
    d["mode"] = "serving"
    with pytest.raises(autopar.PlanFormatError, match="plan.mode"):
        autopar.Plan.from_dict(d)
    jsonschema = pytest.importorskip("jsonschema")
    from autopar.core.plan import SCHEMA_PATH
    jsonschema.validate(json.loads(plan.to_json()), json.loads(SCHEMA_PATH.read_text()))


def apply_inference(rank: int, world: int, plan_json: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    model = tiny_llama()
    x = torch.arange(8).reshape(4, 2) % 96
    with torch.no_grad():
        ref = model(input_ids=x).logits
    pm = autopar.apply(model, autopar.Plan.from_json(plan_json), init_device_mesh("cpu", (world,)))
    out = pm(input_ids=x).logits
    return {"err": (out - ref).abs().max().item(), "requires_grad": out.requires_grad,
            "params_grad": any(p.requires_grad for p in pm.parameters()), "reducer": pm.grad_reducer is not None,
            "q_rows": pm.model.layers[0].self_attn.q_proj.weight.to_local().shape[0]}


def test_apply_builds_an_inference_module(dist2):
    plan = autopar.plan(tiny_llama(), ids(4, 2), mesh_shape=(2,), cluster="cpu-gloo", training=False, fix=MEGATRON)
    for r in dist2.run(apply_inference, plan.to_json(), timeout=120):
        assert r["err"] < 1e-5
        assert not r["requires_grad"] and not r["params_grad"] and not r["reducer"]
        assert r["q_rows"] == 32


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_llama8b_decode_on_8_h100_gets_heads_and_mlp_sharding():
    """A LLaMA-3-8B-shaped decode step (64 sequences, one token, bf16) with a 32 GiB KV cache on 8 H100s: the
    planner's own choice is Megatron sharding (q/k/v and gate/up by output features, o/down by input features)
    with the attention split by heads, so the cache is 4 GiB per rank."""
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    kv = 64 * 4096 * 32 * 2 * 8 * 128 * 2          # 64 sequences x 4096 tokens, K and V, bf16
    plan = autopar.plan(model, {"input_ids": torch.zeros(64, 1, dtype=torch.long, device="meta")}, mesh_shape=(8,),
                        cluster="h100-sxm", training=False, kv_cache_bytes=kv)
    layer = {k.split(".")[-2]: v[0] for k, v in plan.param_placements.items() if ".layers.7." in k}
    assert layer == {"q_proj": "S(0)", "k_proj": "S(0)", "v_proj": "S(0)", "o_proj": "S(1)", "gate_proj": "S(0)",
                     "up_proj": "S(0)", "down_proj": "S(1)", "input_layernorm": "R", "post_attention_layernorm": "R"}
    assert plan.predicted.memory_breakdown["kv_cache"] == kv // 8
    assert plan.predicted.memory_breakdown["grads"] == plan.predicted.memory_breakdown["optimizer"] == 0


def test_cli_plans_inference(tmp_path, capsys):
    from autopar.tools.cli import main
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", "llama-tiny", "--batch", "4", "--seq", "1", "--mesh", "2", "--cluster", "cpu-gloo",
                 "--inference", "--kv-cache", "4MiB", "--memory", "3MiB", "--out", str(out)]) == 0
    plan = autopar.Plan.from_json(out)
    assert plan.mode == "inference" and plan.predicted.memory_breakdown["kv_cache"] == 2 << 20
    assert [i["name"] for i in plan.model.inputs] == ["idx"]   # no labels: the forward to the logits
    assert main(["plan", "--model", "llama-tiny", "--batch", "4", "--seq", "1", "--mesh", "2", "--kv-cache", "4MiB",
                 "--out", str(out)]) != 0
    assert "--inference" in capsys.readouterr().err
