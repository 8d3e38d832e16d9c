"""What autopar's inference planning mode chooses for a LLaMA-3-8B-shaped model on 8 H100s (predicted, no GPU).

For decode steps (``batch`` sequences, one token) and a prefill chunk, bf16, with a KV cache of ``batch`` x 4096
tokens declared (``kv_cache_bytes``): the plan of ``autopar.plan(training=False)`` (the forward alone) beside
the training-mode plan of the same forward (which prices backward, gradients and AdamW states decoding never
has). Reports the placements of one block, the embedding and LM head, predicted step time, per-device memory
and solve time. The model is built on the meta device; nothing runs. Writes
``benchmarks/results/inference_plan.json``.

    python benchmarks/inference_plan.py [--batches 1 64] [--prefill 2048] [--mesh 8]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import machine

import autopar

RESULTS = Path(__file__).resolve().parent / "results" / "inference_plan.json"
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2     # layers x (K, V) x kv heads x head_dim x bf16


def llama8b():
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, use_cache=False)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def row(model, batch: int, tokens: int, mesh: int, training: bool) -> dict:
    x = {"input_ids": torch.zeros(batch, tokens, dtype=torch.long, device="meta")}
    kv = batch * 4096 * KV_BYTES_PER_TOKEN
    opts = {} if training else {"kv_cache_bytes": kv}
    t0 = time.perf_counter()
    try:
        plan = autopar.plan(model, x, mesh_shape=(mesh,), cluster="h100-sxm", training=training, **opts)
    except autopar.AutoparError as e:
        return {"batch": batch, "tokens": tokens, "mode": "training" if training else "inference",
                "error": f"{type(e).__name__}: {e}"}
    block = {k.split(".")[-2]: v[0] for k, v in plan.param_placements.items() if ".layers.0." in k}
    return {"batch": batch, "tokens": tokens, "mode": plan.mode, "kv_cache_bytes": kv if not training else 0,
            "step_time_s": plan.predicted.step_time_s, "time_breakdown": plan.predicted.time_breakdown,
            "peak_memory_bytes": plan.predicted.peak_memory_bytes, "memory_breakdown": plan.predicted.memory_breakdown,
            "block": block, "embed": plan.param_placements["model.embed_tokens.weight"][0],
            "lm_head": plan.param_placements["lm_head.weight"][0], "solve_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prefill", type=int, default=2048, help="tokens of one prefill chunk (batch 1); 0: none")
    ap.add_argument("--mesh", type=int, default=8)
    args = ap.parse_args()
    model = llama8b()
    shapes = [(b, 1) for b in args.batches] + ([(1, args.prefill)] if args.prefill else [])
    rows = []
    for batch, tokens in shapes:
        for training in (False, True):
            r = row(model, batch, tokens, args.mesh, training)
            rows.append(r)
            if "error" in r:
                print(f"batch {batch:4d} x {tokens:5d} {r['mode']:9s} {r['error'][:100]}")
                continue
            gib = {k: round(v / 2**30, 2) for k, v in r["memory_breakdown"].items() if v}
            print(f"batch {batch:4d} x {tokens:5d} {r['mode']:9s} {r['step_time_s'] * 1e3:8.3f} ms  "
                  f"{r['peak_memory_bytes'] / 2**30:6.2f} GiB {gib}  solve {r['solve_s']:.1f} s")
            print(f"    block {r['block']}  embed {r['embed']}  lm_head {r['lm_head']}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine(), "mesh": [args.mesh], "cluster": "h100-sxm",
                                   "model": "LLaMA-3-8B shape (HF LlamaForCausalLM, bf16, meta)", "rows": rows},
                                  indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
