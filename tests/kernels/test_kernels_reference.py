"""The public kernel functions off the Triton path (CPU, no interpreter): the torch reference path is
differentiable and equals each operation written out from its definition; invalid arguments are rejected.
(The Triton kernels themselves are checked through the interpreter in test_kernels_interpret.py.)"""
from __future__ import annotations

import math

import pytest
import torch

import autopar.runtime_kernels as rk
from autopar.runtime_kernels import _triton


def test_cpu_runs_the_reference_unless_interpreting():
    x = torch.randn(2, 4)
    assert _triton.use_triton(x) == (_triton.triton is not None and _triton.INTERPRET)
    assert not _triton.use_triton(torch.randn(2, 4, device="meta"))


# Each operation written out from its definition (float64, plain tensor arithmetic: no torch.nn.functional),
# so the check does not compare a function with the one it calls.
def _layer_norm(x, w, b, eps):
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]     # biased variance
    return (x - mean) / (var + eps).sqrt() * w + b


def _rms_norm(x, w, eps):
    return x / ((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps).sqrt() * w


def _gelu_tanh(z):
    return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


def _gelu_erf(z):
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def _silu(z):
    return z / (1 + torch.exp(-z))


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def _cross_entropy(logits, tgt, ignore_index=-100, reduction="mean"):
    valid = tgt != ignore_index
    m = logits.max(-1, keepdim=True).values
    lse = (m + (logits - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)
    picked = logits.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "rms_norm_eps", "add_norm", "bias_gelu_tanh",
                                  "bias_gelu_erf", "swiglu", "rotary", "cross_entropy"])
def test_reference_path_matches_the_definition(name):
    """Outputs and input gradients of the public kernel functions (torch path on CPU) equal the operation
    written from its definition, in float64."""
    if _triton.INTERPRET:
        pytest.skip("this process interprets the kernels")
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(3, 4, 6, **f64), torch.randn(3, 4, 6, **f64)
    w, b = torch.randn(6, **f64), torch.randn(6, **f64)
    cos, sin = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    tgt4 = torch.tensor([1, -100, 5, 0])
    eps_rms = torch.finfo(torch.float64).eps   # rms_norm's default eps: the input dtype's machine epsilon
    kernel, formula = {
        "layer_norm": (lambda: rk.layer_norm(x, (6,), w, b, 1e-5), lambda: _layer_norm(x, w, b, 1e-5)),
        "rms_norm": (lambda: rk.rms_norm(x, [6], w), lambda: _rms_norm(x, w, eps_rms)),
        "rms_norm_eps": (lambda: rk.rms_norm(x, [6], w, 1e-2), lambda: _rms_norm(x, w, 1e-2)),
        "add_norm": (lambda: torch.cat(rk.add_norm(x, y, w, 1e-6)),
                     lambda: torch.cat((_rms_norm(x + y, w, 1e-6), x + y))),
        "bias_gelu_tanh": (lambda: rk.bias_gelu(x, b, "tanh"), lambda: _gelu_tanh(x + b)),
        "bias_gelu_erf": (lambda: rk.bias_gelu(x, b, "none"), lambda: _gelu_erf(x + b)),
        "swiglu": (lambda: rk.swiglu(x, y), lambda: _silu(x) * y),
        "rotary": (lambda: rk.rotary(x, cos, sin), lambda: x * cos + _rotate_half(x) * sin),
        "cross_entropy": (lambda: rk.cross_entropy(x[0], tgt4), lambda: _cross_entropy(x[0], tgt4)),
    }[name]
    a, r = kernel(), formula()
    torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    wanted = [t for t in (x, y, w, b) if t.requires_grad]
    ga = torch.autograd.grad(a.sum(), wanted, allow_unused=True)
    gr = torch.autograd.grad(r.sum(), wanted, allow_unused=True)
    for t, u, v in zip("xywb", ga, gr):
        assert (u is None) == (v is None), t
        if u is not None:
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12, msg=lambda m: f"d/d{t}: {m}")


def test_the_definitions_catch_a_wrong_kernel():
    """The formulas are sharp enough to catch a plausible mistake (unbiased variance, eps outside the root)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 6, dtype=torch.float64), torch.ones(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    unbiased = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=True) + 1e-5).sqrt()
    assert not torch.allclose(unbiased, _layer_norm(x, w, b, 1e-5), rtol=1e-6, atol=1e-8)
    eps_out = x / ((x * x).mean(-1, keepdim=True).sqrt() + 1e-2)
    assert not torch.allclose(eps_out, _rms_norm(x, w, 1e-2), rtol=1e-6, atol=1e-8)


def test_cross_entropy_ignore_index_and_reductions_off_kernel():
    logits, tgt = torch.randn(4, 7), torch.tensor([0, 3, -1, 6])
    for red in ("mean", "sum", "none"):
        torch.testing.assert_close(rk.cross_entropy(logits, tgt, ignore_index=-1, reduction=red),
                                   _cross_entropy(logits, tgt, ignore_index=-1, reduction=red))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="reduction must be one of"):
        rk.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="not a multiple of the shard width"):
        rk.vocab_parallel_cross_entropy(torch.randn(2, 4), torch.tensor([0, 1]), vocab_start=3)
    with pytest.raises(ValueError, match=r"logits must be \[N, V_local\]"):
        rk.vocab_parallel_cross_entropy(torch.randn(2, 4), torch.tensor([0, 1, 2]), vocab_start=0)
