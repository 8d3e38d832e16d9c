"""Tensor-parallel decoding of autopar's built-in Llama on a (2,) gloo mesh with the planner's inference plan:
greedy outputs equal one device token for token and the KV cache holds half the kv heads per rank, on the
captured step graph sharded by the codegen pass (the default) and on the module path with torch's TP styles. The plans are
``autopar.plan(training=False, kv_cache_bytes=...)`` under budgets that cannot hold the whole cache, so the planner
itself splits the attention heads (tighter: more). The built-in GPT (one fused qkv projection) is refused."""
from __future__ import annotations

import pytest
import torch
from inference_checks import record_steps

import autopar
from autopar.core.errors import ConfigError
from autopar.inference.tensor_parallel import decode_inputs, decode_plan_options, decode_styles
from autopar.models import build_model

PROMPTS = [[5, 9, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [20] * 6]


def builtin(spec="llama-tiny"):
    torch.manual_seed(0)
    return build_model(spec, batch=1, seq=8, device="cpu")[0].eval()


def _plan(budget):
    m = builtin()
    return autopar.plan(m, decode_inputs(4, model=m), mesh_shape=(2,), cluster="cpu-gloo",
                        options=decode_plan_options(kv_cache_bytes="4MiB", memory_budget=budget))


def one_device(max_new):
    from autopar.inference import Engine, EngineConfig, SamplingParams
    eng = Engine(builtin(), EngineConfig(block_size=4, num_blocks=48))
    assert eng.runner.path == "graph"
    steps = record_steps(eng)
    tokens = [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, ignore_eos=True))]
    return tokens, torch.cat(steps)


def tp_decode(rank: int, world: int, plan_json: str, max_new: int, path: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from autopar.inference import LLM, SamplingParams
    llm = LLM(builtin(), init_device_mesh("cpu", (world,)), plan=autopar.Plan.from_json(plan_json),
              block_size=4, num_blocks=48, runner_path=path)
    steps = record_steps(llm.engine)
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    if llm.engine.runner.path == "graph":     # the step graph sharded by the codegen pass (the model stays whole)
        w = llm.engine.runner.graph.multi.tp_blocks_0_attn_q_proj_weight
    else:                                       # torch TP styles on the model's modules
        w = llm.model.blocks[0].attn.q_proj.weight.to_local()
    return {"tokens": [o.token_ids for o in outs], "cache_kv_heads": llm.engine.cache.k[0].shape[1],
            "q_rows": w.shape[0], "path": llm.engine.runner.path, "logits": torch.cat(steps)}


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_builtin_llama_tp_decoding_equals_one_device(dist2):
    plan = _plan("3MiB")
    _, names, kv_heads = decode_styles(builtin(), plan, 2)
    assert kv_heads == 1                         # the planner split the heads: 2 kv heads -> 1 per rank
    assert names["blocks.0.attn.q_proj"] == "colwise" and names["blocks.0.attn.k_proj"] == "colwise"
    assert plan.predicted.memory_breakdown["kv_cache"] == 2 << 20
    ref, ref_logits = one_device(10)
    for path in ("graph", "modules"):
        for r in dist2.run(tp_decode, plan.to_json(), 10, path, timeout=180):
            assert r["tokens"] == ref
            torch.testing.assert_close(r["logits"], ref_logits, rtol=1e-4, atol=1e-5)    # every step's logits
            assert r["cache_kv_heads"] == 1 and r["q_rows"] == 32 and r["path"] == path


def test_builtin_gpt_tp_is_refused():
    m = builtin("gpt-tiny")
    plan = autopar.plan(m, decode_inputs(4, model=m), mesh_shape=(2,), cluster="cpu-gloo",
                        options=decode_plan_options(kv_cache_bytes="4MiB"))
    with pytest.raises(ConfigError, match="fused qkv"):
        decode_styles(m, plan, 2)
