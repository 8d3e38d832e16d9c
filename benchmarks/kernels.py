"""Fused kernels vs eager PyTorch and torch.compile on one GPU: GB/s, fraction of HBM peak, speed ratios.

    python benchmarks/kernels.py [--hbm-gbs 4800] [--dtype bf16] [--rows 16384] [--hidden 4096]

For each runtime kernel, forward and forward+backward, times (CUDA events, median of repeats) the
fused kernel, the eager expression it replaces and ``torch.compile`` of that expression, and
reports the fused kernel's achieved bandwidth (bytes it must move / time), that bandwidth as a
fraction of ``--hbm-gbs`` (default: H200, 4.8 TB/s per its spec sheet), and the speed ratios
(>1: fused is faster). Targets (issue 7): >= 1.0x torch.compile and >= 80 % of HBM peak for the
memory-bound kernels. Writes benchmarks/results/kernels.json with machine info. Without CUDA it
prints "no CUDA: skipped" and exits 0. Not a test.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"


def cases(rows: int, hidden: int, vocab: int, dtype: torch.dtype, dev: str):
    """(name, fused fn, eager fn, inputs, bytes moved forward, bytes moved forward+backward)."""
    import autopar.runtime_kernels as rk

    e = torch.finfo(dtype).bits // 8
    x = torch.randn(rows, hidden, device=dev, dtype=dtype)
    r = torch.randn_like(x)
    w, b = torch.randn(hidden, device=dev, dtype=dtype), torch.randn(hidden, device=dev, dtype=dtype)
    ff = torch.randn(rows, 4 * hidden // 2, device=dev, dtype=dtype)
    up = torch.randn_like(ff)
    heads, d = 32, 128
    q = torch.randn(rows // 512 or 1, heads, 512, d, device=dev, dtype=dtype)
    cos, sin = torch.randn(512, d, device=dev, dtype=dtype), torch.randn(512, d, device=dev, dtype=dtype)
    logits = torch.randn(rows // 4, vocab, device=dev, dtype=dtype)
    tgt = torch.randint(0, vocab, (rows // 4,), device=dev)
    n, nf, nq, nl = x.numel() * e, ff.numel() * e, q.numel() * e, logits.numel() * e
    return [
        ("layer_norm", lambda x, w, b: rk.layer_norm(x, (hidden,), w, b), lambda x, w, b: F.layer_norm(x, (hidden,), w, b),
         (x, w, b), 2 * n, 5 * n),
        ("rms_norm", lambda x, w: rk.rms_norm(x, (hidden,), w, 1e-6), lambda x, w: F.rms_norm(x, (hidden,), w, 1e-6),
         (x, w), 2 * n, 5 * n),
        ("add_norm", lambda x, r, w: rk.add_norm(x, r, w, 1e-6),
         lambda x, r, w: (F.rms_norm(x + r, (hidden,), w, 1e-6), x + r), (x, r, w), 4 * n, 8 * n),
        ("bias_gelu", lambda x, b: rk.bias_gelu(x, b, "tanh"), lambda x, b: F.gelu(x + b, approximate="tanh"),
         (ff, torch.randn(ff.shape[-1], device=dev, dtype=dtype)), 2 * nf, 5 * nf),
        ("swiglu", rk.swiglu, lambda g, u: F.silu(g) * u, (ff, up), 3 * nf, 8 * nf),
        ("rotary", rk.rotary, lambda q, c, s: q * c + torch.cat((-q[..., d // 2:], q[..., :d // 2]), -1) * s,
         (q, cos, sin), 2 * nq, 4 * nq),
        ("cross_entropy", lambda z, t: rk.cross_entropy(z, t), lambda z, t: F.cross_entropy(z, t), (logits, tgt),
         nl, 3 * nl),
    ]


def bench(fn, args, backward: bool, reps: int = 50) -> float:
    """Median seconds of one call (and its backward) over reps, after warm-up."""
    leaves = [a.detach().clone().requires_grad_(backward and a.is_floating_point()) for a in args]

    def step():
        out = fn(*leaves)
        if backward:
            out = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward([o for o in out], [torch.ones_like(o) for o in out])

    for _ in range(5):
        step()
    times = []
    for _ in range(reps):
        s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        t.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(t) / 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hbm-gbs", type=float, default=4800.0, help="HBM peak GB/s (H200: 4800)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA: skipped (benchmarks/kernels.py needs a GPU)")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    rows = []
    print(f"{'kernel':<14} {'pass':<8} {'GB/s':>8} {'%HBM':>6} {'x eager':>8} {'x compile':>9}", flush=True)
    for name, fused, eager, args, fwd_bytes, fb_bytes in cases(a.rows, a.hidden, a.vocab, dtype, "cuda"):
        compiled = None if a.no_compile else torch.compile(eager)
        for backward, nbytes in ((False, fwd_bytes), (True, fb_bytes)):
            t_f, t_e = bench(fused, args, backward), bench(eager, args, backward)
            t_c = bench(compiled, args, backward) if compiled is not None else None
            gbs = nbytes / t_f / 1e9
            rows.append({"kernel": name, "pass": "fwd+bwd" if backward else "fwd", "fused_s": t_f, "eager_s": t_e,
                         "compile_s": t_c, "GB/s": gbs, "hbm_fraction": gbs / a.hbm_gbs,
                         "vs_eager": t_e / t_f, "vs_compile": (t_c / t_f) if t_c else None})
            r = rows[-1]   # printed as measured, so a run cut short still shows what it got
            vc = f"{r['vs_compile']:9.2f}" if r["vs_compile"] else f"{'-':>9}"
            print(f"{r['kernel']:<14} {r['pass']:<8} {r['GB/s']:8.0f} {100 * r['hbm_fraction']:5.0f}% "
                  f"{r['vs_eager']:8.2f} {vc}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    info = machine(gpu=torch.cuda.get_device_name(), triton=__import__("triton").__version__)
    RESULTS.write_text(json.dumps({"machine": info, "args": vars(a), "results": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
