"""Gradient accumulation with one gradient synchronization per step.

An applied module reduces data-parallel gradients when they are accumulated into its parameters' local
leaves (post-accumulate hooks of ``autopar.runtime.grad_sync`` and ``autopar.runtime.zero``). So the
micro-batches before the last do not accumulate into the leaves at all: their gradients are taken with
``torch.autograd.grad`` (no accumulation, so no hook fires and nothing is reduced) and summed here. The
last micro-batch runs an ordinary ``backward`` with a hook on each leaf that adds the held sum to the
incoming gradient, so the reducer sees the whole step's local gradient once and all-reduces (or
reduce-scatters) it once: the collectives of gradient sync per step do not depend on the number of
micro-batches (``tests/test_train_loop.py`` counts them). Activation collectives of tensor-parallel ops
run per micro-batch, as they must.

Costs one gradient-sized buffer per local leaf while accumulating (what DDP's ``no_sync`` holds too).
Must not: change how a single backward reduces (that is the runtime's job).
"""
from __future__ import annotations

import torch
from torch import nn

from autopar.core.errors import ConfigError

__all__ = ["Accumulator"]


class Accumulator:
    """``backward(loss, last)`` per micro-batch of ``module`` (an applied module or a plain one)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.parallel = hasattr(module, "_leaf") and hasattr(module, "grad_reducer")
        self._held: list[torch.Tensor | None] | None = None

    def _leaves(self) -> list[torch.Tensor]:
        m = self.module
        return [m._leaf(fqn) for fqn, p in m.named_parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        if not self.parallel:               # one process: plain accumulation into .grad
            loss.backward()
            return
        leaves = self._leaves()
        if not last:
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            if self._held is None:
                self._held = list(grads)
            else:
                self._held = [g if h is None else (h if g is None else h.add_(g)) for h, g in zip(self._held, grads)]
            return
        held, self._held = self._held, None
        if held is None:
            loss.backward()
            return
        fired = [False] * len(leaves)
        handles = []
        for i, (leaf, h) in enumerate(zip(leaves, held)):
            if h is not None:
                handles.append(leaf.register_hook(_adder(h, fired, i)))
        try:
            loss.backward()
        finally:
            for hd in handles:
                hd.remove()
        lost = [i for i, h in enumerate(held) if h is not None and not fired[i]]
        if lost:
            names = [fqn for fqn, p in self.module.named_parameters() if p.requires_grad]
            raise ConfigError(f"parameter {names[lost[0]]!r} got a gradient in an earlier micro-batch but none in "
                              f"the last one; gradient accumulation needs every trained parameter in every "
                              f"micro-batch (set requires_grad=False on parameters the model does not use)")


def _adder(held: torch.Tensor, fired: list[bool], i: int):
    def hook(g: torch.Tensor) -> torch.Tensor:
        fired[i] = True
        return g + held
    return hook
