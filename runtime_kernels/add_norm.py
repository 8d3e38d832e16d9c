"""Residual add + RMSNorm in one pass: ``s = x + residual``, returns ``(rms_norm(s) * weight, s)``.

The forward kernel reads x and the residual once and writes the sum and the normalized sum; the
backward is RMSNorm's backward kernel with the sum's own gradient added in (x and the residual get
the same gradient). The sum is rounded to the input dtype before it is normalized, as the unfused
``add`` then ``rms_norm`` would.
"""
from __future__ import annotations

import torch

from autopar.runtime_kernels._triton import MAX_ROW, ROW_WARPS, autotune, jit, next_pow2, tl, use_triton
from autopar.runtime_kernels.rms_norm import default_eps, rms_norm_bwd, rms_norm_reference


# --- Triton kernel ------------------------------------------------------------------------------
@autotune(ROW_WARPS, key=["n_cols"])
@jit
def add_rms_norm_fwd_kernel(x_ptr, r_ptr, w_ptr, s_ptr, y_ptr, rstd_ptr, n_cols, eps,
                            HAS_WEIGHT: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE_N)
    mask = cols < n_cols
    offs = tl.cast(row, tl.int64) * n_cols + cols     # row-major [rows, n_cols]: this row's elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(s_ptr.dtype.element_ty)              # the sum as the unfused add stores it
    tl.store(s_ptr + offs, s, mask=mask)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n_cols + eps)
    y = s * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


# --- launcher -----------------------------------------------------------------------------------
def add_rms_norm_fwd(x2d: torch.Tensor, r2d: torch.Tensor, weight: torch.Tensor | None, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d, r2d: contiguous [rows, n] of one dtype; returns the normed sum, the sum and fp32 rstd."""
    rows, n = x2d.shape
    y, s = torch.empty_like(x2d), torch.empty_like(x2d)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    block = next_pow2(n)
    add_rms_norm_fwd_kernel[(rows,)](x2d, r2d, weight if weight is not None else x2d, s, y, rstd, n, eps,
                                     HAS_WEIGHT=weight is not None, BLOCK_SIZE_N=block)
    return y, s, rstd


# --- torch reference ----------------------------------------------------------------------------
def add_norm_reference(x, residual, weight=None, eps=None):
    s = x + residual
    return rms_norm_reference(s, (s.shape[-1],), weight, eps), s


# --- autograd -----------------------------------------------------------------------------------
class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        n = x.shape[-1]
        w = weight.contiguous() if weight is not None else None
        y, s, rstd = add_rms_norm_fwd(x.reshape(-1, n).contiguous(), residual.reshape(-1, n).contiguous(), w, eps)
        ctx.save_for_backward(s, w, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dsum):
        s, w, rstd = ctx.saved_tensors
        dsum = dsum.reshape(s.shape).contiguous() if dsum is not None else None
        ds, dw = rms_norm_bwd(dy.reshape(s.shape).contiguous(), s, w, rstd, dsum)
        ds = ds.view(ctx.x_shape)
        dw = dw.to(w.dtype) if w is not None and ctx.needs_input_grad[2] else None
        return ds, ds, dw, None


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
             eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.rms_norm(x + residual, (n,), weight, eps), x + residual)`` over the last dim n."""
    n = x.shape[-1] if x.dim() else 0
    if (use_triton(x, residual, weight) and x.shape == residual.shape and x.dtype == residual.dtype
            and (weight is None or tuple(weight.shape) == (n,)) and 0 < n <= MAX_ROW and x.numel() > 0):
        return AddRMSNormFunction.apply(x, residual, weight, default_eps(x, eps))
    return add_norm_reference(x, residual, weight, eps)
