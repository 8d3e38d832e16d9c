"""Generate text with the model train_llama.py exported (an HF directory: weights, config, tokenizer).

    python examples/llama/infer_llama.py --model examples/llama/runs/llama-tiny/hf --prompt "The harbor"

``--engine autopar`` uses autopar's inference engine (``autopar.inference.api.LLM``: paged KV cache,
continuous batching); ``--engine hf`` plain ``transformers`` ``generate``; ``auto`` (default) the first that
imports. Greedy decoding by default (``--temperature`` > 0 samples, seeded), so both engines give the
same tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def generate_hf(model_dir: Path, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int
                ) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    out = []
    for text in prompts:
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        torch.manual_seed(seed)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                 top_p=None, top_k=None, pad_token_id=tok.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def generate_autopar(model_dir: Path, prompts: list[str], *, max_new_tokens: int, temperature: float, seed: int
                     ) -> list[list[int]]:
    from autopar.inference.api import LLM
    from autopar.inference.sampling import SamplingParams

    llm = LLM(str(model_dir))
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    return [c.token_ids for c in llm.generate(prompts, params)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(Path(__file__).parent / "runs" / "llama-tiny" / "hf"),
                   help="an HF model directory (train_llama.py writes <checkpoint.dir>/hf)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["auto", "autopar", "hf"], default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    args = p.parse_args(argv)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"infer_llama.py: {model_dir} is not an HF model directory; run train_llama.py first")
    prompts = args.prompt or ["The harbor"]
    engine = args.engine
    if engine == "auto":
        try:
            from autopar.inference.api import LLM  # noqa: F401
            engine = "autopar"
        except ImportError:
            engine = "hf"
    gen = generate_autopar if engine == "autopar" else generate_hf
    ids = gen(model_dir, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    rows = [{"engine": engine, "prompt": p_, "token_ids": t, "text": tok.decode(t)} for p_, t in zip(prompts, ids)]
    for r in rows:
        print(json.dumps(r) if args.json else f"[{engine}] {r['prompt']}{r['text']}", flush=True)
    return rows


if __name__ == "__main__":
    main()
    sys.stdout.flush()
