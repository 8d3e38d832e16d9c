"""The engine end to end on random tiny HF models built from config (no downloads): greedy outputs equal HF
``generate`` token for token on the engine's graph path (LLaMA with GQA, GPT-2, Mistral, Qwen2 with MQA; prompts of different lengths, chunked prefill),
a flood of more requests than the cache holds (all complete, FCFS admission, preemption by recompute,
outputs equal running alone), prefix sharing, stopping, streaming and bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from autopar.core.errors import AutoparError
from autopar.inference import Engine, EngineConfig, RequestError, SamplingParams, SamplingParamsError

transformers = pytest.importorskip("transformers")

VOCAB = 96


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompts, max_new):
    """HF generate, one prompt at a time (no padding), EOS off."""
    outs = []
    for p in prompts:
        o = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(o[0, len(p):].tolist())
    return outs


def tiny_mistral(seed=0):
    torch.manual_seed(seed)
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=None)).eval()


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=128)).eval()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_mistral, tiny_qwen2],
                         ids=["llama-gqa", "gpt2", "mistral", "qwen2-mqa"])
def test_greedy_equals_hf_generate(make):
    model = make()
    prompts = prompts_of([3, 11, 26, 1, 40])
    ref = hf_greedy(model, prompts, 24)
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=80, prefill_chunk=8, max_tokens_per_step=24))
    assert eng.runner.path == "graph"                   # the captured graph, attention swapped by the codegen pass
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in outs] == ref
    assert all(o.finish_reason == "length" for o in outs)
    assert eng.blocks.num_free == 80                    # every block back
    assert eng.steps < 5 * 24                           # batched, not one request after another


def test_flood_more_requests_than_cache():
    model = tiny_llama(seed=2)
    prompts = prompts_of([5, 19, 8, 30, 12, 3, 22, 9, 16, 27], seed=3)
    params = [SamplingParams(max_new_tokens=20, ignore_eos=True)] * 9 + [
        SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)]
    alone = []
    for p, sp in zip(prompts, params):
        eng1 = Engine(model, EngineConfig(block_size=4, num_blocks=64, prefix_sharing=False))
        alone.append(eng1.generate([p], [sp])[0].token_ids)
    # 24 blocks x 4 = 96 slots; the requests need ~330 slots in all
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=24, max_num_seqs=8, max_tokens_per_step=32,
                                     prefill_chunk=16))
    outs = eng.generate(prompts, params)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 20 for o in outs)
    assert [o.token_ids for o in outs] == alone
    assert eng.admission_order == list(range(len(prompts)))     # FCFS
    assert sum(o.num_preemptions for o in outs) > 0              # blocks ran out: preempted and recomputed
    assert eng.blocks.num_free == 24
    st = eng.kv_stats
    assert st.steps == eng.steps and st.peak_allocated_slots == 96     # the whole cache was in use
    assert 0 <= st.waste_aggregate <= st.waste_max < 1 and st.used_slots <= st.allocated_slots


def test_prefix_sharing_skips_shared_tokens():
    model = tiny_llama()
    common = prompts_of([16])[0]
    a, b = common + [5, 6, 7], common + [9, 10]
    ref = hf_greedy(model, [a, b], 6)
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=32))
    out_a = eng.generate([a], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    computed = eng.computed_tokens
    rid = eng.add_request(a, SamplingParams(max_new_tokens=30, ignore_eos=True))   # holds the prefix blocks
    eng.step()
    rid_b = eng.add_request(b, SamplingParams(max_new_tokens=6, ignore_eos=True))
    before = eng.computed_tokens
    while eng._seqs[rid_b].finish_reason is None:
        eng.step()
    out_b = eng.output(rid_b)
    assert [out_a.token_ids, out_b.token_ids] == ref
    assert computed == len(a) + 5
    # b computed its 2 own prompt tokens + 5 decode rows, a its decode rows; the 16 shared tokens were not run
    assert eng.computed_tokens - before == (2 + 5) + (6 * 1)
    eng.abort(rid)
    assert eng.blocks.num_free == 32


def test_parallel_samples_share_the_prompt_and_copy_on_write():
    model = tiny_llama()
    prompt = prompts_of([10])[0]                         # 10 tokens, blocks of 4: the last block is shared half full
    sp = SamplingParams(max_new_tokens=9, temperature=1.0, top_k=20, seed=7, ignore_eos=True)
    alone = []
    for seed in (7, 8, 9):
        e = Engine(model, EngineConfig(block_size=4, num_blocks=32))
        alone.append(e.generate([prompt], [dataclasses.replace(sp, seed=seed)])[0].token_ids)
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=32))
    ids = eng.add_parallel(prompt, sp, 3)
    eng.step()                                          # the prompt, once; then the samples fork its table
    parent_table = eng.blocks.tables[ids[0]]
    assert all(eng.blocks.tables[i] == parent_table for i in ids)
    assert [eng.blocks.refcount[b] for b in parent_table] == [3, 3, 3]
    assert eng.blocks.num_free == 32 - 3
    while eng.has_unfinished():
        eng.step()
    assert [eng.output(i).token_ids for i in ids] == alone
    assert eng.block_copies == 2                        # two of three writers copied the shared last block
    assert eng.computed_tokens == len(prompt) + 3 * 8
    assert eng.blocks.num_free == 32


def test_stop_ids_eos_and_streaming():
    model = tiny_llama()
    p = prompts_of([7])[0]
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=32))
    full = eng.generate([p], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids
    stop = full[4]
    cut = eng.generate([p], SamplingParams(max_new_tokens=12, stop_token_ids=(stop,), ignore_eos=True))[0]
    assert cut.token_ids == full[:full.index(stop) + 1] and cut.finish_reason == "stop"
    eos_eng = Engine(model, EngineConfig(block_size=4, num_blocks=32), eos_token_id=full[2])
    assert eos_eng.generate([p], SamplingParams(max_new_tokens=12))[0].token_ids == full[:full.index(full[2]) + 1]
    assert list(eng.stream(p, SamplingParams(max_new_tokens=12, ignore_eos=True))) == full
    it = eng.stream(p, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert [next(it), next(it)] == full[:2]
    assert eng.blocks.num_free < 32
    it.close()                                          # the consumer goes away: blocks freed
    assert eng.blocks.num_free == 32


def test_bad_requests_fail_alone():
    model = tiny_gpt2()
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=10))   # 40 slots
    good = prompts_of([5, 6])
    outs = eng.generate([good[0], list(range(3, 60)), good[1]], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert outs[1].finish_reason == "error" and "whole KV cache" in outs[1].error
    assert [o.token_ids for o in (outs[0], outs[2])] == hf_greedy(model, good, 5)
    big = Engine(model, EngineConfig(block_size=4, num_blocks=100))
    with pytest.raises(RequestError, match="model's context"):
        big.add_request([3] * 128)
    with pytest.raises(RequestError, match="vocabulary"):
        big.add_request([VOCAB + 1])
    with pytest.raises(SamplingParamsError):
        big.add_request([3], SamplingParams(top_p=2.0))
    with pytest.raises(AutoparError, match="HF causal LMs"):
        Engine(torch.nn.Linear(2, 2))
