"""Tensor-parallel decoding on a (2,) gloo mesh with an autopar inference plan: greedy outputs equal one device
token for token, the KV cache holds half the kv heads per rank; plans it cannot run are refused naming why.

The plans come from ``autopar.plan`` in inference mode (``training=False``) on the model's decode step (4
sequences, one token) on the cpu-gloo profile, with the KV cache the engine will hold declared
(``kv_cache_bytes``) and nothing pinned. On a model this small a collective costs more than the compute it
saves, so without memory pressure the planner replicates everything; a budget that cannot hold the whole cache
makes it shard the attention heads (and, tighter, every projection, embedding and LM head), each the
planner's own choice. The placements it chose are asserted, so a change in its choice shows here.
"""
from __future__ import annotations

import pytest
import torch
from inference_checks import record_steps

import autopar
from autopar.core.errors import ConfigError
from autopar.inference.tensor_parallel import decode_styles

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 9, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [20] * 6]
QKV = {f"model.layers.*.self_attn.{n}_proj.weight": ["S(0)"] for n in "qkv"}
KV_CACHE = "4MiB"   # 4x the model's parameters: a budget of 2-3 MiB holds it only sharded by kv heads


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _plan(budget=None, fix=None):
    from autopar.inference.tensor_parallel import decode_inputs, decode_plan_options
    return autopar.plan(tiny_llama(), decode_inputs(4), mesh_shape=(2,), cluster="cpu-gloo",
                        options=decode_plan_options(kv_cache_bytes=KV_CACHE, memory_budget=budget, fix=fix))


def _layer(plan, i=1):
    return {k.split(".")[-2]: v[0] for k, v in plan.param_placements.items() if f"layers.{i}." in k}


def one_device(max_new, logits=False):
    from autopar.inference import Engine, EngineConfig, SamplingParams
    eng = Engine(tiny_llama(), EngineConfig(block_size=4, num_blocks=48))
    steps = record_steps(eng)
    tokens = [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, ignore_eos=True))]
    return (tokens, torch.cat(steps)) if logits else tokens


def tp_decode(rank: int, world: int, plan_json: str, max_new: int, path: str = "auto") -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from autopar.inference import LLM, SamplingParams
    llm = LLM(tiny_llama(), init_device_mesh("cpu", (world,)), plan=autopar.Plan.from_json(plan_json),
              block_size=4, num_blocks=48, runner_path=path)
    steps = record_steps(llm.engine)
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    runner = llm.engine.runner
    if runner.path == "graph":       # the codegen pass sharded the captured step graph: its local weight slices
        gm = runner.graph.multi
        w = getattr(gm, "tp_model_layers_0_self_attn_q_proj_weight", None)
        q_rows = None if w is None else w.shape[0]
        reshards = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "reshard")
    else:
        w = llm.model.model.layers[0].self_attn.q_proj.weight
        q_rows, reshards = (w.to_local().shape[0] if hasattr(w, "to_local") else None), None
    return {"tokens": [o.token_ids for o in outs], "cache_kv_heads": llm.engine.cache.k[0].shape[1],
            "q_rows": q_rows, "free": llm.engine.blocks.num_free, "path": runner.path, "reshards": reshards,
            "logits": torch.cat(steps)}


def test_without_memory_pressure_the_planner_replicates_a_tiny_model():
    plan = _plan()   # the whole cache fits: a gloo collective (~100 us) costs more than a 64-wide matmul
    assert plan.mode == "inference" and set(_layer(plan).values()) == {"R"}
    assert plan.predicted.memory_breakdown["kv_cache"] == 4 << 20


@pytest.mark.parametrize("budget,fix,expect,reshards", [
    # the cache must be halved: the attention runs on local heads, o_proj gathers its input, the MLP stays
    # replicated
    ("3MiB", None, {"q_proj": "S(0)", "k_proj": "S(0)", "v_proj": "S(0)", "o_proj": "R", "gate_proj": "R",
                    "down_proj": "R", "embed": "R"}, 2),
    # v_proj pinned replicated: it slices its output to the local heads (the rest the planner's)
    ("3MiB", {"model.layers.*.self_attn.v_proj.weight": ["R"]}, {"q_proj": "S(0)", "v_proj": "R"}, 2),
    # tighter: Megatron heads/MLP sharding, with the embedding (hidden) and LM head (vocab) sharded too
    ("2.18MiB", None, {"q_proj": "S(0)", "k_proj": "S(0)", "v_proj": "S(0)", "o_proj": "S(1)", "gate_proj": "S(0)",
                       "down_proj": "S(1)", "embed": "S(1)"}, 6),
], ids=["heads-only", "v-replicated", "megatron"])
def test_tp_decoding_equals_one_device(dist2, budget, fix, expect, reshards):
    plan = _plan(budget, fix)
    got = _layer(plan) | {"embed": plan.param_placements["model.embed_tokens.weight"][0]}
    assert {k: got[k] for k in expect} == expect, got
    assert plan.predicted.memory_breakdown["kv_cache"] == 2 << 20   # sharded by heads: half per rank
    _, names, kv_heads = decode_styles(tiny_llama(), plan, 2)
    assert kv_heads == 1
    attn = "model.layers.0.self_attn"
    assert names[f"{attn}.v_proj"] == ("slice-output" if fix else "colwise")
    assert names[f"{attn}.o_proj"] == {"R": "gather-input", "S(1)": "rowwise"}[expect.get("o_proj", got["o_proj"])]
    ref, ref_logits = one_device(10, logits=True)
    # the codegen path (captured graph, attention swapped, sharded by shard_step_graph); for the Megatron plan the
    # torch-styles path (interface) too
    for path in ("graph", "interface") if budget == "2.18MiB" else ("graph",):
        results = dist2.run(tp_decode, plan.to_json(), 10, path, timeout=180)
        for r in results:
            assert r["path"] == path and r["tokens"] == ref
            torch.testing.assert_close(r["logits"], ref_logits, rtol=1e-4, atol=1e-5)    # every step's logits
            assert r["cache_kv_heads"] == 1 and r["q_rows"] == 32          # half of 2 kv heads, half of 4 x 16 rows
            assert r["free"] == 48
            if path == "graph":        # the plan's collectives, inserted by the codegen pass
                assert r["reshards"] == reshards, r["reshards"]


def _prefill_plan(budget="3MiB"):
    from autopar.inference.tensor_parallel import decode_inputs, decode_plan_options
    return autopar.plan(tiny_llama(), decode_inputs(1, 16), mesh_shape=(2,), cluster="cpu-gloo",
                        options=decode_plan_options(kv_cache_bytes=KV_CACHE, memory_budget=budget))


def tp_decode_two_plans(rank: int, world: int, plan_json: str, prefill_json: str, max_new: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from autopar.inference import LLM, SamplingParams
    llm = LLM(tiny_llama(), init_device_mesh("cpu", (world,)), plan=autopar.Plan.from_json(plan_json),
              prefill_plan=autopar.Plan.from_json(prefill_json), block_size=4, num_blocks=48)
    sg = llm.engine.runner.graph
    sg.bind(llm.engine.cache.k, llm.engine.cache.v)          # bound now: the graphs are wrapped below
    sg.bound = llm.engine.cache
    calls, reshards = {}, {}
    for name in ("multi", "decode", "single"):
        gm = getattr(sg, name)
        reshards[name] = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "reshard")

        def counted(*a, _gm=gm, _name=name):
            calls[_name] = calls.get(_name, 0) + 1
            return _gm(*a)
        setattr(sg, name, counted)
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    return {"tokens": [o.token_ids for o in outs], "calls": calls, "reshards": reshards,
            "cache_kv_heads": llm.engine.cache.k[0].shape[1]}


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_prefill_and_decode_run_their_own_plans(dist2):
    decode, prefill = _plan("2.18MiB"), _prefill_plan()
    # each the planner's choice: Megatron for the decode step under the tight budget, heads only for a 16-token
    # prefill under a looser one; both hold half the kv heads (they share the cache)
    assert _layer(decode)["o_proj"] == "S(1)" and _layer(prefill)["o_proj"] == "R"
    assert _layer(prefill)["q_proj"] == "S(0)"
    ref = one_device(10)
    for r in dist2.run(tp_decode_two_plans, decode.to_json(), prefill.to_json(), 10, timeout=180):
        assert r["tokens"] == ref and r["cache_kv_heads"] == 1
        assert r["reshards"] == {"multi": 2, "decode": 6, "single": 6}     # heads-only vs Megatron collectives
        assert r["calls"]["multi"] >= 1 and r["calls"]["decode"] >= 5      # prompt steps, then decode-only steps


MEGATRON = QKV | {"model.layers.*.self_attn.o_proj.weight": ["S(1)"], "model.layers.*.mlp.gate_proj.weight": ["S(0)"],
                  "model.layers.*.mlp.up_proj.weight": ["S(0)"], "model.layers.*.mlp.down_proj.weight": ["S(1)"]}


def biased_llama():
    """Biases on every projection: the column-parallel ones slice theirs, the row-parallel ones add theirs after the
    all-reduce."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   attention_bias=True, mlp_bias=True, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)              # non-zero, so a bias added twice or sliced wrong shows
    return model


def tp_decode_biased(rank: int, world: int, plan_json: str, max_new: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from autopar.inference import LLM, SamplingParams
    llm = LLM(biased_llama(), init_device_mesh("cpu", (world,)), plan=autopar.Plan.from_json(plan_json),
              block_size=4, num_blocks=48)
    assert llm.engine.runner.path == "graph"
    steps = record_steps(llm.engine)
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    return {"tokens": [o.token_ids for o in outs], "logits": torch.cat(steps)}


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_biased_projections_megatron_on_the_graph_path(dist2):
    from autopar.inference import Engine, EngineConfig, SamplingParams
    from autopar.inference.tensor_parallel import decode_inputs, decode_plan_options
    plan = autopar.plan(biased_llama(), decode_inputs(4), mesh_shape=(2,), cluster="cpu-gloo",
                        options=decode_plan_options(kv_cache_bytes=KV_CACHE, fix=MEGATRON))
    eng = Engine(biased_llama(), EngineConfig(block_size=4, num_blocks=48))
    steps = record_steps(eng)
    ref = [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))]
    for got in dist2.run(tp_decode_biased, plan.to_json(), 10, timeout=180):
        assert got["tokens"] == ref
        torch.testing.assert_close(got["logits"], torch.cat(steps), rtol=1e-4, atol=1e-5)   # every step's logits


def test_plans_tp_cannot_run_are_refused():
    plan = _plan(fix=QKV | {"model.norm.weight": ["S(0)"]})
    with pytest.raises(ConfigError, match=r"model\.norm\.weight"):
        decode_styles(tiny_llama(), plan, 2)
    training = autopar.plan(tiny_llama(), {"input_ids": torch.zeros(4, 1, dtype=torch.long)}, mesh_shape=(2,),
                            cluster="cpu-gloo")
    with pytest.raises(ConfigError, match="training=False|inference plan"):
        decode_styles(tiny_llama(), training, 2)
    with pytest.raises(autopar.MeshError, match="1-D mesh"):
        decode_styles(tiny_llama(), plan, 4)
    with pytest.raises(autopar.MeshError, match="needs the plan"):
        from autopar.inference import LLM
        LLM(tiny_llama(), mesh=object())
    from autopar.inference.step_graph import StepGraph
    from autopar.inference.tensor_parallel import decode_layouts
    with pytest.raises(ConfigError, match="share one KV cache"):     # replicated prefill, head-split decode
        StepGraph(tiny_llama(), layouts=decode_layouts(tiny_llama(), _plan("3MiB"), 2),
                  prefill_layouts=decode_layouts(tiny_llama(), _plan(), 2), mesh=None)
