"""Kernel-vs-reference checks for autopar.runtime_kernels (module level, importable by name).

``python -c "import kernel_checks; kernel_checks.main(OUT)"`` with ``TRITON_INTERPRET=1`` (and
tests/ on sys.path) runs every kernel through the Triton interpreter on the CPU and writes one
JSON record per case: whether the Triton path ran (the autograd node is the kernel's Function)
and, per output and gradient, the excess of the error over the tolerance (<= 0: within it).
References: fp32 cases compare with the torch function at fp32 tolerance (rtol 1e-4, atol 1e-5);
bf16 cases compare kernel and torch with the same bf16 inputs against the fp32 computation
(the interpreter truncates fp32 -> bf16, so the kernel may be one bf16 ulp off).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def excess(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    rtol, atol = TOL[dtype]
    a, b = a.detach().double(), b.detach().double()
    return float(((a - b).abs() - (atol + rtol * b.abs())).max())


def ran_kernel(t: torch.Tensor) -> bool:
    """Did t come out of one of runtime_kernels' autograd Functions (the Triton path)?"""
    todo, seen = [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.endswith("FunctionBackward"):
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def run_case(name, fn, ref, inputs, dtype, seed=0):
    """fn / ref: callables on the inputs returning one tensor or a tuple; the loss is a random
    projection of every output, so every output's gradient path is exercised."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    kernel = all(ran_kernel(o) for o in outs)
    gen = torch.Generator().manual_seed(seed)
    projections = [torch.randn(o.shape, generator=gen, dtype=torch.float32) for o in outs]
    sum(((o.float() * p).sum() for o, p in zip(outs, projections))).backward()
    # the reference computes in fp32 from the same (possibly bf16) inputs
    ref_leaves = [t.detach().clone().to(torch.float32 if t.is_floating_point() else t.dtype)
                  .requires_grad_(t.is_floating_point()) for t in inputs]
    ref_outs = ref(*ref_leaves)
    ref_outs = ref_outs if isinstance(ref_outs, tuple) else (ref_outs,)
    sum(((o.float() * p).sum() for o, p in zip(ref_outs, projections))).backward()
    errors = {f"out{i}": excess(o, r, dtype) for i, (o, r) in enumerate(zip(outs, ref_outs))}
    for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
        if a.requires_grad:
            errors[f"grad{i}"] = excess(a.grad, b.grad, dtype)
    return {"name": name, "kernel": kernel, "errors": errors,
            "dtypes": [str(o.dtype) for o in outs]}


def cases():
    """(name, public fn, reference, inputs, dtype) for every kernel: odd sizes, fp32 and bf16."""
    import autopar.runtime_kernels as rk

    g = torch.Generator().manual_seed(1)

    def rnd(*shape, dtype=torch.float32, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    out = []
    for dt in (torch.float32, torch.bfloat16):
        tag = str(dt).removeprefix("torch.")
        out.append((f"layer_norm-{tag}", lambda x, w, b: rk.layer_norm(x, (33,), w, b, 1e-5),
                    lambda x, w, b: F.layer_norm(x, (33,), w, b, 1e-5),
                    [rnd(5, 33, dtype=dt), rnd(33, dtype=dt), rnd(33, dtype=dt)], dt))
        out.append((f"rms_norm-{tag}", lambda x, w: rk.rms_norm(x, (33,), w, 1e-6),
                    lambda x, w: F.rms_norm(x, (33,), w, 1e-6), [rnd(5, 33, dtype=dt), rnd(33, dtype=dt)], dt))
        out.append((f"add_norm-{tag}", lambda x, r, w: rk.add_norm(x, r, w, 1e-6),
                    lambda x, r, w: (F.rms_norm(x + r, (33,), w, 1e-6), x + r),
                    [rnd(5, 33, dtype=dt), rnd(5, 33, dtype=dt), rnd(33, dtype=dt)], dt))
        for approx in ("none", "tanh"):
            out.append((f"bias_gelu-{approx}-{tag}", lambda x, b, a=approx: rk.bias_gelu(x, b, a),
                        lambda x, b, a=approx: F.gelu(x + b, approximate=a),
                        [rnd(5, 33, dtype=dt, scale=2.0), rnd(33, dtype=dt)], dt))
        out.append((f"swiglu-{tag}", rk.swiglu, lambda a, b: F.silu(a) * b,
                    [rnd(5, 33, dtype=dt, scale=2.0), rnd(5, 33, dtype=dt)], dt))
        out.append((f"rotary-{tag}", rk.rotary, lambda x, c, s: x * c + torch.cat((-x[..., 3:], x[..., :3]), -1) * s,
                    [rnd(2, 3, 5, 6, dtype=dt), rnd(5, 6, dtype=dt), rnd(1, 5, 6, dtype=dt)], dt))
        tgt = torch.randint(0, 37, (5,), generator=g)
        tgt[2] = -100
        out.append((f"cross_entropy-{tag}", lambda x, t: rk.cross_entropy(x, t),
                    lambda x, t: F.cross_entropy(x, t), [rnd(5, 37, dtype=dt, scale=3.0), tgt], dt))
    # more than one block per row / program, non-contiguous inputs, fp32 buffers with bf16 activations
    tgt = torch.randint(0, 4099, (3,), generator=g)
    out.append(("cross_entropy-4099cols-sum", lambda x, t: rk.cross_entropy(x, t, reduction="sum"),
                lambda x, t: F.cross_entropy(x, t, reduction="sum"), [rnd(3, 4099, scale=4.0), tgt], torch.float32))
    out.append(("layer_norm-noncontig-9rows", lambda x, w, b: rk.layer_norm(x.transpose(0, 1), (3,), w, b),
                lambda x, w, b: F.layer_norm(x.transpose(0, 1), (3,), w, b), [rnd(3, 9), rnd(3), rnd(3)],
                torch.float32))
    out.append(("rms_norm-noweight-9rows", lambda x: rk.rms_norm(x, (2, 5)), lambda x: F.rms_norm(x, (2, 5)),
                [rnd(9, 2, 5)], torch.float32))
    out.append(("rotary-transposed-bf16x-fp32cos",
                lambda x, c, s: rk.rotary(x.transpose(1, 2), c, s),
                lambda x, c, s: (x.transpose(1, 2) * c
                                 + torch.cat((-x.transpose(1, 2)[..., 4:], x.transpose(1, 2)[..., :4]), -1) * s),
                [rnd(2, 5, 3, 8, dtype=torch.bfloat16), rnd(5, 8), rnd(5, 8)], torch.bfloat16))
    return out


def vocab_parallel_cases(rank: int, world: int, rows: int = 5, vocab: int = 38) -> dict:
    return {dt: vocab_parallel_case(rank, world, rows, vocab, dt) for dt in ("float32", "bfloat16")}


def vocab_parallel_case(rank: int, world: int, rows: int = 5, vocab: int = 38, dtype: str = "float32") -> dict:
    """Each rank holds vocab / world columns of the same logits; returns its per-row losses and
    logits-shard gradient next to the full-vocabulary torch ones (the reference of that shard)."""
    import torch.distributed as dist

    from autopar.runtime_kernels import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(3)
    dt = getattr(torch, dtype)
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(dt)
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[1] = -100
    weights = torch.randn(rows, generator=g)
    width = vocab // world
    shard = logits[:, rank * width:(rank + 1) * width].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(shard, target, rank * width, [dist.group.WORLD])
    (loss * weights).sum().backward()
    full = logits.float().requires_grad_()
    ref = F.cross_entropy(full, target, reduction="none")
    (ref * weights).sum().backward()
    return {"kernel": ran_kernel(loss),
            "loss": excess(loss, ref, dt), "grad": excess(shard.grad, full.grad[:, rank * width:(rank + 1) * width], dt)}


def main(path: str) -> None:
    from autopar.runtime_kernels import _triton

    assert _triton.INTERPRET, "run with TRITON_INTERPRET=1"
    records = [run_case(*c) for c in cases()]
    from dist_utils import run_distributed

    per_rank = run_distributed(vocab_parallel_cases, 2, 5, 38, timeout=120)
    for dt in ("float32", "bfloat16"):
        for rank, r in enumerate(res[dt] for res in per_rank):
            records.append({"name": f"vocab_parallel_cross_entropy-{dt}-rank{rank}", "kernel": r["kernel"],
                            "errors": {"out0": r["loss"], "grad0": r["grad"]}})
    # a fused graph end to end (LLaMA has five of the seven fusion kinds), kernels interpreted
    from fuse_checks import graph_numerics

    fused = graph_numerics("llama-tiny", batch=1, seq=4)
    records.append({"name": "fused-llama-tiny", "kernel": fused["kernels"], "fusions": fused["fusions"],
                    "errors": {"loss": fused["loss"], **{f"grad:{k}": v for k, v in fused["grads"].items()}}})
    with open(path, "w") as f:
        json.dump(records, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
