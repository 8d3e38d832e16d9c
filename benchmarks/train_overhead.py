"""Overhead of ``autopar train``'s loop in one process against a plain PyTorch loop: tokens/s side by side.

Both train the same model (autopar's built-in LLaMA code at a CPU-friendly size, the same seeded weights) on
the same synthetic token stream with the same step: AdamW (decay on matrices only), global-norm clipping,
a learning-rate schedule, 2 micro-batches per step. ``autopar.train.train`` adds what a product loop does:
sample order and per-rank shares (``Loader``), JSONL metrics every step, grad-norm logging, the progress
bar off. Each run's time is measured from the end of its warm-up steps to the end of its last step (the
train loop's ``elapsed_s``, which includes its logging); runs alternate (plain, autopar, plain, ...) and the
medians are compared. Timings on a shared machine: compare the ratio, not the absolute numbers.

    python benchmarks/train_overhead.py [--repeats 5] [--steps 30] [--warmup 5]

Writes benchmarks/results/train_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

from autopar.models.llama import Llama, LlamaConfig
from autopar.train import load_train_config, lr_at, train
from autopar.train.data import SyntheticTokens
from autopar.train.model import Adapter

MODEL = {"vocab_size": 2048, "max_seq_len": 128, "n_layer": 4, "n_head": 8, "n_kv_head": 4, "d_model": 256, "d_ff": 704}
SEQ, BATCH, ACCUM = 128, 16, 2


def job(steps: int, metrics: Path):
    return load_train_config({
        "data": {"seq_len": SEQ, "num_sequences": 512}, "training": {"steps": steps, "global_batch": BATCH,
                                                                     "grad_accum": ACCUM},
        "optimizer": {"lr": 1e-3, "clip_grad_norm": 1.0}, "schedule": {"warmup_steps": 2},
        "logging": {"progress": False, "metrics_file": str(metrics)}})


def build() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(**MODEL))


def _autopar_run(steps: int):
    with tempfile.TemporaryDirectory() as d:
        cfg = job(steps, Path(d) / "metrics.jsonl")
        src = SyntheticTokens(vocab_size=MODEL["vocab_size"], seq_len=SEQ, num_sequences=512, seed=0)
        c0 = time.process_time()
        r = train(cfg, model=build(), source=src, adapter=Adapter("builtin", vocab_size=MODEL["vocab_size"]))
        return r, time.process_time() - c0


def run_autopar(steps: int, warmup: int) -> tuple[float, float]:
    """(tokens/s of wall time, tokens/s of CPU time) over the steps after ``warmup``. Wall time from the loop's
    own ``elapsed_s``; CPU time as the difference of a ``steps`` run and a ``warmup`` run (set-up cancels)."""
    r, cpu_all = _autopar_run(steps)
    _, cpu_warm = _autopar_run(warmup)
    el = {rec["step"]: rec["elapsed_s"] for rec in r.records}
    tokens = (steps - warmup) * BATCH * SEQ
    return tokens / (el[steps] - el[warmup]), tokens / (cpu_all - cpu_warm)


def run_plain(steps: int, warmup: int) -> tuple[float, float]:
    cfg = job(steps, Path("unused"))
    model = build()
    src = SyntheticTokens(vocab_size=MODEL["vocab_size"], seq_len=SEQ, num_sequences=512, seed=0)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    tokens = torch.as_tensor(src.tokens.astype("int64"))
    gen = torch.Generator().manual_seed(0)
    t_warm = c_warm = None
    mb = BATCH // ACCUM
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        idx = torch.randint(0, len(src), (BATCH,), generator=gen)
        rows = torch.stack([tokens[i * SEQ:i * SEQ + SEQ + 1] for i in idx.tolist()])
        for m in range(ACCUM):
            b = rows[m * mb:(m + 1) * mb]
            loss = model(idx=b[:, :-1], labels=b[:, 1:]) / ACCUM
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        if step + 1 == warmup:
            t_warm, c_warm = time.perf_counter(), time.process_time()
    tokens = (steps - warmup) * BATCH * SEQ
    return tokens / (time.perf_counter() - t_warm), tokens / (time.process_time() - c_warm)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_overhead.json"))
    args = p.parse_args()
    plain, mine, plain_cpu, mine_cpu = [], [], [], []
    for r in range(args.repeats):
        for out, cpu, fn in ((plain, plain_cpu, run_plain), (mine, mine_cpu, run_autopar)):
            wall, c = fn(args.steps, args.warmup)
            out.append(wall)
            cpu.append(c)
        print(f"repeat {r}: plain {plain[-1]:,.0f} tok/s ({plain_cpu[-1]:,.0f} per CPU-s)   autopar train "
              f"{mine[-1]:,.0f} tok/s ({mine_cpu[-1]:,.0f} per CPU-s)", flush=True)
    mp, ma = statistics.median(plain), statistics.median(mine)
    ratio = ma / mp
    cpu_ratio = statistics.median(mine_cpu) / statistics.median(plain_cpu)
    print(f"median: plain {mp:,.0f} tok/s, autopar train {ma:,.0f} tok/s, ratio {ratio:.3f} "
          f"({'within' if ratio >= 0.95 else 'NOT within'} 5 %); per CPU-second ratio {cpu_ratio:.3f}")
    out = {"benchmark": "train_overhead", "model": MODEL, "seq_len": SEQ, "global_batch": BATCH, "grad_accum": ACCUM,
           "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
           "plain_tokens_per_s": plain, "autopar_train_tokens_per_s": mine,
           "plain_tokens_per_cpu_s": plain_cpu, "autopar_train_tokens_per_cpu_s": mine_cpu,
           "median_plain": mp, "median_autopar_train": ma, "ratio": ratio, "within_5_percent": ratio >= 0.95,
           "cpu_ratio": cpu_ratio,
           "threads": torch.get_num_threads(), "machine": machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
