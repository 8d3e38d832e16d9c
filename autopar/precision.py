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

from autopar.errors import PlanFormatError

__all__ = ["COMPUTE_DTYPES", "LOSS_SCALING", "check_precision", "compute_dtype", "grad_scaler",
           "precision_context"]

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOSS_SCALING = ("none", "dynamic")


def check_precision(precision: dict) -> dict[str, str]:
    """The precision dict with defaults filled in; a bad field raises PlanFormatError naming it."""
    if not isinstance(precision, dict):
        raise PlanFormatError(f"plan.precision: expected an object, got {type(precision).__name__}")
    unknown = set(precision) - {"param_dtype", "compute_dtype", "loss_scaling"}
    if unknown:
        raise PlanFormatError(f"plan.precision: unknown field(s) {sorted(unknown)}; known: param_dtype, "
                              f"compute_dtype, loss_scaling")
    param = precision.get("param_dtype", "float32")
    if param != "float32":
        raise PlanFormatError(f"plan.precision.param_dtype: {param!r} is not supported; parameters are float32 "
                              f"master weights (lower the compute with compute_dtype instead)")
    comp = precision.get("compute_dtype", "float32")
    if comp not in COMPUTE_DTYPES:
        raise PlanFormatError(f"plan.precision.compute_dtype: {comp!r} is not one of {sorted(COMPUTE_DTYPES)}")
    scaling = precision.get("loss_scaling", "dynamic" if comp == "float16" else "none")
    if scaling not in LOSS_SCALING:
        raise PlanFormatError(f"plan.precision.loss_scaling: {scaling!r} is not one of {list(LOSS_SCALING)}")
    if scaling == "dynamic" and comp != "float16":
        raise PlanFormatError(f"plan.precision.loss_scaling: 'dynamic' is for float16 compute; with "
                              f"{comp} use 'none'")
    return {"param_dtype": param, "compute_dtype": comp, "loss_scaling": scaling}


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
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    return ShardedGradScaler(device_type, process_group=process_group, **options)
