"""``autopar.plan(..., precision="bf16")`` (the flat planner) prices and budgets the plan at the dtypes the runtime
uses: ops at autocast's dtypes (solver.cost.precision_graph), the tensors kept for backward traced under autocast
(solver.saved: the matmuls keep bf16 COPIES of their float32 weights and activations, autocast's casts), and
parameters, gradients and AdamW states float32.

* a bf16 plan on h100-sxm is predicted faster than the fp32 plan (bf16 tensor cores), keeps fewer activation bytes,
  and pays one bf16 copy of each matmul's weight, split like the weight where the matmul reads it;
* on a (2,) gloo mesh (cpu-gloo, CPU autocast) a bf16 plan's predicted peak is within +-10 % of the peak
  autopar.memory measures, for the GPT and LLaMA examples, and the plan matches one device under autocast.
"""
from __future__ import annotations

import math

import pytest
import torch

import autopar
from autopar.cluster.profile import load_cluster
from autopar.core.capture import capture
from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.core.placement import Replicate, Shard
from autopar.models import build_model
from autopar.solver import cost as C
from autopar.solver.ilp import collect_keys
from autopar.solver.saved import saved_tensors

BF16 = {"param_dtype": "float32", "compute_dtype": "bfloat16", "loss_scaling": "none"}
DP = {"input:*": ["S(0)"], "param:*": ["R"]}


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return build_model("gpt-tiny", batch=8, seq=64, device="meta", n_layer=4)


def _without_weight_casts(monkeypatch):
    """The planner's saved-tensor trace with the matmuls' weight copies (argument 1 of a linear) left out."""
    import dataclasses

    from autopar.solver import planner

    def trace(*args, **kwargs):
        out = saved_tensors(*args, **kwargs)
        return {n: dataclasses.replace(r, casts=frozenset((a, b) for a, b in r.casts
                                                           if not (n.startswith("linear") and a == 1)))
                for n, r in out.items()}
    monkeypatch.setattr(planner, "saved_tensors", trace)


def test_bf16_plan_on_h100_is_faster_keeps_fewer_activation_bytes_and_pays_weight_copies(gpt, monkeypatch):
    model, inputs = gpt
    kw = {"mesh_shape": (2,), "cluster": "h100-sxm", "fix": DP, "recompute": "none", "zero": 0, "offload": False}
    fp32 = autopar.plan(model, inputs, **kw)
    bf16 = autopar.plan(model, inputs, precision="bf16", **kw)
    assert bf16.precision == BF16
    assert bf16.predicted.step_time_s < fp32.predicted.step_time_s
    assert bf16.predicted.time_breakdown["compute_s"] < fp32.predicted.time_breakdown["compute_s"]
    m32, m16 = fp32.predicted.memory_breakdown, bf16.predicted.memory_breakdown
    assert m16["activations"] < m32["activations"]
    # parameters, gradients and AdamW states stay float32
    for cat in ("params", "grads", "optimizer"):
        assert m16[cat] == m32[cat], cat
    # the bf16 activations include one bf16 copy of every matmul weight: parameters are replicated (DP), so each
    # rank keeps a whole copy, 2 bytes per element of every linear weight (the tied lm_head's wte once)
    linear_weights = sum(math.prod(s) for f, s in bf16.model.param_shapes.items()
                         if f.endswith("weight") and ("attn" in f or "mlp" in f or f == "wte.weight"))
    _without_weight_casts(monkeypatch)
    bare = autopar.plan(model, inputs, precision="bf16", **kw)
    assert m16["activations"] - bare.predicted.memory_breakdown["activations"] == 2 * linear_weights
    assert bf16.predicted.peak_memory_bytes - bare.predicted.peak_memory_bytes == 2 * linear_weights


def test_weight_copies_are_charged_at_the_placement_the_matmul_reads(gpt):
    """The kept bf16 copy of a weight is split like the weight where the matmul reads it: whole under a replicated
    weight, half under a row-split (tensor-parallel) one, at 2 bytes an element; without autocast nothing."""
    model, inputs = gpt
    cap = capture(model, inputs)
    params = set(cap.program.graph_signature.inputs_to_parameters)
    gm = cap.program.graph_module
    s32, s16 = saved_tensors(gm, params), saved_tensors(gm, params, autocast_dtype=torch.bfloat16)
    prof = load_cluster("h100-sxm")
    gi = C.precision_graph(index_graph(cap), BF16, prof)
    node = next(g for g in gi.nodes.values() if g.key.endswith("mlp.fc/linear#0"))
    w = gi.nodes[node.inputs[1].src].outputs[0]
    assert w.dtype == torch.float32 and node.outputs[0].dtype == torch.bfloat16
    casts = dict(s16[node.name].casts)
    assert casts[1] == w.numel * 2                      # the weight's bf16 copy
    assert casts[0] == gi.nodes[node.inputs[0].src].outputs[0].numel * 2    # the layer-norm output's
    assert not (s32.get(node.name) and s32[node.name].casts)
    keys = collect_keys(gi, MeshSpec.make((2,), ("tp",)), prof, saved=s16)
    info = keys[node.key]
    mem = {}
    for s, m in zip(info.strategies, info.memory):
        mem[(s.inputs[0], s.inputs[1])] = sum(m.values())
    rep, col = (Replicate(),), (Shard(0),)
    out_bytes = node.outputs[0].nbytes if 0 in s16[node.name].outputs else 0.0
    # x replicated, weight split on its rows (column-parallel linear): output split on its last dim
    assert mem[(rep, col)] == pytest.approx(out_bytes / 2 + casts[0] + casts[1] / 2)
    # x split on the batch, weight replicated (data parallel): the whole weight copy
    assert mem[((Shard(0),), rep)] == pytest.approx(out_bytes / 2 + casts[0] / 2 + casts[1])


def test_autocast_trace_of_an_hf_llama_records_every_weight_copy():
    """An HF capture carries export's dtype assertions (float32 values), which the autocast trace skips; each of
    the 7 linears of a block keeps its weight's bf16 copy, and attention keeps bf16 copies of the rotated (float32)
    q and k."""
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, vocab_size=128, use_cache=False)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 128, (2, 16))
    cap = capture(model, {"input_ids": ids, "labels": ids}, fold_layers=False)
    params = dict(cap.program.graph_signature.inputs_to_parameters)
    saved = saved_tensors(cap.program.graph_module, set(params), autocast_dtype=torch.bfloat16)
    gm = cap.program.graph_module
    weight_copies = {}
    for n in gm.graph.nodes:
        rec = saved.get(n.name)
        if n.target is torch.ops.aten.linear.default and rec is not None:
            w = n.args[1]
            weight_copies[params[w.name]] = dict(rec.casts).get(1)
            assert weight_copies[params[w.name]] == w.meta["val"].numel() * 2
    assert sum(".layers." in f for f in weight_copies) == 14
    sdpa = [saved[n.name] for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 2 and all({a for a, _ in r.casts} == {0, 1} for r in sdpa)


@pytest.mark.parametrize("mesh, fix", [((2,), DP), ((2,), None)], ids=["dp-2", "solver-2"])
def test_price_plan_of_a_bf16_plan_is_its_objective_on_the_precision_graph(gpt, mesh, fix):
    """solver.runtime_model.price_plan equals the ILP objective of a bf16 plan when given the graph at the plan's
    dtypes (cost.precision_graph), as the planner costed it; on the float32 graph it does not."""
    from autopar.solver import runtime_model as RM

    model, inputs = gpt
    kw = {"fix": fix, "recompute": "none", "zero": 0, "offload": False} if fix else {}
    plan = autopar.plan(model, inputs, mesh_shape=mesh, cluster="h100-sxm", precision="bf16", fuse=False, **kw)
    if plan.checkpoint or plan.optimizer_sharding:
        pytest.skip("price_plan prices plans without recompute / ZeRO")
    gi32 = index_graph(capture(model, inputs))
    gi = C.precision_graph(gi32, plan.precision, plan.cluster)
    links = plan.cluster.dim_links(plan.mesh)
    price = RM.price_plan(plan, gi, collect_keys(gi, plan.mesh, plan.cluster), links)
    assert price.total_s == pytest.approx(plan.solver.objective, rel=1e-9)
    assert price.total_s == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
    as_fp32 = RM.price_plan(plan, gi32, collect_keys(gi32, plan.mesh, plan.cluster), links)
    assert as_fp32.total_s > 1.5 * price.total_s


RTOL, ATOL = 2e-2, 2e-3   # bf16 has 8 significant bits (as tests/test_pipeline_precision.py)


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
@pytest.mark.parametrize("spec", ["gpt-tiny", "llama-tiny"])
def test_bf16_plan_on_gloo_matches_one_device_and_its_predicted_peak(spec, dist2):
    from precision_plan_check import check_bf16_plan

    results = dist2.run(check_bf16_plan, spec, timeout=240)
    for rank, res in enumerate(results):
        assert res["precision"] == BF16 and res["fp32_state"]
        bad = {k: v for k, v in res["diffs"].items() if v[0] > ATOL and v[1] > RTOL}
        assert not bad, f"rank {rank}: beyond autocast tolerance: {bad}"
        assert len(res["diffs"]) == res["num_params"] + 1
        assert res["frac"] < 0.01, f"rank {rank}: {res['frac']:.2%} of the parameters differ by > 1e-4 after a step"
        pipe, ref = res["loss"]
        assert abs(res["fp32_loss"] - ref) > abs(pipe - ref)    # autocast really ran
        err = (res["predicted_peak"] - res["measured_peak"]) / res["measured_peak"]
        assert abs(err) <= 0.10, f"rank {rank}: predicted peak {res['predicted_peak']} vs measured " \
                                 f"{res['measured_peak']} ({err:+.1%})"
