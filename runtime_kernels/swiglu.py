"""SwiGLU gate in one pass (= ``F.silu(gate) * up``), forward and backward.

Elementwise over two tensors of one shape: forward reads gate and up and writes y; backward reads
gate, up and dy and writes both gradients (silu's sigmoid is recomputed, not stored).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autopar.runtime_kernels._triton import FLAT_BLOCKS, autotune, flat_grid, jit, tl, use_triton


# --- Triton kernels -----------------------------------------------------------------------------
@autotune(FLAT_BLOCKS, key=["n_elements"])
@jit
def swiglu_fwd_kernel(gate_ptr, up_ptr, y_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)   # this block of the flat tensors
    mask = offs < n_elements
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(FLAT_BLOCKS, key=["n_elements"])
@jit
def swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(dgate_ptr + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)


# --- launchers ----------------------------------------------------------------------------------
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: contiguous, same shape and dtype."""
    y = torch.empty_like(gate)
    n = gate.numel()
    swiglu_fwd_kernel[flat_grid(n)](gate, up, y, n)
    return y


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    swiglu_bwd_kernel[flat_grid(n)](dy, gate, up, dgate, dup, n)
    return dgate, dup


# --- torch reference ----------------------------------------------------------------------------
def swiglu_reference(gate, up):
    return F.silu(gate) * up


# --- autograd -----------------------------------------------------------------------------------
class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for gate and up of one shape and dtype (else the torch reference broadcasts)."""
    if use_triton(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype and gate.numel() > 0:
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
