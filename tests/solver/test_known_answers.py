"""The planner rediscovers what experts do (issue: Spine 1/2, "Must show")."""
from __future__ import annotations

import pytest
import torch

import autopar
from autopar.frontend.planning import plan
from autopar.models import build_model, load_example_module


def _gpt(d: int, layers: int, heads: int, vocab: int, seq: int):
    gpt = load_example_module("gpt")
    with torch.device("meta"):
        return gpt.GPT(gpt.GPTConfig(vocab_size=vocab, max_seq_len=seq, n_layer=layers, n_head=heads, d_model=d))


def _block_params(p, suffix: str) -> set[tuple[str, ...]]:
    return {v for k, v in p.param_placements.items() if k.startswith("blocks.") and k.endswith(suffix)}


def test_small_model_large_batch_is_pure_data_parallel():
    model, inputs = build_model("gpt2-small", batch=256, seq=1024)
    p = plan(model, inputs, mesh_shape=(8,), cluster="h100-sxm")
    assert set(p.param_placements.values()) == {("R",)}
    assert p.node_shardings["input:idx"].outputs[0] == ("S(0)",)
    # every matmul works on its batch shard
    for key, ns in p.node_shardings.items():
        if key.endswith("linear#0") and key.startswith("blocks"):
            assert ns.inputs[0] == ("S(0)",), key
    assert p.predicted.time_breakdown["comm_s"] < 0.05 * p.predicted.step_time_s


def test_batch_one_large_hidden_memory_limited_is_megatron_tensor_parallel():
    model = _gpt(12288, 4, 96, vocab=50304, seq=2048)
    idx = torch.zeros(1, 2048, dtype=torch.long)
    inputs = {"idx": idx, "labels": idx}
    p = plan(model, inputs, mesh_shape=(8,), cluster="h100-sxm", memory_budget="80GB")
    # tensor parallel: every block weight split over the 8 devices, attention split on heads, row-parallel
    # attention-out and MLP-down (partial sums), MLP-up column-parallel
    for w in ("attn.qkv.weight", "mlp.fc.weight", "attn.proj.weight", "mlp.proj.weight"):
        assert _block_params(p, w) in ({("S(0)",)}, {("S(1)",)}), w
    assert _block_params(p, "mlp.fc.weight") == {("S(0)",)}
    assert _block_params(p, "attn.proj.weight") == {("S(1)",)}
    assert _block_params(p, "mlp.proj.weight") == {("S(1)",)}
    assert p.node_shardings["blocks.*/attn.proj/linear#0"].outputs[0] == ("P(sum)",)
    assert p.node_shardings["blocks.*/mlp.proj/linear#0"].outputs[0] == ("P(sum)",)
    assert p.node_shardings["blocks.*/attn/scaled_dot_product_attention#0"].inputs[0] == ("S(1)",)  # heads
    # at least as fast as Megatron's layout (column-parallel QKV and MLP-up, row-parallel attention-out and
    # MLP-down) pinned: since norms may run on a hidden-split stream (solver.strategies.norm), the free plan
    # takes QKV row-parallel from that stream, reduce-scattered onto the heads (the fused 3h-wide QKV output is
    # not gathered whole), 0.7 % faster in this model
    megatron = plan(model, inputs, mesh_shape=(8,), cluster="h100-sxm", memory_budget="80GB",
                    fix={"param:blocks.*.attn.qkv.weight": ["S(0)"], "param:blocks.*.mlp.fc.weight": ["S(0)"],
                         "param:blocks.*.attn.proj.weight": ["S(1)"], "param:blocks.*.mlp.proj.weight": ["S(1)"]})
    assert megatron.node_shardings["blocks.*/attn.qkv/linear#0"].inputs[0] == ("R",)
    assert p.predicted.step_time_s <= megatron.predicted.step_time_s * (1 + 1e-9)


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_dp_tp_mesh_with_large_model_is_dp_times_tp():
    model, inputs = build_model("llama3-8b", batch=64, seq=2048)
    p = plan(model, inputs, mesh_shape=(8, 8), mesh_dim_names=("dp", "tp"), cluster="h100-sxm")
    big = {k: v for k, v in p.param_placements.items() if k.startswith("blocks.") and "proj" in k}
    assert big and all(v[0] == "R" for v in big.values()), "weights replicated over dp"
    assert all(v[1].startswith("S(") for v in big.values()), "weights sharded over tp"
    assert p.node_shardings["input:idx"].outputs[0][0] == "S(0)", "batch split over dp"
    assert p.predicted.peak_memory_bytes <= 80e9


def test_budget_below_replicated_parameters_shards_parameters_on_dp():
    model, inputs = build_model("gpt2-xl", batch=16, seq=1024)
    budget = 24e9
    p = plan(model, inputs, mesh_shape=(8,), cluster="h100-sxm", memory_budget=int(budget))
    replicated_state = 16 * p.model.num_parameters  # fp32 params + grads + AdamW states
    assert replicated_state > budget
    sharded = [k for k, v in p.param_placements.items() if v[0].startswith("S(")]
    assert len(sharded) >= 0.5 * sum(1 for k in p.param_placements if k.endswith("weight") and "ln" not in k)
    # the compute stays data parallel: the big matmuls take batch shards and gathered weights
    ns = p.node_shardings["blocks.*/mlp.fc/linear#0"]
    assert ns.inputs[0] == ("S(0)",) and ns.inputs[1] == ("R",)
    assert p.predicted.peak_memory_bytes <= budget


def test_infeasible_budget_names_smallest_feasible():
    model, inputs = build_model("gpt2-small", batch=8, seq=1024)
    with pytest.raises(autopar.InfeasiblePlanError) as ei:
        plan(model, inputs, mesh_shape=(2,), cluster="h100-sxm", memory_budget="100MiB")
    need = ei.value.min_feasible_bytes
    assert need and need > 100 * 2**20
    assert "smallest feasible budget" in str(ei.value)
    p = plan(model, inputs, mesh_shape=(2,), cluster="h100-sxm", memory_budget=int(need * 1.01))
    assert p.predicted.peak_memory_bytes <= need * 1.01
