"""Paged attention: the torch reference against plain SDPA on unpaged K/V (decode and prefill chunks, GQA),
and the Triton paged-decode kernel against the reference through the Triton interpreter (in a subprocess
with TRITON_INTERPRET=1, so the variable does not leak into other tests): shuffled non-contiguous block
ids, odd lengths, GQA, fp32 and bf16, split-KV.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autopar.runtime_kernels.paged_attention import (
    paged_attention,
    paged_attention_reference,
    paged_decode_reference,
    write_kv,
)


def _paged_setup(lens, H, Hkv, D, bs, dtype, seed=0):
    """Random K/V per sequence, written into a cache at shuffled block ids; returns the unpaged K/V too."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-L // bs) for L in lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()      # physical blocks in random order
    k_cache = torch.zeros(num_blocks, Hkv, bs, D, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    ks, vs = [], []
    for i, L in enumerate(lens):
        blocks = [perm.pop() for _ in range(need[i])]
        tables[i, :need[i]] = torch.tensor(blocks)
        k = torch.randn(L, Hkv, D, generator=g).to(dtype)
        v = torch.randn(L, Hkv, D, generator=g).to(dtype)
        slots = torch.tensor([blocks[t // bs] * bs + t % bs for t in range(L)])
        write_kv(k_cache, v_cache, k, v, slots)
        ks.append(k)
        vs.append(v)
    return k_cache, v_cache, tables, ks, vs


def _sdpa_unpaged(q, k, v, scale):
    """q [q_len, H, D] the last q_len tokens of a sequence with K/V [L, Hkv, D]: plain causal SDPA."""
    rep = q.shape[1] // k.shape[1]
    L, q_len = k.shape[0], q.shape[0]
    mask = torch.ones(L, L, dtype=torch.bool).tril()[L - q_len:]
    qq = q.transpose(0, 1)[None]
    kk = k.transpose(0, 1)[None].repeat_interleave(rep, 1)
    vv = v.transpose(0, 1)[None].repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)[0].transpose(0, 1)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 1)])
def test_reference_matches_unpaged_sdpa(H, Hkv):
    D, bs = 8, 4
    lens, q_lens = [1, 7, 13, 16, 9], [1, 1, 5, 16, 3]           # decode rows, prefill chunks, a whole prompt
    k_cache, v_cache, tables, ks, vs = _paged_setup(lens, H, Hkv, D, bs, torch.float32)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lens), H, D, generator=g)
    scale = D ** -0.5
    expect, start = [], 0
    for k, v, n in zip(ks, vs, q_lens):
        expect.append(_sdpa_unpaged(q[start:start + n], k, v, scale))
        start += n
    expect = torch.cat(expect)
    lens_t, ql_t = torch.tensor(lens), torch.tensor(q_lens)
    ref = paged_attention_reference(q, k_cache, v_cache, tables, lens_t, ql_t, scale)
    torch.testing.assert_close(ref, expect, rtol=1e-5, atol=1e-6)
    got = paged_attention(q, k_cache, v_cache, tables, lens_t, ql_t, scale)   # batched decode + per-seq prefill
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    dec = [i for i, n in enumerate(q_lens) if n == 1]
    rows = [sum(q_lens[:i]) for i in dec]
    got_dec = paged_decode_reference(q[rows], k_cache, v_cache, tables[dec], lens_t[dec], scale)
    torch.testing.assert_close(got_dec, expect[rows], rtol=1e-5, atol=1e-6)


# --- Triton interpreter -------------------------------------------------------------------------
CASES = [(dt, H, Hkv, splits) for dt in ("float32", "bfloat16") for H, Hkv, splits in ((4, 2, 1), (4, 1, 3), (2, 2, 2))]


def _interpret_main() -> None:
    """Runs in the subprocess: the kernel against the reference for every case; prints JSON records."""
    from autopar.runtime_kernels.paged_attention import paged_decode
    out = {}
    for dt, H, Hkv, splits in CASES:
        dtype = getattr(torch, dt)
        D, bs = 12, 4                                               # D not a power of two: masked lanes
        lens = [1, 5, 11, 4]
        k_cache, v_cache, tables, _, _ = _paged_setup(lens, H, Hkv, D, bs, dtype, seed=H + splits)
        q = torch.randn(len(lens), H, D, generator=torch.Generator().manual_seed(3)).to(dtype)
        scale = D ** -0.5
        got = paged_decode(q, k_cache, v_cache, tables, torch.tensor(lens), scale, num_splits=splits)
        ref = paged_decode_reference(q.float(), k_cache.float(), v_cache.float(), tables, torch.tensor(lens), scale)
        out[f"{dt}-H{H}-kv{Hkv}-s{splits}"] = {"err": (got.float() - ref).abs().max().item(),
                                               "dtype": str(got.dtype)}
    out["engine"] = _interpreted_engine()
    print("RESULT" + json.dumps(out))


def _interpreted_engine() -> dict:
    """The engine's decode rows through the interpreted kernel: greedy tokens against HF generate."""
    import transformers

    import autopar.runtime_kernels.paged_attention as pa
    from autopar.inference import Engine, EngineConfig, SamplingParams
    calls = []
    kernel = pa.paged_decode

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return kernel(*args, **kwargs)
    pa.paged_decode = counted
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    prompts = [[5, 9, 3], [7] * 9]
    ref = [model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    outs = Engine(model, EngineConfig(block_size=4, num_blocks=16, num_splits=2)).generate(
        prompts, SamplingParams(max_new_tokens=5, ignore_eos=True))
    return {"equal": [o.token_ids for o in outs] == ref, "kernel_calls": len(calls)}


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton", reason="Triton is not installed: the kernel cannot be interpreted")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import test_paged_attention as t; t._interpret_main()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("case", [f"{dt}-H{H}-kv{Hkv}-s{s}" for dt, H, Hkv, s in CASES])
def test_triton_paged_decode_interpreted(interpreted, case):
    rec = interpreted[case]
    dtype = case.split("-")[0]
    assert rec["dtype"] == f"torch.{dtype}"
    assert rec["err"] < (1e-5 if dtype == "float32" else 2e-2), rec


def test_engine_decodes_through_the_interpreted_kernel(interpreted):
    rec = interpreted["engine"]
    assert rec["kernel_calls"] >= 4 and rec["equal"], rec
