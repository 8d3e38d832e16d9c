"""Continued pretraining of an HF LLaMA-architecture model on a local text corpus, with autopar.train.

    python examples/llama/train_llama.py --config examples/llama/tiny.toml                 # one process
    torchrun --standalone --nproc-per-node 2 examples/llama/train_llama.py --config examples/llama/tiny.toml
    python examples/llama/infer_llama.py --model examples/llama/runs/llama-tiny/hf --prompt "The harbor"

The job file names an HF model directory (``[model] source``). Nothing is downloaded: when that directory
does not exist, this script first creates a *randomly initialized* tiny LLaMA there, with a byte-level BPE
tokenizer trained on the job's corpus (``--init-only`` stops after that). For real continued pretraining
point ``model.source`` at a LLaMA checkpoint on local disk (``gpu.toml``). Each rank reads only its blocks
of the safetensors weights (``autopar.train.hf_io``); after the last step the trained model is exported as
an HF directory ``<checkpoint.dir>/hf`` that plain ``transformers`` (and ``infer_llama.py``) loads.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import tomllib
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig

import autopar
from autopar.models import BUILTIN_MODELS
from autopar.train import load_train_config, train
from autopar.train.config import parse_overrides
from autopar.train.data import documents
from autopar.train.hf_io import export_hf


def make_tiny_model(model_dir: Path, corpus: list[Path], *, vocab_size: int = 512, seed: int = 0) -> None:
    """A random 2-layer LLaMA and a BPE tokenizer trained on ``corpus``, saved as an HF directory (written
    to a temporary directory first and renamed, so other ranks never see it half-written)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(documents(corpus, "text")), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=fast.bos_token_id,
                                   eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    tmp = model_dir.with_name(model_dir.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp))          # safetensors
    fast.save_pretrained(str(tmp))
    os.replace(tmp, model_dir)


def ensure_model(model_dir: Path, corpus: list[Path]) -> None:
    """Create the random tiny model when ``model_dir`` does not exist (local rank 0; the others wait)."""
    if (model_dir / "config.json").is_file():
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"train_llama.py: creating a random tiny LLaMA and its tokenizer in {model_dir}", file=sys.stderr)
        make_tiny_model(model_dir, corpus)
    deadline = time.monotonic() + 300
    while not (model_dir / "config.json").is_file():
        if time.monotonic() > deadline:
            raise SystemExit(f"train_llama.py: {model_dir} was not created within 300 s")
        time.sleep(0.2)


def load_job(config: str, sets: list[str]):
    """The job, after creating its model directory when it is missing (the files it names are checked then)."""
    over = parse_overrides(sets)
    probe = load_train_config(config, {**over, "model.source": "llama-tiny", "data.kind": "synthetic"})
    source = over.get("model.source") or tomllib.loads(Path(config).read_text()).get("model", {}).get("source")
    if source and source not in BUILTIN_MODELS and ":" not in source:
        ensure_model(probe.path(source), [probe.path(p) for p in probe.data.paths])
    return load_train_config(config, over)


def main(argv: list[str] | None = None) -> dict[int, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).with_name("tiny.toml")))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of the job file (repeatable), e.g. --set training.steps=10")
    p.add_argument("--init-only", action="store_true", help="only create the random tiny model and tokenizer")
    args = p.parse_args(argv)
    cfg = load_job(args.config, args.set)
    if args.init_only:
        return {}
    result = train(cfg, parallelize=autopar.parallelize, apply=autopar.apply)
    if cfg.checkpoint.dir:
        model_dir = cfg.path(cfg.model.source)
        export_hf(result.module, cfg.path(cfg.checkpoint.dir) / "hf", AutoConfig.from_pretrained(str(model_dir)),
                  tokenizer_dir=model_dir)
    if (not dist.is_initialized() or dist.get_rank() == 0) and result.losses:
        steps = sorted(result.losses)
        print(f"steps {steps[0]}..{steps[-1]}: loss {result.losses[steps[0]]:.4f} -> {result.losses[steps[-1]]:.4f}")
    return result.losses


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # gloo's destructors sometimes abort a finished run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
