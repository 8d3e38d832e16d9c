"""RMSNorm over the trailing dims, forward and backward (= ``F.rms_norm``).

One program per row in forward; backward runs a grid-strided loop over tiles of rows so each program also
sums its rows' weight gradients into one partial row. The backward kernel optionally adds a
gradient that reaches the normalized input directly (``add_norm`` uses it for the residual sum).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from autopar.runtime_kernels._triton import (
    MAX_ROW,
    ROW_WARPS,
    STRIDED,
    autotune,
    jit,
    next_pow2,
    strided_launch,
    tl,
    use_triton,
)


# --- Triton kernels -----------------------------------------------------------------------------
@autotune(ROW_WARPS, key=["n_cols"])
@jit
def rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps,
                        HAS_WEIGHT: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE_N)
    mask = cols < n_cols
    offs = tl.cast(row, tl.int64) * n_cols + cols     # row-major [rows, n_cols]: this row's elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = x * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@autotune(STRIDED, key=["n_cols"])
@jit
def rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dsum_ptr, dx_ptr, dw_part_ptr, n_rows, n_cols, n_part_rows,
                        HAS_WEIGHT: tl.constexpr, HAS_DSUM: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                        BLOCK_SIZE_M: tl.constexpr, PROGS_PER_SM: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE_N)
    cmask = cols < n_cols
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([BLOCK_SIZE_N], dtype=tl.float32)
    # grid-strided over tiles of BLOCK_SIZE_M rows
    for row0 in tl.range(pid * BLOCK_SIZE_M, n_rows, tl.num_programs(0) * BLOCK_SIZE_M):
        rows = row0 + tl.arange(0, BLOCK_SIZE_M)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)[:, None]
        xhat = x * rstd
        wdy = dy * w
        dx = (wdy - xhat * (tl.sum(xhat * wdy, axis=1) / n_cols)[:, None]) * rstd
        if HAS_DSUM:                                    # gradient that reaches x directly
            dx += tl.load(dsum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
    tl.store(dw_part_ptr + pid * n_cols + cols, dw_acc, mask=cmask)   # row pid of [n_part_rows, n_cols]
    for r in tl.range(pid + tl.num_programs(0), n_part_rows, tl.num_programs(0)):   # rows past the grid
        tl.store(dw_part_ptr + r * n_cols + cols, tl.zeros([BLOCK_SIZE_N], dtype=tl.float32), mask=cmask)


# --- launchers ----------------------------------------------------------------------------------
def rms_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2d: contiguous [rows, n]; returns y (x's dtype) and the fp32 rstd per row."""
    rows, n = x2d.shape
    y = torch.empty_like(x2d)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    block = next_pow2(n)
    rms_norm_fwd_kernel[(rows,)](x2d, weight if weight is not None else x2d, y, rstd, n, eps,
                                 HAS_WEIGHT=weight is not None, BLOCK_SIZE_N=block)
    return y, rstd


def rms_norm_bwd(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                 dsum2d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x's dtype; plus ``dsum2d`` when given) and the fp32 dweight summed over rows."""
    rows, n = x2d.shape
    dx = torch.empty_like(x2d)
    part_rows, grid = strided_launch(rows, x2d.device)
    dw_part = torch.empty(part_rows, n, dtype=torch.float32, device=x2d.device)
    rms_norm_bwd_kernel[grid](dy2d, x2d, weight if weight is not None else x2d, rstd,
                              dsum2d if dsum2d is not None else x2d, dx, dw_part, rows, n, part_rows,
                              HAS_WEIGHT=weight is not None, HAS_DSUM=dsum2d is not None, BLOCK_SIZE_N=next_pow2(n))
    return dx, dw_part.sum(0)


# --- torch reference ----------------------------------------------------------------------------
def rms_norm_reference(x, normalized_shape, weight=None, eps=None):
    return F.rms_norm(x, normalized_shape, weight, eps)


# --- autograd -----------------------------------------------------------------------------------
class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, n, eps):
        x2d = x.reshape(-1, n).contiguous()
        w = weight.reshape(n).contiguous() if weight is not None else None
        y, rstd = rms_norm_fwd(x2d, w, eps)
        ctx.save_for_backward(x2d, w, rstd)
        ctx.shapes = (x.shape, None if weight is None else weight.shape)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, w, rstd = ctx.saved_tensors
        x_shape, w_shape = ctx.shapes
        dx, dw = rms_norm_bwd(dy.reshape(x2d.shape).contiguous(), x2d, w, rstd)
        dw = dw.to(w.dtype).view(w_shape) if w_shape is not None and ctx.needs_input_grad[1] else None
        return dx.view(x_shape), dw, None, None


def default_eps(x: torch.Tensor, eps: float | None) -> float:
    return float(torch.finfo(x.dtype).eps) if eps is None else float(eps)


def rms_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """``F.rms_norm`` (``eps=None``: the dtype's machine epsilon): Triton on CUDA or the interpreter,
    else the torch reference."""
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    n = math.prod(ns)
    if (use_triton(x, weight) and tuple(x.shape[x.dim() - len(ns):]) == ns and 0 < n <= MAX_ROW
            and x.numel() > 0):
        return RMSNormFunction.apply(x, weight, n, default_eps(x, eps))
    return rms_norm_reference(x, ns, weight, eps)
