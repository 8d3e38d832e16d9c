"""LayerNorm over the trailing dims, forward and backward (= ``F.layer_norm``).

One program per row in forward; backward runs a grid-strided loop over tiles of rows so each
program also sums its rows' weight and bias gradients into one partial row (summed in torch
afterwards).
Statistics are computed in fp32 whatever the input dtype.
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
def layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_cols, eps,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_SIZE_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE_N)
    mask = cols < n_cols
    offs = tl.cast(row, tl.int64) * n_cols + cols           # row-major [rows, n_cols]: this row's elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)                  # padding lanes must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@autotune(STRIDED, key=["n_cols"])
@jit
def layer_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                          n_rows, n_cols, n_part_rows, HAS_WEIGHT: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                          BLOCK_SIZE_M: tl.constexpr, PROGS_PER_SM: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE_N)
    cmask = cols < n_cols
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([BLOCK_SIZE_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_SIZE_N], dtype=tl.float32)
    # grid-strided over tiles of BLOCK_SIZE_M rows: rows [pid * M, pid * M + M), then G * M further, ...
    for row0 in tl.range(pid * BLOCK_SIZE_M, n_rows, tl.num_programs(0) * BLOCK_SIZE_M):
        rows = row0 + tl.arange(0, BLOCK_SIZE_M)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w
        c1 = tl.sum(xhat * wdy, axis=1) / n_cols
        c2 = tl.sum(wdy, axis=1) / n_cols
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    # this program's partial sums: row pid of [n_part_rows, n_cols]
    tl.store(dw_part_ptr + pid * n_cols + cols, dw_acc, mask=cmask)
    tl.store(db_part_ptr + pid * n_cols + cols, db_acc, mask=cmask)
    for r in tl.range(pid + tl.num_programs(0), n_part_rows, tl.num_programs(0)):   # rows past the grid
        tl.store(dw_part_ptr + r * n_cols + cols, tl.zeros([BLOCK_SIZE_N], dtype=tl.float32), mask=cmask)
        tl.store(db_part_ptr + r * n_cols + cols, tl.zeros([BLOCK_SIZE_N], dtype=tl.float32), mask=cmask)


# --- launchers ----------------------------------------------------------------------------------
def layer_norm_fwd(x2d: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x2d: contiguous [rows, n]; returns y (x's dtype) and fp32 mean, rstd per row."""
    rows, n = x2d.shape
    y = torch.empty_like(x2d)
    mean = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    block = next_pow2(n)
    layer_norm_fwd_kernel[(rows,)](x2d, weight if weight is not None else x2d, bias if bias is not None else x2d,
                                   y, mean, rstd, n, eps, HAS_WEIGHT=weight is not None,
                                   HAS_BIAS=bias is not None, BLOCK_SIZE_N=block)
    return y, mean, rstd


def layer_norm_bwd(dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (x's dtype) and fp32 dweight, dbias (summed over rows)."""
    rows, n = x2d.shape
    dx = torch.empty_like(x2d)
    part_rows, grid = strided_launch(rows, x2d.device)
    dw_part = torch.empty(part_rows, n, dtype=torch.float32, device=x2d.device)
    db_part = torch.empty(part_rows, n, dtype=torch.float32, device=x2d.device)
    layer_norm_bwd_kernel[grid](dy2d, x2d, weight if weight is not None else x2d, mean, rstd, dx, dw_part, db_part,
                                rows, n, part_rows, HAS_WEIGHT=weight is not None, BLOCK_SIZE_N=next_pow2(n))
    return dx, dw_part.sum(0), db_part.sum(0)


# --- torch reference ----------------------------------------------------------------------------
def layer_norm_reference(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


# --- autograd -----------------------------------------------------------------------------------
class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, n, eps):
        x2d = x.reshape(-1, n).contiguous()
        w = weight.reshape(n).contiguous() if weight is not None else None
        b = bias.reshape(n).contiguous() if bias is not None else None
        y, mean, rstd = layer_norm_fwd(x2d, w, b, eps)
        ctx.save_for_backward(x2d, w, mean, rstd)
        ctx.shapes = (x.shape, None if weight is None else weight.shape, None if bias is None else bias.shape)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, w, mean, rstd = ctx.saved_tensors
        x_shape, w_shape, b_shape = ctx.shapes
        dx, dw, db = layer_norm_bwd(dy.reshape(x2d.shape).contiguous(), x2d, w, mean, rstd)
        dw = dw.to(w.dtype).view(w_shape) if w_shape is not None and ctx.needs_input_grad[1] else None
        db = db.to(x2d.dtype if w is None else w.dtype).view(b_shape) \
            if b_shape is not None and ctx.needs_input_grad[2] else None
        return dx.view(x_shape), dw, db, None, None


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm``: the Triton kernel on CUDA (or the interpreter), else the torch reference."""
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    n = math.prod(ns)
    if (use_triton(x, weight, bias) and tuple(x.shape[x.dim() - len(ns):]) == ns and 0 < n <= MAX_ROW
            and x.numel() > 0):
        return LayerNormFunction.apply(x, weight, bias, n, eps)
    return layer_norm_reference(x, ns, weight, bias, eps)
