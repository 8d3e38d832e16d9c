"""The paged-attention codegen pass on captured graphs (autopar.codegen.paged_attention_pass, driven by
autopar.inference.step_graph): every SDPA of HF LLaMA (GQA) / GPT-2 / Mistral / Qwen2 (MQA) and of autopar's
built-in GPT and Llama becomes the paged op, with the GQA repeat and the mask construction gone, and the
rewritten graph's logits equal the model's own forward (fp32 rtol 1e-4, atol 1e-5); the custom op
against SDPA on unpaged K/V (repeated and unrepeated K/V write the same cache) and through torch's opcheck; the
one-token graph serves a lone decode; refusals (non-causal, dropout, no SDPA); the attention-interface fallback.
Greedy equality with HF generate on the graph path is tests/test_inference_engine.py's (and builtin's)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autopar.codegen.paged_attention_pass import PAGED, SDPA, swap_paged_attention
from autopar.core.errors import CaptureError
from autopar.inference import Engine, EngineConfig, SamplingParams
from autopar.models import build_model
from autopar.runtime_kernels.paged_attention import paged_attention_op

transformers = pytest.importorskip("transformers")
from test_inference_engine import (
    hf_greedy,
    prompts_of,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
)

aten = torch.ops.aten


def _builtin(spec):
    torch.manual_seed(0)
    return build_model(spec, batch=1, seq=8, device="cpu")[0].eval()


FAMILIES = {"llama-gqa": (tiny_llama, 2), "gpt2": (tiny_gpt2, 4), "mistral": (tiny_mistral, 2),
            "qwen2-mqa": (tiny_qwen2, 1), "builtin-gpt": (lambda: _builtin("gpt-tiny"), 4),
            "builtin-llama": (lambda: _builtin("llama-tiny"), 2)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_attention_is_swapped_the_mask_code_is_gone_and_logits_are_exact(family):
    make, kv_heads = FAMILIES[family]
    eng = Engine(make(), EngineConfig(block_size=4, num_blocks=16))
    assert eng.runner.path == "graph"
    assert eng.cache.k[0].shape[1] == kv_heads                       # only kv heads are cached
    for gm in (eng.runner.graph.multi, eng.runner.graph.single):
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        paged = [n for n in calls if n.target is PAGED]
        assert len(paged) == gm.paged_layers == 2 and not [n for n in calls if n.target is SDPA]
        # the layer's cache is a constant of the graph, the step metadata are graph inputs
        assert [n.args[3].target for n in paged] == ["paged_k_cache_0", "paged_k_cache_1"]
        inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        assert inputs[-4:] == ["slot_mapping", "block_tables", "seq_lens", "query_lens"]
        # the K/V reach the op unrepeated (repeat_kv dead) and no mask is built: no expand, diff, le, arange
        assert all(n.args[1].meta["val"].shape[1] == kv_heads for n in paged)
        left = {n.target for n in calls} & {aten.expand.default, aten.diff.default, aten.le.Tensor, aten.arange.default,
                                            aten.repeat_interleave.self_int, aten.new_ones.default}
        assert not left, left
        if family.startswith("builtin"):
            assert inputs[1:3] == ["positions", "keep"]

    # the rewritten graph's logits equal the model's own forward on each whole sequence (a prefill step, then a
    # decode step)
    model, steps = eng.runner.model, []
    execute = eng.runner.execute
    eng.runner.execute = lambda *a: steps.append(execute(*a)) or steps[-1]
    prompts = prompts_of([5, 9])
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert len(steps) == 2
    with torch.no_grad():
        for step, extra in ((0, 0), (1, 1)):
            seqs = [p + o.token_ids[:extra] for p, o in zip(prompts, outs)]
            want = []
            for seq in seqs:
                out = model(torch.tensor([seq]))
                want.append((out if torch.is_tensor(out) else out.logits)[0, -1])
            torch.testing.assert_close(steps[step], torch.stack(want).float(), rtol=1e-4, atol=1e-5)


def test_a_lone_decoding_sequence_runs_the_one_token_graph():
    model = tiny_llama()
    prompt = prompts_of([6])[0]
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=16))
    calls = {"single": 0, "multi": 0}
    sg = eng.runner.graph
    sg.bind(eng.cache.k, eng.cache.v)          # bound now: the graphs are wrapped below
    sg.bound = eng.cache
    for name in calls:
        gm = getattr(eng.runner.graph, name)

        def counted(*a, _gm=gm, _name=name):
            calls[_name] += 1
            return _gm(*a)
        setattr(eng.runner.graph, name, counted)
    out = eng.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(model, [prompt], 8)[0]
    assert calls == {"multi": 1, "single": 7}                       # the prompt, then one token per step


def _paged(k, v, block_size, num_blocks, table):
    """Unpaged [1, Hkv, L, D] K/V -> cache blocks of one sequence at block ids ``table``."""
    _, hkv, L, d = k.shape
    kc = torch.zeros(num_blocks, hkv, block_size, d)
    vc = torch.zeros_like(kc)
    slots = torch.tensor([table[t // block_size] * block_size + t % block_size for t in range(L)])
    return kc, vc, slots


@pytest.mark.parametrize("repeated", [False, True], ids=["kv-heads", "repeated-kv"])
def test_op_equals_causal_sdpa_and_writes_only_kv_heads(repeated):
    torch.manual_seed(0)
    H, Hkv, L, D, bs = 4, 2, 11, 8, 4
    q, k, v = torch.randn(1, H, L, D), torch.randn(1, Hkv, L, D), torch.randn(1, Hkv, L, D)
    table = [5, 2, 7]                                               # shuffled, non-contiguous blocks
    kc, vc, slots = _paged(k, v, bs, 8, table)
    kin, vin = (t.repeat_interleave(H // Hkv, 1) if repeated else t for t in (k, v))
    meta = (slots, torch.tensor([table], dtype=torch.int32), torch.tensor([L]), torch.tensor([L]))
    out = paged_attention_op(q, kin, vin, kc, vc, *meta, D ** -0.5)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    for t in range(L):                                              # the cache holds the kv heads, unrepeated
        blk, off = table[t // bs], t % bs
        torch.testing.assert_close(kc[blk, :, off], k[0, :, t])
        torch.testing.assert_close(vc[blk, :, off], v[0, :, t])


def test_op_passes_torch_opcheck():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    kc, vc, slots = _paged(k, v, 4, 4, [1, 3])
    meta = (slots, torch.tensor([[1, 3]], dtype=torch.int32), torch.tensor([3]), torch.tensor([3]))
    torch.library.opcheck(PAGED, (q, k, v, kc, vc, *meta, 0.35, 1),
                          test_utils=("test_schema", "test_faketensor"))


class _Attn(torch.nn.Module):
    def __init__(self, causal=True, dropout=0.0, sdpa=True):
        super().__init__()
        self.emb, self.proj = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 24)
        self.causal, self.dropout, self.sdpa = causal, dropout, sdpa

    def forward(self, idx):
        q, k, v = self.proj(self.emb(idx)).view(1, idx.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        if not self.sdpa:
            return (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=self.dropout)


@pytest.mark.parametrize("kw,match", [({"causal": False}, "not causal"), ({"dropout": 0.1}, "dropout"),
                                      ({"sdpa": False}, "attn_implementation='sdpa'")])
def test_pass_refuses_what_a_kv_cache_cannot_serve(kw, match):
    ep = torch.export.export(_Attn(**kw), (torch.zeros(1, 5, dtype=torch.long),), strict=False)
    with pytest.raises(CaptureError, match=match):
        swap_paged_attention(ep.module())


def test_uncapturable_hf_model_falls_back_to_the_attention_interface(monkeypatch, caplog):
    from autopar.inference import runner

    def fail(*a, **k):
        raise CaptureError("capture refused for this test")
    monkeypatch.setattr(runner, "StepGraph", fail)
    model = tiny_llama()
    prompts = prompts_of([3, 9])
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=16))
    assert eng.runner.path == "interface" and "attention interface" in caplog.text
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_greedy(model, prompts, 6)
    with pytest.raises(CaptureError):
        Engine(model, EngineConfig(block_size=4, num_blocks=16, runner_path="graph"))
