"""The kernel fusion pass: what it matches in the GPT and LLaMA graphs, that fused graphs keep the
numerics on the torch reference path (tests/kernels/test_kernels_interpret.py runs a fused graph
with the kernels interpreted), that it leaves patterns with outside users alone, and that
`autopar emit`'s source shows the fused calls."""
from __future__ import annotations


import pytest
import torch
from torch import nn

import fuse_checks
from autopar.core.capture import capture
from autopar.codegen.context import copy_graph_module
from autopar.codegen.drop_asserts import drop_asserts
from autopar.codegen.fuse_kernels import fuse_kernels
from autopar.models import BUILTIN_MODELS

ATEN_LEFT = {"layer_norm", "rms_norm", "gelu", "silu", "cross_entropy_loss", "neg", "cat", "chunk"}


def expected_fusions(spec: str) -> dict[str, int]:
    n = int(BUILTIN_MODELS[spec].config["n_layer"])
    if spec.startswith("gpt"):   # ln_1, ln_2 per block and ln_f; fc + GELU per block; the loss
        return {"layer_norm": 2 * n + 1, "bias_gelu": n, "cross_entropy": 1}
    # the first norm reads the embedding; every later one reads a residual sum; q and k rotate
    return {"rms_norm": 1, "add_norm": 2 * n, "rotary": 2 * n, "swiglu": n, "cross_entropy": 1}


def _count(fusions) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in fusions:
        out[f["kind"]] = out.get(f["kind"], 0) + 1
    return out


def _left_over(code: str) -> set[str]:
    return {op for op in ATEN_LEFT if f"torch.ops.aten.{op}." in code}


@pytest.mark.parametrize("spec", ["gpt-tiny", "llama-tiny"])
def test_fused_graph_matches_unfused_on_reference_path(spec):
    r = fuse_checks.graph_numerics(spec)
    assert _count(r["fusions"]) == expected_fusions(spec)
    assert not _left_over(r["code"]), _left_over(r["code"])
    assert r["loss"] <= 0, r["loss"]
    bad = {k: v for k, v in r["grads"].items() if v > 0}
    assert not bad and len(r["grads"]) > 10, bad


class _HFStyle(nn.Module):
    """HF-style RMSNorm written out (pow-mean-add-rsqrt-mul, weight) and rotate-half by slicing."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.register_buffer("cos", torch.randn(3, d))
        self.register_buffer("sin", torch.randn(3, d))

    def forward(self, x, reuse: bool = False):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        h = self.weight * h.to(x.dtype)
        half = h.shape[-1] // 2
        rot = h * self.cos + torch.cat((-h[..., half:], h[..., :half]), dim=-1) * self.sin
        s = torch.nn.functional.silu(rot)
        y = s * rot
        return (y + s).sum() if reuse else y.sum()   # reuse: silu's output has a second user


@pytest.mark.parametrize("reuse", [False, True])
def test_decomposed_patterns_and_outside_users(reuse):
    torch.manual_seed(0)
    model, x = _HFStyle(), torch.randn(2, 3, 8)
    cap = capture(model, (x,) if not reuse else (x, True))
    gm = drop_asserts(copy_graph_module(cap.program.graph_module), None)
    fused = fuse_kernels(copy_graph_module(gm), None)
    kinds = _count(fused.meta["autopar_fusions"])
    assert kinds.get("rms_norm") == 1 and kinds.get("rotary") == 1
    assert kinds.get("swiglu") == (None if reuse else 1)
    assert ("torch.ops.aten.silu." in fused.code) == reuse
    assert "torch.ops.aten.rsqrt." not in fused.code and "torch.ops.aten.cat." not in fused.code
    w = model.weight.detach().clone().requires_grad_()
    args = [w, model.cos, model.sin, x] + ([True] if reuse else [])
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = args[:len(phs)]
    ref = gm(*args)[0]
    (g_ref,) = torch.autograd.grad(ref, w)
    out = fused(*args)[0]
    (g_out,) = torch.autograd.grad(out, w)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-5)


def test_emit_shows_fused_calls():
    import autopar
    from autopar.codegen import build_parallel_graph
    from autopar.codegen.emit import emit_source
    from autopar.models import build_model

    model, inputs = build_model("gpt-tiny", batch=2, seq=8, device="meta")
    plan = autopar.plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo", **fuse_checks.VOCAB_PARALLEL)
    gm, _ = build_parallel_graph(capture(model, inputs, fold_layers=False), plan, fuse=True)
    src = emit_source(gm, plan)
    assert "import autopar.runtime_kernels" in src.splitlines()
    assert "from autopar.codegen.fuse_kernels import sharded_cross_entropy" in src
    n = expected_fusions("gpt-tiny")["layer_norm"]
    assert src.count(" = autopar.runtime_kernels.layer_norm(") == n
    assert f"# Fused kernels (fuse_kernels pass): layer_norm x{n}, bias_gelu x2, " in src
    assert "fused_vocab_parallel_cross_entropy = " in src
    plain, _ = build_parallel_graph(capture(model, inputs, fold_layers=False), plan, fuse=False)
    assert "runtime_kernels" not in emit_source(plain, plan) and "autopar_fusions" not in plain.meta
