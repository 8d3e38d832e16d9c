"""autopar: a compiler-style auto-parallelizer for PyTorch.

``autopar.plan`` captures a model, solves one ILP over per-operator shardings and returns a
:class:`Plan`; ``autopar.parallelize`` / ``autopar.apply`` turn a plan into a module that runs
on ``torch.distributed``.
"""
from autopar.errors import (AutoparError, CaptureError, ClusterProfileError, ConfigError, InfeasiblePlanError,
                            MeshError, PlanFormatError, PlanMismatchError, ShardingError)

__all__ = ["AutoparError", "CaptureError", "ClusterProfileError", "ConfigError", "InfeasiblePlanError", "MeshError",
           "PlanFormatError", "PlanMismatchError", "ShardingError", "capture"]


def __getattr__(name: str):
    # Lazy: keep `import autopar` light; the front end pulls in the solver only when used.
    if name == "capture":
        from autopar.capture import capture
        return capture
    raise AttributeError(f"module 'autopar' has no attribute {name!r}")
