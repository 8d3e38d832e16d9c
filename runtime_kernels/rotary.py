"""Rotary position embedding, rotate-half convention: ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x2, x1)`` for the halves x1, x2 of the last dim (as in Llama / GPT-NeoX).

x is [..., T, D]; cos and sin hold one row per position, shape [T, D] (leading size-1 dims allowed),
broadcast over the leading dims of x. Forward and backward are one kernel: the backward applies
the transposed rotation (``dx1 = dy1 cos1 + dy2 sin2``, ``dx2 = dy2 cos2 - dy1 sin1``). The
output dtype is x, cos and sin's promoted dtype, as the unfused expression gives.
"""
from __future__ import annotations

import torch

from autopar.runtime_kernels._triton import autotune, jit, next_pow2, tl, use_triton

# --- Triton kernel ------------------------------------------------------------------------------
# rows of x per program and warps (the first is what the interpreter runs)
ROTARY_BLOCKS = [{"BLOCK_SIZE_R": r, "num_warps": w} for r in (64, 16, 32, 128) for w in (4, 8)]


@autotune(ROTARY_BLOCKS, key=["n_rows", "half"])
@jit
def rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, seq_len, half, BACKWARD: tl.constexpr,
                  BLOCK_SIZE_R: tl.constexpr, BLOCK_SIZE_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_SIZE_R + tl.arange(0, BLOCK_SIZE_R)
    cols = tl.arange(0, BLOCK_SIZE_H)
    mask = (rows < n_rows)[:, None] & (cols < half)[None, :]
    lo = rows.to(tl.int64)[:, None] * (2 * half) + cols[None, :]        # first half of each row of x / y
    pos = (rows % seq_len)[:, None] * (2 * half) + cols[None, :]      # the row's position in cos / sin
    x1 = tl.load(x_ptr + lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + lo + half, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + pos, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos + half, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_ptr + lo, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + lo + half, y2.to(y_ptr.dtype.element_ty), mask=mask)


# --- launcher -----------------------------------------------------------------------------------
def rotary_apply(x: torch.Tensor, cos2d: torch.Tensor, sin2d: torch.Tensor, out_dtype: torch.dtype,
                 backward: bool = False) -> torch.Tensor:
    """x contiguous [..., T, D]; cos2d, sin2d contiguous [T, D]; D even."""
    d, t = x.shape[-1], x.shape[-2]
    rows = x.numel() // d
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    grid = lambda meta: (-(-rows // meta["BLOCK_SIZE_R"]),)    # noqa: E731
    rotary_kernel[grid](x, cos2d, sin2d, y, rows, t, d // 2, BACKWARD=backward, BLOCK_SIZE_H=next_pow2(d // 2))
    return y


# --- torch reference ----------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_reference(x, cos, sin):
    return x * cos + rotate_half(x) * sin


# --- autograd -----------------------------------------------------------------------------------
class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        t, d = x.shape[-2:]
        c, s = cos.reshape(t, d).contiguous(), sin.reshape(t, d).contiguous()
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] else None, c, s, cos, sin)
        ctx.x_dtype = x.dtype
        return rotary_apply(x.contiguous(), c, s, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, c, s, cos, sin = ctx.saved_tensors
        dx = rotary_apply(dy.contiguous(), c, s, ctx.x_dtype, backward=True) if ctx.needs_input_grad[0] else None
        dcos = (dy * x).sum_to_size(cos.shape).to(cos.dtype) if ctx.needs_input_grad[1] else None
        dsin = (dy * rotate_half(x)).sum_to_size(sin.shape).to(sin.dtype) if ctx.needs_input_grad[2] else None
        return dx, dcos, dsin


def _per_position(t: torch.Tensor, x: torch.Tensor) -> bool:
    """t is [T, D] of x's last two dims, possibly with leading size-1 dims."""
    return (t.dim() >= 2 and tuple(t.shape[-2:]) == tuple(x.shape[-2:])
            and all(s == 1 for s in t.shape[:-2]) and t.dim() <= x.dim())


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin``: the kernel for x [..., T, D] (D even) with per-position cos
    and sin of shape [T, D]; any other broadcast runs the torch reference."""
    if (use_triton(x, cos, sin) and x.dim() >= 2 and x.shape[-1] % 2 == 0 and x.numel() > 0
            and _per_position(cos, x) and _per_position(sin, x)):
        return RotaryFunction.apply(x, cos, sin)
    return rotary_reference(x, cos, sin)
