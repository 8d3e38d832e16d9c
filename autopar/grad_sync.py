"""Bucketed, overlapped gradient reduction for data-parallel parameters (DDP semantics).

Parameters whose gradients are partial sums over some mesh dims (replicated parameters used by
batch-split ops) are reduced here instead of inline: when every gradient of a bucket (1 MiB for the
first, then ~25 MiB, as DDP; in the order gradients become ready) has been accumulated, one asynchronous all-reduce per mesh
dim is launched on the flattened bucket while backward goes on; the end of backward waits for
them and writes the sums back. Gradient accumulation over several backward calls is exact: the
gradient a parameter held before this backward is taken out before the reduction and added back
after. Imports autopar's core only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if hasattr(t, "_local_tensor") else t


class GradReducer:
    def __init__(self, params: list[tuple[nn.Parameter, tuple[int, ...]]], mesh: DeviceMesh,
                 bucket_bytes: int = 25 * 2**20, first_bucket_bytes: int = 2**20) -> None:
        self.mesh = mesh
        self.buckets: list[list[nn.Parameter]] = []
        self.dims: list[tuple[int, ...]] = []
        self.bucket_of: dict[int, int] = {}
        cur: list[nn.Parameter] = []
        size, cur_dims = 0, None
        for p, dims in params:  # params in the order their gradients become ready
            nbytes = _local(p).numel() * _local(p).element_size()
            cap = first_bucket_bytes if not self.buckets else bucket_bytes  # a small first bucket starts early
            if cur and (size + nbytes > cap or dims != cur_dims):
                self._close(cur, cur_dims)
                cur, size = [], 0
            cur.append(p)
            cur_dims = dims
            size += nbytes
        if cur:
            self._close(cur, cur_dims)
        self._base: dict[int, torch.Tensor] = {}
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._pending: list[tuple[int, torch.Tensor, list]] = []
        self._callback_queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b]

    def _close(self, params: list[nn.Parameter], dims: tuple[int, ...]) -> None:
        idx = len(self.buckets)
        self.buckets.append(params)
        self.dims.append(dims)
        for p in params:
            self.bucket_of[id(p)] = idx

    def prepare(self) -> None:
        """Before a forward whose backward will accumulate: remember gradients already held."""
        self._base = {id(p): _local(p.grad).detach().clone() for b in self.buckets for p in b if p.grad is not None}

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True
        b = self.bucket_of[id(p)]
        self._ready[b].add(id(p))
        if len(self._ready[b]) == len(self.buckets[b]):
            self._launch(b, self.buckets[b])

    def _launch(self, b: int, params: list[nn.Parameter]) -> None:
        grads = []
        for p in params:
            g = _local(p.grad)
            base = self._base.get(id(p))
            grads.append(g - base if base is not None else g)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dims = self.dims[b]
        works = []
        for i, d in enumerate(dims):
            last = i == len(dims) - 1
            w = dist.all_reduce(flat, group=self.mesh.get_group(d), async_op=last)
            if last:
                works.append(w)
        self._pending.append((b, flat, [p for p in params], works))
        self._ready[b] = set()

    def _finish(self) -> None:
        for b, params in enumerate(self.buckets):  # buckets some of whose parameters got no gradient
            if self._ready[b]:
                self._launch(b, [p for p in params if id(p) in self._ready[b]])
        for b, flat, params, works in self._pending:
            for w in works:
                w.wait()
            offset = 0
            for p in params:
                g = _local(p.grad)
                n = g.numel()
                new = flat[offset:offset + n].view_as(g)
                base = self._base.get(id(p))
                g.copy_(new + base if base is not None else new)
                offset += n
        self._pending = []
        self._base = {}
        self._callback_queued = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
