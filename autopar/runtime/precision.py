"""Mixed precision as the plan states it: autocast for compute, fp32 master weights, dynamic loss scaling.

``plan.precision`` = ``{"param_dtype": "float32", "compute_dtype": "float32" | "bfloat16" | "float16",
"loss_scaling": "none" | "dynamic"}`` (``loss_scaling`` defaults to ``"dynamic"`` for float16 and
``"none"`` otherwise). Parameters, gradients and optimizer states stay float32; the forward (and so
the backward) runs under ``torch.autocast(device_type, compute_dtype)``. float16 uses a gradient
scaler whose overflow check is agreed by all ranks (torch's ``ShardedGradScaler``: every rank holds
only its gradient shards, so one rank's inf must make every rank skip the step).

The runtime wraps the parallel module's graph call in :func:`precision_context`; training code
makes its scaler with :func:`grad_scaler`. This module imports autopar's core only.
"""
from __future__ import annotations

import contextlib

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from autopar.core.plan import LOSS_SCALING, PRECISION_DTYPES, check_precision

__all__ = ["COMPUTE_DTYPES", "LOSS_SCALING", "check_precision", "compute_dtype", "grad_scaler",
           "precision_context"]

COMPUTE_DTYPES = {name: getattr(torch, name) for name in PRECISION_DTYPES}


def compute_dtype(plan) -> torch.dtype:
    return COMPUTE_DTYPES[check_precision(plan.precision)["compute_dtype"]]


def precision_context(plan, device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, compute_dtype)`` for a lower-precision plan, else a no-op context."""
    dtype = compute_dtype(plan)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(plan, device_type: str, process_group=None, **options):
    """A dynamic loss scaler for a float16 plan (None when the plan does not scale the loss).

    Use as ``torch.amp.GradScaler``: ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``.
    Non-finite gradients on any rank of ``process_group`` (default: the world) skip the step on all of
    them and halve the scale. ``options``: ``init_scale``, ``growth_interval``, ... as GradScaler."""
    if check_precision(plan.precision)["loss_scaling"] != "dynamic":
        return None
    return ShardedGradScaler(device_type, process_group=process_group, **options)
