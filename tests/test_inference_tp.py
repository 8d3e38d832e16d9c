"""Tensor-parallel decoding on a (2,) gloo mesh with an autopar plan: greedy outputs equal one device token for
token, the KV cache holds half the kv heads per rank; plans it cannot run are refused naming the parameter.

The plans come from ``autopar.plan`` on the model's forward over a decode-sized batch. On a model this small the
cost model replicates everything (correct, and nothing to test), so the sharded paths are exercised by pinning
some placements with ``fix=`` and letting the planner choose the rest; the placements the planner chose are
asserted, so a change in its choice shows here.
"""
from __future__ import annotations

import pytest
import torch

import autopar
from autopar.core.errors import ConfigError

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 9, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [20] * 6]
QKV = {f"model.layers.*.self_attn.{n}_proj.weight": ["S(0)"] for n in "qkv"}
GATE_UP = {f"model.layers.*.mlp.{n}_proj.weight": ["S(0)"] for n in ("gate", "up")}
OUT_ROWS = {"model.layers.*.self_attn.o_proj.weight": ["S(1)"], "model.layers.*.mlp.down_proj.weight": ["S(1)"],
            "lm_head.weight": ["S(0)"], "model.embed_tokens.weight": ["S(0)"]}


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _plan(fix):
    return autopar.plan(tiny_llama(), {"input_ids": torch.zeros(1, 16, dtype=torch.long)}, mesh_shape=(2,),
                        cluster="h100-sxm", fix=fix)


def one_device(max_new):
    from autopar.inference import Engine, EngineConfig, SamplingParams
    eng = Engine(tiny_llama(), EngineConfig(block_size=4, num_blocks=48))
    return [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, ignore_eos=True))]


def tp_decode(rank: int, world: int, plan_json: str, max_new: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from autopar.inference import LLM, SamplingParams
    llm = LLM(tiny_llama(), init_device_mesh("cpu", (world,)), plan=autopar.Plan.from_json(plan_json),
              block_size=4, num_blocks=48)
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    attn = llm.model.model.layers[0].self_attn
    return {"tokens": [o.token_ids for o in outs], "cache_kv_heads": llm.engine.cache.k[0].shape[1],
            "q_rows": attn.q_proj.weight.to_local().shape[0] if hasattr(attn.q_proj.weight, "to_local") else None,
            "free": llm.engine.blocks.num_free}


@pytest.mark.parametrize("fix,expect", [
    (QKV | GATE_UP, {"o_proj": "R", "down_proj": "R"}),                        # the planner's choice after them
    (QKV | GATE_UP | OUT_ROWS, {"o_proj": "S(1)", "down_proj": "S(1)"}),       # Megatron, vocab-sharded ends
], ids=["planner-rest", "megatron"])
def test_tp_decoding_equals_one_device(dist2, fix, expect):
    plan = _plan(fix)
    pl = plan.param_placements
    assert pl["model.layers.1.self_attn.o_proj.weight"] == (expect["o_proj"],)
    assert pl["model.layers.1.mlp.down_proj.weight"] == (expect["down_proj"],)
    ref = one_device(10)
    results = dist2.run(tp_decode, plan.to_json(), 10, timeout=180)
    for r in results:
        assert r["tokens"] == ref
        assert r["cache_kv_heads"] == 1 and r["q_rows"] == 32          # half of 2 kv heads, half of 4 x 16 rows
        assert r["free"] == 48


def test_plans_tp_cannot_run_are_refused():
    from autopar.inference.tensor_parallel import decode_styles
    plan = _plan(QKV | {"model.norm.weight": ["S(0)"]})
    with pytest.raises(ConfigError, match=r"model\.norm\.weight"):
        decode_styles(tiny_llama(), plan, 2)
    with pytest.raises(autopar.MeshError, match="1-D mesh"):
        decode_styles(tiny_llama(), plan, 4)
    with pytest.raises(autopar.MeshError, match="needs the plan"):
        from autopar.inference import LLM
        LLM(tiny_llama(), mesh=object())
