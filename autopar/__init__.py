"""autopar: a compiler-style auto-parallelizer for PyTorch.

``autopar.plan`` captures a model, solves one ILP over per-operator shardings and returns a
:class:`Plan`; ``autopar.parallelize`` / ``autopar.apply`` turn a plan into a module that runs
on ``torch.distributed``.
"""
from autopar.errors import (AutoparError, CaptureError, ClusterProfileError, ConfigError, InfeasiblePlanError,
                            MeshError, PlanFormatError, PlanMismatchError, RankFailureError, ShardingError)

from autopar.plan import Plan  # noqa: I001  (the module autopar.plan; the name is rebound to the function below)
from autopar.api import apply, parallelize, plan
from autopar.capture import capture
from autopar.pipeline import forward_backward
from autopar.checkpoint import load, save
from autopar.config import init_distributed
from autopar.faults import guard_step
from autopar import memory, precision, zero
from autopar.offload_optimizer import HostOptimizer, make_optimizer

__all__ = ["AutoparError", "CaptureError", "ClusterProfileError", "ConfigError", "HostOptimizer", "InfeasiblePlanError",
           "MeshError", "Plan", "PlanFormatError", "PlanMismatchError", "RankFailureError", "ShardingError", "apply",
           "capture", "forward_backward", "guard_step", "init_distributed", "load", "make_optimizer", "memory",
           "parallelize", "plan", "precision", "save", "zero"]

# The solver and codegen are imported by autopar.plan / autopar.apply when first used.
