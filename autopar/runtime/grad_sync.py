"""Bucketed, overlapped gradient reduction for data-parallel parameters (DDP semantics).

Parameters whose gradients are partial sums over some mesh dims (replicated parameters used by
batch-split ops) are reduced here instead of inline. Buckets hold parameters of one dtype and one set
of mesh dims, 1 MiB for the first, then ~25 MiB, as DDP, in the order gradients become ready.

When every gradient of a bucket has been accumulated, the bucket's gradients are concatenated into a
fresh flat buffer, each parameter's ``.grad`` becomes a view of its slot (the accumulated tensors are
freed: a bucket's gradients exist twice only for that moment; a bucket of one parameter, such as a
parameter larger than a bucket, is not copied at all), and one asynchronous all-reduce per mesh dim
runs on the buffer in place while backward goes on. The end of backward only waits: there is
no copy back, and at the end of backward the buckets *are* the gradients (as DDP's
``gradient_as_bucket_view``, but every backward gets new buffers, so a gradient a caller kept from an
earlier step is never overwritten).

Gradient accumulation over several backward calls is exact: the gradient a parameter held before
this backward is taken out before the reduction and added back after. Imports autopar's core only.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from autopar.core.errors import ConfigError
from autopar.core.runtime_rules import FIRST_GRAD_BUCKET_BYTES, GRAD_BUCKET_BYTES, grad_buckets


class GradReducer:
    """``params``: (leaf tensor, mesh dims its gradient is a partial sum over, publish) in the order
    their gradients become ready; ``publish(leaf)`` (or None) is called once the leaf's ``.grad`` is a
    view of its bucket (the runtime points the DTensor parameter's ``.grad`` there)."""

    def __init__(self, params: list[tuple[torch.Tensor, tuple[int, ...], Callable | None]], mesh: DeviceMesh,
                 bucket_bytes: int = GRAD_BUCKET_BYTES, first_bucket_bytes: int = FIRST_GRAD_BUCKET_BYTES) -> None:
        self.mesh = mesh
        self.buckets: list[list[torch.Tensor]] = []
        self.dims: list[tuple[int, ...]] = []
        self.bucket_of: dict[int, int] = {}
        self._publish = {id(p): fn for p, _, fn in params}
        # the bucketing rule the planner prices (core.runtime_rules.grad_buckets): consecutive parameters of
        # one (dims, dtype), a small first bucket so the first all-reduce starts early
        by_index = [p for p, _, _ in params]
        grouped = grad_buckets([(i, tuple(dims), p.dtype, p.numel() * p.element_size())
                                for i, (p, dims, _) in enumerate(params)], bucket_bytes, first_bucket_bytes)
        for names, dims, _nbytes in grouped:
            self._close([by_index[i] for i in names], (dims,))
        self._base: dict[int, torch.Tensor] = {}
        self._ready: list[set[int]] = [set() for _ in self.buckets]
        self._pending: list[tuple[list[torch.Tensor], list]] = []
        self._callback_queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for b in self.buckets for p in b]

    def _close(self, params: list[torch.Tensor], key) -> None:
        idx = len(self.buckets)
        self.buckets.append(params)
        self.dims.append(key[0])
        for p in params:
            self.bucket_of[id(p)] = idx

    def replace(self, old: torch.Tensor, new: torch.Tensor, publish: Callable | None) -> None:
        """The leaf ``old`` was replaced by ``new`` (its parameter was assigned anew): reduce ``new`` in its place."""
        b = self.bucket_of.pop(id(old), None)
        if b is None:
            return
        if new.dtype != old.dtype or new.shape != old.shape:
            raise ConfigError(f"a data-parallel parameter was replaced by one of dtype {new.dtype} and shape "
                              f"{tuple(new.shape)}, not {old.dtype} {tuple(old.shape)}; copy values into the "
                              f"parameter in place (load_state_dict without assign=True) or parallelize again")
        params = self.buckets[b]
        params[next(i for i, q in enumerate(params) if q is old)] = new
        self.bucket_of[id(new)] = b
        self._publish.pop(id(old), None)
        self._publish[id(new)] = publish
        self._handles.append(new.register_post_accumulate_grad_hook(self._on_grad))

    def prepare(self) -> None:
        """Before a forward whose backward will accumulate: remember gradients already held."""
        self._base = {id(p): p.grad.detach().clone() for b in self.buckets for p in b if p.grad is not None}

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._callback_queued = True
        b = self.bucket_of[id(p)]
        self._ready[b].add(id(p))
        if len(self._ready[b]) == len(self.buckets[b]):
            self._launch(b, self.buckets[b])

    def _launch(self, b: int, params: list[torch.Tensor]) -> None:
        if len(params) == 1 and id(params[0]) not in self._base and params[0].grad.is_contiguous():
            flat = params[0].grad.view(-1)     # a bucket of one (e.g. an embedding): reduced in place
        else:
            grads = []
            for p in params:
                base = self._base.get(id(p))
                grads.append(p.grad.reshape(-1) if base is None else (p.grad - base).reshape(-1))
            flat = torch.cat(grads)
            del grads
            offset = 0
            for p in params:                 # the gradients become views of the bucket: no copy back
                n = p.numel()
                p.grad = flat[offset:offset + n].view(p.shape)
                offset += n
        for p in params:
            publish = self._publish[id(p)]
            if publish is not None:
                publish(p)
        dims = self.dims[b]
        works = []
        for i, d in enumerate(dims):
            last = i == len(dims) - 1
            w = dist.all_reduce(flat, group=self.mesh.get_group(d), async_op=last)
            if last:
                works.append(w)
        self._pending.append((params, works))
        self._ready[b] = set()

    def _finish(self) -> None:
        for b, params in enumerate(self.buckets):  # buckets some of whose parameters got no gradient
            if self._ready[b]:
                self._launch(b, [p for p in params if id(p) in self._ready[b]])
        for params, works in self._pending:
            for w in works:
                w.wait()
            if self._base:
                for p in params:
                    base = self._base.get(id(p))
                    if base is not None:
                        p.grad.add_(base)
        self._pending = []
        self._base = {}
        self._callback_queued = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
