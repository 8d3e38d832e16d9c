"""Softmax cross-entropy over the vocabulary, whole or vocabulary-sharded, forward and backward.

``cross_entropy(logits [N, V], target [N])`` = ``F.cross_entropy`` (mean over targets that are not
``ignore_index``; "sum" and "none" too). ``vocab_parallel_cross_entropy`` takes this rank's
vocabulary shard ``logits[:, vocab_start:vocab_start + V_local]`` and returns the per-row losses of
the full softmax with ONE all-reduce of the row statistics (each shard's max and sum of
exponentials in its own slot, plus the target logit), so the logits are never gathered.

Forward: a stats kernel streams each row once (online max and sum of exponentials, in fp32, one
exponential per logit) and picks the target logit when it lies in the shard; over the whole
vocabulary it also finishes the log-sum-exp and the row loss, so no torch op follows it. Backward: one kernel writes
``(softmax - onehot) * row_scale`` from the saved log-sum-exp; no communication (the gradient of
the full loss with respect to a shard's logits only needs the global log-sum-exp).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autopar.runtime_kernels._triton import autotune, jit, tl, use_triton

REDUCTIONS = ("mean", "sum", "none")


# --- Triton kernels -----------------------------------------------------------------------------
# vocabulary columns per step and warps (the first is what the interpreter runs)
CE_BLOCKS = [{"BLOCK_SIZE_V": b, "num_warps": w} for b, w in ((4096, 8), (2048, 4), (2048, 8), (4096, 16),
                                                              (8192, 8), (8192, 16), (16384, 16), (32768, 32))]


@autotune(CE_BLOCKS, key=["n_cols"])
@jit
def ce_stats_kernel(logits_ptr, target_ptr, max_ptr, sumexp_ptr, tlogit_ptr, loss_ptr, n_cols, vocab_start,
                    ignore_index, FINAL: tl.constexpr, BLOCK_SIZE_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + tl.cast(row, tl.int64) * n_cols          # row-major [rows, n_cols]
    m = tl.max(tl.full([BLOCK_SIZE_V], float("-inf"), tl.float32), axis=0)   # running max (a scalar)
    s = tl.sum(tl.zeros([BLOCK_SIZE_V], dtype=tl.float32), axis=0)          # running sum of exp(x - m)
    for start in tl.range(0, n_cols, BLOCK_SIZE_V):
        cols = start + tl.arange(0, BLOCK_SIZE_V)
        x = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # while every logit so far is -inf, shift by 0 so nothing computes inf - inf
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)    # one exp per logit
        m = m_new
    tgt = tl.load(target_ptr + row)
    t = tgt - vocab_start                                           # target column in this shard
    inside = (t >= 0) & (t < n_cols)
    t_logit = tl.where(inside, tl.load(row_ptr + tl.where(inside, t, 0)).to(tl.float32), 0.0)
    if FINAL:                                                       # the whole vocabulary: finish here
        lse = m + tl.log(s)
        tl.store(max_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(tgt != ignore_index, lse - t_logit, 0.0))
    else:
        tl.store(max_ptr + row, m)
        tl.store(sumexp_ptr + row, s)
        tl.store(tlogit_ptr + row, t_logit)


@autotune(CE_BLOCKS, key=["n_cols"])
@jit
def ce_grad_kernel(logits_ptr, target_ptr, lse_ptr, scale_ptr, dlogits_ptr, n_cols, vocab_start,
                   BLOCK_SIZE_V: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.cast(row, tl.int64) * n_cols
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)                               # d loss / d row loss (0: ignored)
    t = tl.load(target_ptr + row) - vocab_start
    for start in tl.range(0, n_cols, BLOCK_SIZE_V):
        cols = start + tl.arange(0, BLOCK_SIZE_V)
        mask = cols < n_cols
        x = tl.load(logits_ptr + offs + cols, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)) * scale
        tl.store(dlogits_ptr + offs + cols, g.to(dlogits_ptr.dtype.element_ty), mask=mask)


# --- launchers ----------------------------------------------------------------------------------
def ce_stats(logits: torch.Tensor, target: torch.Tensor, vocab_start: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (fp32): max, sum of exp(x - max), the target's logit (0 when outside the shard)."""
    rows, v = logits.shape
    m, s, t = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    ce_stats_kernel[(rows,)](logits, target, m, s, t, m, v, vocab_start, 0, FINAL=False)
    return m, s, t


def ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole vocabulary, one pass: per-row log-sum-exp and loss (0 where target == ignore_index), fp32."""
    rows, v = logits.shape
    lse, loss = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(2))
    ce_stats_kernel[(rows,)](logits, target, lse, lse, lse, loss, v, 0, ignore_index, FINAL=True)
    return lse, loss


def ce_grad(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
            vocab_start: int) -> torch.Tensor:
    rows, v = logits.shape
    d = torch.empty_like(logits)
    ce_grad_kernel[(rows,)](logits, target, lse, scale, d, v, vocab_start)
    return d


# --- torch reference (same math, for the sharded form off the kernel path) ---------------------
def ce_stats_reference(logits, target, vocab_start):
    x = logits.detach().float()
    m = x.amax(-1)
    s = torch.exp(x - m.unsqueeze(-1)).sum(-1)
    t = target - vocab_start
    inside = (t >= 0) & (t < x.shape[-1])
    tlog = x.gather(-1, t.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return m, s, torch.where(inside, tlog, torch.zeros_like(tlog))


def ce_grad_reference(logits, target, lse, scale, vocab_start):
    x = logits.detach().float()
    g = torch.exp(x - lse.unsqueeze(-1))
    t = target - vocab_start
    inside = (t >= 0) & (t < x.shape[-1])
    g[inside, t[inside]] -= 1.0
    return (g * scale.unsqueeze(-1)).to(logits.dtype)


def cross_entropy_reference(logits, target, ignore_index=-100, reduction="mean"):
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


# --- autograd -----------------------------------------------------------------------------------
class CrossEntropyFunction(torch.autograd.Function):
    """Per-row fp32 losses (0 for ignored rows) of logits whose columns start at ``vocab_start`` of the
    vocabulary; with ``groups`` the other shards are on those process groups (summed in order)."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, groups, ignore_index):
        logits, target = logits.contiguous(), target.contiguous()
        kernel = use_triton(logits)
        valid = target != ignore_index
        if kernel and not groups:
            lse, loss = ce_loss(logits, target, ignore_index)
        else:
            m, s, tlog = (ce_stats if kernel else ce_stats_reference)(logits, target, vocab_start)
            if groups:
                m, s, tlog = _combine_shards(m, s, tlog, vocab_start // logits.shape[1], groups)
            lse = m + torch.log(s)
            loss = torch.where(valid, lse - tlog, torch.zeros_like(lse))
        ctx.save_for_backward(logits, target, lse, valid)
        ctx.vocab_start, ctx.kernel = vocab_start, kernel
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, target, lse, valid = ctx.saved_tensors
        scale = (dloss.float() * valid).contiguous()
        grad = (ce_grad if ctx.kernel else ce_grad_reference)(logits, target, lse, scale, ctx.vocab_start)
        return grad, None, None, None, None


def _combine_shards(m, s, tlog, shard, groups):
    """One all-reduce (sum) per group of [shards * 2 + 1, rows]: each shard writes its (max, sumexp)
    into its own slot, the target logit (nonzero on one shard) into the last row."""
    shards = math.prod(dist.get_world_size(g) for g in groups)
    packed = torch.zeros(2 * shards + 1, m.shape[0], dtype=torch.float32, device=m.device)
    packed[2 * shard], packed[2 * shard + 1], packed[-1] = m, s, tlog
    for g in groups:
        dist.all_reduce(packed, group=g)
    ms, ss = packed[0:-1:2], packed[1:-1:2]
    m_all = ms.amax(0)
    return m_all, (ss * torch.exp(ms - m_all)).sum(0), packed[-1]


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().to(loss.dtype)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits, target, ignore_index=..., reduction=...)`` for logits [N, V] and
    class-index targets [N] (any other form runs the torch reference)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if (use_triton(logits) and logits.dim() == 2 and target.dim() == 1 and target.shape[0] == logits.shape[0]
            and not target.is_floating_point() and logits.numel() > 0):
        loss = CrossEntropyFunction.apply(logits, target.long(), 0, (), ignore_index)
        return _reduce(loss, target != ignore_index, reduction).to(logits.dtype)
    return cross_entropy_reference(logits, target, ignore_index, reduction)


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, groups=(),
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-row fp32 losses (0 where target == ignore_index) of the full-vocabulary softmax, from this
    rank's logits shard [N, V_local] covering classes ``[vocab_start, vocab_start + V_local)``.

    ``groups``: the process groups over which the vocabulary is split (several for a vocabulary
    split over several mesh dims; shards are even and numbered ``vocab_start // V_local``). Every
    rank passes the same targets (global class ids). With no groups this is the unsharded loss.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V_local] and target [N]; got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    if vocab_start % logits.shape[1]:
        raise ValueError(f"vocab_start {vocab_start} is not a multiple of the shard width {logits.shape[1]}: "
                         f"shards must be even")
    return CrossEntropyFunction.apply(logits, target.long(), int(vocab_start), tuple(groups), ignore_index)
