"""Runtime ops the rewritten graph calls: resharding by placement strings, and the ops whose
sharded form is not the plain op on local shards (vocab-parallel embedding, sharded cross-entropy,
norms over a split hidden dim).

All work on LOCAL tensors and are autograd-aware. Placement strings are those of the plan
(``"S(0) R"``: one placement per mesh dim), so the emitted code reads like the plan.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from autopar.core.placement import Partial, Replicate, Shard, Sharding, parse_sharding
from autopar.ops.collectives import redistribute


@functools.lru_cache(maxsize=4096)
def placements(text: str) -> Sharding:
    """``"S(0) R"`` -> (Shard(0), Replicate())."""
    return parse_sharding(text.split(), field="placement string")


def reshard(x: torch.Tensor, mesh: DeviceMesh, src: str, dst: str, grad_dst: str | None = None) -> torch.Tensor:
    """Change the placements of local tensor ``x`` from ``src`` to ``dst`` (autograd-aware).

    ``grad_dst`` overrides the placement the gradient arrives in (a replicated input of an op that
    splits its work on a mesh dim receives a Partial gradient there, reduced on the way back).
    """
    return redistribute(x, placements(src), placements(dst), mesh=mesh,
                        grad_dst=placements(grad_dst) if grad_dst else None)


def local_shape(shape: tuple[int, ...] | list[int], sharding: str | Sharding, mesh_shape: tuple[int, ...]) -> list[int]:
    sh = placements(sharding) if isinstance(sharding, str) else sharding
    out = list(shape)
    for p, n in zip(sh, mesh_shape):
        if isinstance(p, Shard):
            out[p.dim] //= n
    return out


def local_range(size: int, dim: int, sharding: Sharding, mesh: DeviceMesh) -> tuple[int, int]:
    """[start, stop) of tensor dim ``dim`` held by this rank: nested blocks, outer mesh dim first."""
    start = 0
    for d, p in enumerate(sharding):
        if isinstance(p, Shard) and p.dim == dim:
            size //= mesh.size(d)
            start += mesh.get_local_rank(d) * size
    return start, start + size


def vocab_parallel_embedding(weight: torch.Tensor, indices: torch.Tensor, mesh: DeviceMesh, weight_sharding: str,
                             padding_idx: int = -1) -> torch.Tensor:
    """Embedding whose weight rows (the vocabulary) are split: each rank looks up the ids in its rows
    and writes zeros for the others; the output is a partial sum over the vocab-splitting mesh dims.
    ``padding_idx`` (global row, -1: none; as ``aten.embedding``): that row gets no gradient."""
    sh = placements(weight_sharding)
    vocab = weight.shape[0] * _product(mesh.size(d) for d, p in enumerate(sh) if p == Shard(0))
    start, stop = local_range(vocab, 0, sh, mesh)
    outside = (indices < start) | (indices >= stop)
    local_ids = (indices - start).masked_fill(outside, 0)
    pad = padding_idx - start if padding_idx is not None and start <= padding_idx < stop else None
    out = F.embedding(local_ids, weight, padding_idx=pad)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def sharded_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mesh: DeviceMesh, logits_sharding: str,
                          ignore_index: int = -100, reduction: int = 1, replicated: bool = False) -> torch.Tensor:
    """Cross-entropy of logits [N, C] split over rows (batch) and/or classes (vocabulary).

    Batch-split mesh dims give a partial sum: local sum of losses divided by the global number of
    counted targets (exact with ignored targets). Vocab-split mesh dims reduce the max (no
    gradient needed: log-sum-exp is shift invariant), the sum of exponentials and the target
    logit across ranks. ``reduction``: 0 none (per-row losses), 1 mean, 2 sum (ATen's enum). ``replicated``: return the loss
    summed over the batch-splitting dims (replicated), loss and count in one all-reduce per dim.
    """
    sh = placements(logits_sharding)
    batch_dims = [d for d, p in enumerate(sh) if p == Shard(0)]
    vocab_dims = [d for d, p in enumerate(sh) if p == Shard(1)]
    valid = target != ignore_index
    if vocab_dims:
        row = tuple(Shard(0) if d in batch_dims else Replicate() for d in range(len(sh)))
        part = tuple(Partial("sum") if d in vocab_dims else p for d, p in enumerate(row))
        m = logits.detach().amax(dim=-1)
        for d in vocab_dims:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=mesh.get_group(d))
        sumexp = redistribute(torch.exp(logits - m.unsqueeze(-1)).sum(-1), part, row, mesh=mesh)
        vocab = logits.shape[1] * _product(mesh.size(d) for d in vocab_dims)
        start, stop = local_range(vocab, 1, sh, mesh)
        mine = (target >= start) & (target < stop)
        idx = (target - start).clamp(0, stop - start - 1)
        # indexing, not gather: gather's backward keeps the whole logits shard, indexing only the indices
        rows = torch.arange(logits.shape[0], device=logits.device)
        tl = redistribute(logits[rows, idx] * mine, part, row, mesh=mesh)
        loss = torch.log(sumexp) + m - tl
    else:
        loss = F.cross_entropy(logits, target.masked_fill(~valid, 0), reduction="none")
    loss = loss * valid
    if reduction == 0:   # per row (this rank's rows where the batch is split)
        return loss
    return rows_reduced(loss.sum(), valid.sum(), mesh, batch_dims, reduction, replicated)


def rows_reduced(loss_sum: torch.Tensor, count: torch.Tensor, mesh: DeviceMesh, batch_dims: list[int],
                 reduction: int, replicated: bool) -> torch.Tensor:
    """The local rows' loss sum -> the sum (``reduction`` 2) or the mean over the global count of counted
    rows (1): a partial sum over ``batch_dims``, or with ``replicated`` the replicated total."""
    groups = [mesh.get_group(d) for d in batch_dims]
    if replicated and groups:
        return _RowsReduced.apply(loss_sum, count.to(loss_sum.dtype), groups, reduction == 1)
    if reduction == 2:
        return loss_sum
    count = count.to(loss_sum.dtype)
    for g in groups:
        count = count.clone()
        dist.all_reduce(count, group=g)
    return loss_sum / count


class _RowsReduced(torch.autograd.Function):
    """(sum, count) of this rank's rows -> the replicated sum or mean over the groups' ranks, both in one
    all-reduce per group. Backward: each rank's partial sum receives the (replicated) gradient, divided
    by the global count for a mean."""

    @staticmethod
    def forward(ctx, loss_sum, count, groups, mean: bool):
        buf = torch.stack([loss_sum.detach(), count])
        for g in groups:
            dist.all_reduce(buf, group=g)
        ctx.count = buf[1] if mean else None
        return buf[0] / buf[1] if mean else buf[0].clone()

    @staticmethod
    def backward(ctx, grad):
        return (grad / ctx.count if ctx.count is not None else grad), None, None, None


def sharded_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, mesh: DeviceMesh,
                 x_sharding: str, eps: float | None, rms: bool) -> torch.Tensor:
    """layer_norm (``rms=False``) or rms_norm over the last dim of ``x`` where that dim is split (placements
    ``x_sharding``): this rank sums its part of each row (the sum and the sum of squares; rms: the sum of
    squares), one all-reduce per hidden-splitting mesh dim makes them the row's (its backward all-reduces
    their gradients), and each rank normalizes its part with its slice of ``weight`` / ``bias``. The
    statistics are kept in fp32 at least (as ATen's CPU kernels accumulate). Layer norm's variance is
    E[x^2] - mean^2 of the reduced sums (one all-reduce instead of two)."""
    sh = placements(x_sharding)
    last = x.dim() - 1
    hidden = x.shape[-1] * _product(mesh.size(d) for d, p in enumerate(sh) if p == Shard(last))
    part = tuple(Partial("sum") if p == Shard(last) else p for p in sh)
    whole = tuple(Replicate() if p == Shard(last) else p for p in sh)
    xs = x.to(torch.promote_types(x.dtype, torch.float32))
    local = (xs * xs).sum(-1, keepdim=True) if rms else torch.cat([xs.sum(-1, keepdim=True),
                                                                  (xs * xs).sum(-1, keepdim=True)], -1)
    stats = redistribute(local, part, whole, mesh=mesh, grad_dst=part) / hidden
    if rms:
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        y = xs * torch.rsqrt(stats + eps)
    else:
        mean, sq = stats[..., :1], stats[..., 1:]
        y = (xs - mean) * torch.rsqrt(sq - mean * mean + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)   # as ATen's norms: the input's dtype (bf16 under autocast on the CPU)


def _product(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def local_chunk(t: torch.Tensor, sharding: str | Sharding, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's block of a full tensor (a view): nested blocks, outer mesh dim first; Partial keeps
    the value on coordinate 0 and zeros elsewhere."""
    sh = placements(sharding) if isinstance(sharding, str) else sharding
    for d, p in enumerate(sh):
        if isinstance(p, Shard):
            t = t.chunk(mesh.size(d), dim=p.dim)[mesh.get_local_rank(d)]
        elif isinstance(p, Partial) and mesh.get_local_rank(d) != 0:
            t = torch.zeros_like(t)
    return t
