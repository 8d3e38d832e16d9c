"""Bias add + GELU in one pass (= ``F.gelu(x + bias, approximate=...)``), forward and backward.

Elementwise over x viewed as [rows, n] with the bias along the last dim n. Forward reads x and
the bias and writes y; backward reads x, the bias and dy and writes dx (the bias gradient is dx
summed over rows). ``approximate``: "none" (erf) or "tanh".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autopar.runtime_kernels._triton import jit, tl, use_triton

BLOCK_SIZE = 1024
# written as literals inside the kernels: compiled Triton reads no plain Python globals (the
# interpreter does, so only a GPU run showed it) and the interpreter mishandles constexpr globals
# sqrt(2/pi) = 0.7978845608028654, 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327


# --- Triton kernels -----------------------------------------------------------------------------
@jit
def bias_gelu_fwd_kernel(x_ptr, b_ptr, y_ptr, n_elements, n_cols, TANH: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)   # this block of the flat x
    mask = offs < n_elements
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(b_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)     # bias broadcast over rows
    if TANH:
        t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)) - 1.0   # tanh via sigmoid
        y = 0.5 * z * (1.0 + t)
    else:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def bias_gelu_bwd_kernel(dy_ptr, x_ptr, b_ptr, dx_ptr, n_elements, n_cols, TANH: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(b_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if TANH:
        t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)) - 1.0
        grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    else:
        grad = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    tl.store(dx_ptr + offs, (dy * grad).to(dx_ptr.dtype.element_ty), mask=mask)


# --- launchers ----------------------------------------------------------------------------------
def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor, tanh: bool) -> torch.Tensor:
    """x contiguous with last dim == bias.numel(), bias contiguous; y in x's dtype."""
    y = torch.empty_like(x)
    n = x.numel()
    bias_gelu_fwd_kernel[(-(-n // BLOCK_SIZE),)](x, bias, y, n, bias.numel(), TANH=tanh, BLOCK_SIZE=BLOCK_SIZE)
    return y


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, tanh: bool) -> torch.Tensor:
    dx = torch.empty_like(x)
    n = x.numel()
    bias_gelu_bwd_kernel[(-(-n // BLOCK_SIZE),)](dy, x, bias, dx, n, bias.numel(), TANH=tanh,
                                                        BLOCK_SIZE=BLOCK_SIZE)
    return dx


# --- torch reference ----------------------------------------------------------------------------
def bias_gelu_reference(x, bias, approximate="none"):
    return F.gelu(x + bias, approximate=approximate)


# --- autograd -----------------------------------------------------------------------------------
class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        x, b = x.contiguous(), bias.contiguous()
        ctx.save_for_backward(x, b)
        ctx.tanh = approximate == "tanh"
        return bias_gelu_fwd(x, b, ctx.tanh)

    @staticmethod
    def backward(ctx, dy):
        x, b = ctx.saved_tensors
        dx = bias_gelu_bwd(dy.contiguous(), x, b, ctx.tanh)
        db = dx.reshape(-1, b.numel()).sum(0, dtype=torch.float32).to(b.dtype) if ctx.needs_input_grad[1] else None
        return dx, db, None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x + bias, approximate=approximate)`` with a 1-D bias over x's last dim."""
    if (use_triton(x, bias) and approximate in ("none", "tanh") and bias.dim() == 1 and x.dim() >= 1
            and x.shape[-1] == bias.shape[0] and x.dtype == bias.dtype and x.numel() > 0):
        return BiasGeluFunction.apply(x, bias, approximate)
    return bias_gelu_reference(x, bias, approximate)
