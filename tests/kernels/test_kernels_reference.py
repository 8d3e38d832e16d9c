"""The public kernel functions off the Triton path (CPU, no interpreter): the torch reference,
differentiable and equal to torch.nn.functional; invalid arguments are rejected."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autopar.runtime_kernels as rk
from autopar.runtime_kernels import _triton


def test_cpu_runs_the_reference_unless_interpreting():
    x = torch.randn(2, 4)
    assert _triton.use_triton(x) == (_triton.triton is not None and _triton.INTERPRET)
    assert not _triton.use_triton(torch.randn(2, 4, device="meta"))


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "add_norm", "bias_gelu", "swiglu", "rotary",
                                  "cross_entropy"])
def test_reference_path_equals_functional(name):
    if _triton.INTERPRET:
        pytest.skip("this process interprets the kernels")
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, requires_grad=True)
    w, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    y = torch.randn(3, 4, 6, requires_grad=True)
    cos, sin = torch.randn(4, 6), torch.randn(4, 6)
    tgt4 = torch.tensor([1, -100, 5, 0])
    fused, ref = {
        "layer_norm": (lambda: rk.layer_norm(x, (6,), w, b, 1e-5), lambda: F.layer_norm(x, (6,), w, b, 1e-5)),
        "rms_norm": (lambda: rk.rms_norm(x, [6], w), lambda: F.rms_norm(x, [6], w)),
        "add_norm": (lambda: torch.cat(rk.add_norm(x, y, w, 1e-6)),
                     lambda: torch.cat((F.rms_norm(x + y, [6], w, 1e-6), x + y))),
        "bias_gelu": (lambda: rk.bias_gelu(x, b, "tanh"), lambda: F.gelu(x + b, approximate="tanh")),
        "swiglu": (lambda: rk.swiglu(x, y), lambda: F.silu(x) * y),
        "rotary": (lambda: rk.rotary(x, cos, sin),
                   lambda: x * cos + torch.cat((-x[..., 3:], x[..., :3]), -1) * sin),
        "cross_entropy": (lambda: rk.cross_entropy(x[0], tgt4), lambda: F.cross_entropy(x[0], tgt4)),
    }[name]
    a, r = fused(), ref()
    torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
    ga = torch.autograd.grad(a.sum(), (x,))
    gr = torch.autograd.grad(r.sum(), (x,))
    torch.testing.assert_close(ga, gr, rtol=1e-6, atol=1e-6)


def test_cross_entropy_ignore_index_and_reductions_off_kernel():
    logits, tgt = torch.randn(4, 7), torch.tensor([0, 3, -1, 6])
    for red in ("mean", "sum", "none"):
        torch.testing.assert_close(rk.cross_entropy(logits, tgt, ignore_index=-1, reduction=red),
                                   F.cross_entropy(logits, tgt, ignore_index=-1, reduction=red))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="reduction must be one of"):
        rk.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="not a multiple of the shard width"):
        rk.vocab_parallel_cross_entropy(torch.randn(2, 4), torch.tensor([0, 1]), vocab_start=3)
    with pytest.raises(ValueError, match=r"logits must be \[N, V_local\]"):
        rk.vocab_parallel_cross_entropy(torch.randn(2, 4), torch.tensor([0, 1, 2]), vocab_start=0)
