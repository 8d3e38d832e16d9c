"""The ``autopar generate`` and ``autopar serve`` subcommands (argument parsing and printing only)."""
from __future__ import annotations

import argparse
import json

from autopar.core.errors import ConfigError
from autopar.core.options import parse_bytes
from autopar.inference.api import LLM
from autopar.inference.sampling import SamplingParams
from autopar.inference.server import serve


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF model directory (config.json + weights); never downloads")
    p.add_argument("--tokenizer", help="local tokenizer directory (default: the model directory's, if it has one)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    p.add_argument("--num-blocks", type=int, help="KV-cache blocks (default: from --kv-cache-bytes)")
    p.add_argument("--kv-cache-bytes", default="256MiB", help="KV-cache budget, e.g. 2GiB (default 256MiB)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="most sequences per step (default 32)")


def _llm(args: argparse.Namespace) -> LLM:
    return LLM(args.model, tokenizer=args.tokenizer, block_size=args.block_size, num_blocks=args.num_blocks,
               kv_cache_bytes=parse_bytes(args.kv_cache_bytes), max_num_seqs=args.max_num_seqs)


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompt) + [[int(t) for t in s.split(",") if t.strip()] for s in args.prompt_ids]
    if not prompts:
        raise ConfigError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop_token_ids=tuple(args.stop_token_id), ignore_eos=args.ignore_eos)
    outs = _llm(args).generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "token_ids": out.token_ids, "text": out.text,
                              "finish_reason": out.finish_reason, "error": out.error}))
        elif out.error:
            print(f"error: {out.error}")
        else:
            print(out.text if out.text is not None else " ".join(map(str, out.token_ids)))
    return 0 if all(o.error is None for o in outs) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    serve(_llm(args), host=args.host, port=args.port, model_name=args.model_name)
    return 0


def add_inference_commands(sub) -> None:
    g = sub.add_parser("generate", help="complete prompts with a local HF model (paged KV cache, continuous "
                                        "batching); prints one completion per line")
    _engine_args(g)
    g.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable; needs a tokenizer)")
    g.add_argument("--prompt-ids", action="append", default=[], metavar="1,2,3",
                   help="a prompt as comma-separated token ids (repeatable)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop at this token (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt (token ids, text, finish reason)")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, SSE streaming); needs the "
                                     "'serve' extra (FastAPI, uvicorn)")
    _engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", default="autopar", help="the name /v1/models reports")
    s.set_defaults(func=cmd_serve)
