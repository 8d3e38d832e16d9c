"""The hook between code that allocates host memory on the device's behalf (offloaded activations, host
optimizer states) and the memory trackers listening (``autopar.runtime.memory``).

A tracker registers itself in ``ACTIVE`` while it is inside its ``with`` block and implements
``host_enter()`` / ``host_exit()``; ``host_allocations()`` tells every active tracker that the tensors
made inside are host memory. Nothing is tracked (and nothing costs anything) when no tracker is active.
Imports nothing of autopar's own: codegen's offload pass and the runtime both call it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

ACTIVE: list = []   # trackers inside their ``with`` block


@contextlib.contextmanager
def host_allocations() -> Iterator[None]:
    """Tensors made inside are host memory (offloaded activations): counted as ``host`` by every active
    tracker, never as device bytes. Used by the offload hooks; costs nothing when nothing is tracked."""
    active = list(ACTIVE)
    for t in active:
        t.host_enter()
    try:
        yield
    finally:
        for t in active:
            t.host_exit()
