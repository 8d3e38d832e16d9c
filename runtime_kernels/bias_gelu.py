"""Bias add + GELU in one pass (= ``F.gelu(x + bias, approximate=...)``), forward and backward.

Elementwise over x viewed as [rows, n] with the bias along the last dim n; a program covers a block
of columns, so the bias index needs no per-element modulo. Forward reads x and the bias and writes
y; backward reads x, the bias and dy and writes dx, summing dx over its rows into partial bias
gradients in the same pass (no second read of dx). ``approximate``: "none" (erf) or "tanh".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from autopar.runtime_kernels._triton import autotune, jit, strided_launch, tl, use_triton

# written as literals inside the kernels: compiled Triton reads no plain Python globals (the
# interpreter does, so only a GPU run showed it) and the interpreter mishandles constexpr globals
# sqrt(2/pi) = 0.7978845608028654, 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) = 0.3989422804014327


# --- Triton kernels -----------------------------------------------------------------------------
# columns per program and warps (the first is what the interpreter runs)
COL_BLOCKS = [{"BLOCK_SIZE": b, "num_warps": w} for b in (1024, 2048, 4096, 512) for w in (4, 8)]
# backward, grid-strided over rows: programs per SM, columns per program and warps
BWD_BLOCKS = [{"PROGS_PER_SM": p, "BLOCK_SIZE": b, "num_warps": w}
              for p, b, w in ((4, 1024, 4), (8, 1024, 8), (4, 2048, 8), (8, 2048, 8), (16, 1024, 4), (4, 1024, 8))]


@autotune(COL_BLOCKS, key=["n_cols"])
@jit
def bias_gelu_fwd_kernel(x_ptr, b_ptr, y_ptr, n_cols, TANH: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # program (row, j): columns [j * BLOCK_SIZE, (j + 1) * BLOCK_SIZE) of one row of x [rows, n_cols]
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    offs = tl.program_id(0).to(tl.int64) * n_cols + cols
    z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)     # bias broadcast over rows
    if TANH:
        t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)) - 1.0   # tanh via sigmoid
        y = 0.5 * z * (1.0 + t)
    else:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(BWD_BLOCKS, key=["n_cols"])
@jit
def bias_gelu_bwd_kernel(dy_ptr, x_ptr, b_ptr, dx_ptr, db_part_ptr, n_rows, n_cols, n_part_rows, TANH: tl.constexpr,
                         HAS_DB: tl.constexpr, BLOCK_SIZE: tl.constexpr, PROGS_PER_SM: tl.constexpr):
    # program (p, j): columns block j of rows p, p + G, ... (grid-strided), summing its rows of dx
    # into row p of the bias-gradient partials [G, n_cols]
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    for row in tl.range(pid, n_rows, tl.num_programs(0)):
        offs = tl.cast(row, tl.int64) * n_cols + cols
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if TANH:
            t = 2.0 * tl.sigmoid(2.0 * 0.7978845608028654 * (z + 0.044715 * z * z * z)) - 1.0
            grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        else:
            grad = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        dx = (dy * grad).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + offs, dx, mask=mask)
        db_acc += dx.to(tl.float32)                  # the stored (rounded) dx, as dx.sum(0) would see it
    if HAS_DB:
        tl.store(db_part_ptr + pid * n_cols + cols, db_acc, mask=mask)
        for r in tl.range(pid + tl.num_programs(0), n_part_rows, tl.num_programs(0)):   # rows past the grid
            tl.store(db_part_ptr + r * n_cols + cols, tl.zeros([BLOCK_SIZE], dtype=tl.float32), mask=mask)


# --- launchers ----------------------------------------------------------------------------------
def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor, tanh: bool) -> torch.Tensor:
    """x contiguous with last dim == bias.numel(), bias contiguous; y in x's dtype."""
    y = torch.empty_like(x)
    n = bias.numel()
    bias_gelu_fwd_kernel[lambda meta: (x.numel() // n, -(-n // meta["BLOCK_SIZE"]))](x, bias, y, n, TANH=tanh)
    return y


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, tanh: bool, need_db: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx (x's dtype) and the fp32 bias gradient (dx summed over rows; None unless ``need_db``)."""
    dx = torch.empty_like(x)
    n = bias.numel()
    rows = x.numel() // n
    part_rows, grid = strided_launch(rows, x.device, BWD_BLOCKS)
    db_part = torch.empty(part_rows, n, dtype=torch.float32, device=x.device) if need_db else dx
    bias_gelu_bwd_kernel[lambda meta: grid(meta) + (-(-n // meta["BLOCK_SIZE"]),)](
        dy, x, bias, dx, db_part, rows, n, part_rows, TANH=tanh, HAS_DB=need_db)
    return dx, db_part.sum(0) if need_db else None


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
        dx, db = bias_gelu_bwd(dy.contiguous(), x, b, ctx.tanh, need_db=ctx.needs_input_grad[1])
        db = db.to(b.dtype) if db is not None else None
        return dx, db, None


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x + bias, approximate=approximate)`` with a 1-D bias over x's last dim."""
    if (use_triton(x, bias) and approximate in ("none", "tanh") and bias.dim() == 1 and x.dim() >= 1
            and x.shape[-1] == bias.shape[0] and x.dtype == bias.dtype and x.numel() > 0):
        return BiasGeluFunction.apply(x, bias, approximate)
    return bias_gelu_reference(x, bias, approximate)
