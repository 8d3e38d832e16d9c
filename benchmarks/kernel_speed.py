"""Fused kernels vs eager PyTorch and torch.compile on one GPU: GB/s, fraction of HBM peak, speed ratios.

    python benchmarks/kernel_speed.py [--hbm-gbs 4800] [--dtype bf16] [--rows 16384] [--hidden 4096]

For each runtime kernel, forward and forward+backward (only the inputs that train get gradients:
not rotary's cos/sin; fixed upstream gradients), times the fused kernel, the eager expression it
replaces and ``torch.compile`` of that expression. GPU time is the median per call inside a CUDA
graph of back-to-back calls (``triton.testing.do_bench_cudagraph``: no Python launch overhead,
which a training step hides behind queued GPU work); the launched column repeats the ratio to
torch.compile with every call launched from Python (``triton.testing.do_bench``). Reports the
fused kernel's achieved bandwidth (bytes it must move / GPU time), that bandwidth as a fraction of
``--hbm-gbs`` (default: H200, 4.8 TB/s per its spec sheet), the speed ratios (>1: fused is
faster) and the largest error against eager relative to the output's magnitude. The kernels
autotune their launch configuration at the first call per shape; the choices are recorded. Targets (issue 7): >= 1.0x torch.compile and >= 80 % of HBM peak for the
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
    """(name, fused fn, eager fn, inputs, indices of the inputs that train, bytes moved forward,
    bytes moved forward+backward). Bytes count what the pass must read and write at least: the
    activations in and out once (parameters and per-row statistics are negligible)."""
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
         (x, w, b), (0, 1, 2), 2 * n, 5 * n),
        ("rms_norm", lambda x, w: rk.rms_norm(x, (hidden,), w, 1e-6), lambda x, w: F.rms_norm(x, (hidden,), w, 1e-6),
         (x, w), (0, 1), 2 * n, 5 * n),
        ("add_norm", lambda x, r, w: rk.add_norm(x, r, w, 1e-6),
         lambda x, r, w: (F.rms_norm(x + r, (hidden,), w, 1e-6), x + r), (x, r, w), (0, 1, 2), 4 * n, 8 * n),
        ("bias_gelu", lambda x, b: rk.bias_gelu(x, b, "tanh"), lambda x, b: F.gelu(x + b, approximate="tanh"),
         (ff, torch.randn(ff.shape[-1], device=dev, dtype=dtype)), (0, 1), 2 * nf, 5 * nf),
        ("swiglu", rk.swiglu, lambda g, u: F.silu(g) * u, (ff, up), (0, 1), 3 * nf, 8 * nf),
        ("rotary", rk.rotary, lambda q, c, s: q * c + torch.cat((-q[..., d // 2:], q[..., :d // 2]), -1) * s,
         (q, cos, sin), (0,), 2 * nq, 4 * nq),
        ("cross_entropy", lambda z, t: rk.cross_entropy(z, t), lambda z, t: F.cross_entropy(z, t), (logits, tgt),
         (0,), nl, 3 * nl),
    ]


def _step(fn, args, train, backward: bool):
    """A closure running fn (and its backward against fixed upstream gradients, as ``autograd.grad``
    so nothing accumulates), plus what it returns on a first call: outputs and input gradients."""
    leaves = [a.detach().clone().requires_grad_(backward and i in train) for i, a in enumerate(args)]
    grads = None

    def step():
        nonlocal grads
        out = fn(*leaves)
        out = out if isinstance(out, tuple) else (out,)
        if not backward:
            return out
        if grads is None:   # fixed upstream gradients, made once (the first call is outside any timing)
            gen = torch.Generator(device=out[0].device).manual_seed(0)
            grads = [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in out]
        return out + torch.autograd.grad(out, [leaves[i] for i in train], grads)

    return step


def bench(step, cudagraph: bool) -> float:
    """Median seconds of one call: inside a CUDA graph of back-to-back calls (GPU time, no launch
    overhead) or eagerly launched with the L2 flushed between calls (``triton.testing.do_bench``)."""
    from triton.testing import do_bench, do_bench_cudagraph

    ms = do_bench_cudagraph(step, return_mode="median") if cudagraph else do_bench(step, return_mode="median")
    return ms / 1e3


def max_rel_error(got, want) -> float:
    """Largest |got - want| over max |want|, across all outputs and gradients."""
    return max(float((g.detach().float() - w.detach().float()).abs().max() / w.detach().float().abs().max().clamp_min(1e-30))
               for g, w in zip(got, want))


def tuned_configs() -> dict[str, str]:
    """The launch configuration each autotuned kernel settled on (for the record)."""
    import importlib

    out = {}
    for mod in ("layer_norm", "rms_norm", "add_norm", "bias_gelu", "swiglu", "rotary", "cross_entropy"):
        m = importlib.import_module(f"autopar.runtime_kernels.{mod}")
        for name, obj in vars(m).items():
            if name.endswith("_kernel") and getattr(obj, "best_config", None) is not None:
                out[name] = str(obj.best_config)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hbm-gbs", type=float, default=4800.0, help="HBM peak GB/s (H200: 4800)")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--no-graph", action="store_true",
                    help="time eager launches only (default: GPU time inside a CUDA graph, see above)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA: skipped (benchmarks/kernel_speed.py needs a GPU)")
        return 0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    rows = []
    print(f"{'kernel':<14} {'pass':<8} {'GB/s':>8} {'%HBM':>6} {'x eager':>8} {'x compile':>9} "
          f"{'launched x compile':>18} {'rel err':>8}", flush=True)
    for name, fused, eager, args, train, fwd_bytes, fb_bytes in cases(a.rows, a.hidden, a.vocab, dtype, "cuda"):
        compiled = None if a.no_compile else torch.compile(eager)
        for backward, nbytes in ((False, fwd_bytes), (True, fb_bytes)):
            steps = {k: _step(f, args, train, backward) for k, f in
                     (("fused", fused), ("eager", eager), ("compile", compiled)) if f is not None}
            try:
                err = max_rel_error(steps["fused"](), steps["eager"]())
                graph = {k: bench(st, cudagraph=not a.no_graph) for k, st in steps.items()}
                launched = {k: bench(st, cudagraph=False) for k, st in steps.items()}
            except Exception as exc:   # recorded, and the other kernels still run
                rows.append({"kernel": name, "pass": "fwd+bwd" if backward else "fwd",
                             "error": f"{type(exc).__name__}: {exc}"[:2000]})
                print(f"{name:<14} {rows[-1]['pass']:<8} FAILED {rows[-1]['error'][:300]}", flush=True)
                continue
            t_f = graph["fused"]
            gbs = nbytes / t_f / 1e9
            r = {"kernel": name, "pass": "fwd+bwd" if backward else "fwd", "bytes": nbytes,
                 "fused_s": t_f, "eager_s": graph["eager"], "compile_s": graph.get("compile"),
                 "launched_s": launched, "GB/s": gbs, "hbm_fraction": gbs / a.hbm_gbs,
                 "vs_eager": graph["eager"] / t_f,
                 "vs_compile": graph["compile"] / t_f if "compile" in graph else None,
                 "launched_vs_compile": launched["compile"] / launched["fused"] if "compile" in launched else None,
                 "max_rel_error_vs_eager": err}
            rows.append(r)   # printed as measured, so a run cut short still shows what it got
            vc = f"{r['vs_compile']:9.2f}" if r["vs_compile"] else f"{'-':>9}"
            lc = f"{r['launched_vs_compile']:18.2f}" if r["launched_vs_compile"] else f"{'-':>18}"
            print(f"{name:<14} {r['pass']:<8} {gbs:8.0f} {100 * r['hbm_fraction']:5.0f}% "
                  f"{r['vs_eager']:8.2f} {vc} {lc} {err:8.1e}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    info = machine(gpu=torch.cuda.get_device_name(), triton=__import__("triton").__version__)
    out = {"machine": info, "args": vars(a), "timing": "launched: triton.testing.do_bench (L2 flushed, launch "
           "overhead included); fused_s/eager_s/compile_s: " + ("the same" if a.no_graph else
           "triton.testing.do_bench_cudagraph (GPU time of back-to-back calls)") + "; medians",
           "tuned_configs": tuned_configs(), "results": rows}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
