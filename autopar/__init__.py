"""autopar: a compiler-style auto-parallelizer for PyTorch.

``autopar.plan`` captures a model, solves one ILP over per-operator shardings and returns a
:class:`Plan`; ``autopar.parallelize`` / ``autopar.apply`` turn a plan into a module that runs
on ``torch.distributed``. The package is laid out by role (see README, "Layout"): ``core``,
``cluster``, ``ops``, ``runtime``, ``frontend``, ``tools``, ``models``; ``autopar.solver``,
``autopar.codegen`` and ``autopar.runtime_kernels`` live in the top-level folders of those names.
"""
from autopar.core.capture import capture
from autopar.core.errors import (
                                 AutoparError,
                                 CaptureError,
                                 ClusterProfileError,
                                 ConfigError,
                                 InfeasiblePlanError,
                                 MeshError,
                                 PlanFormatError,
                                 PlanMismatchError,
                                 RankFailureError,
                                 ShardingError,
)
from autopar.core.options import ApplyOptions, PipelineOptions, PlanOptions
from autopar.core.plan import Plan
from autopar.frontend.applying import apply, parallelize
from autopar.frontend.explicit import DataParallel, PipelineParallel, TensorParallel, ZeroOptimizer, convert_to_amp
from autopar.frontend.planning import plan
from autopar.runtime import memory, precision, zero
from autopar.runtime.checkpoint import load, save
from autopar.runtime.distributed import init_distributed
from autopar.runtime.faults import guard_step
from autopar.runtime.host_optimizer import HostOptimizer, make_optimizer
from autopar.runtime.pipeline import forward_backward

__all__ = ["ApplyOptions", "AutoparError", "CaptureError", "ClusterProfileError", "ConfigError", "DataParallel",
           "HostOptimizer", "InfeasiblePlanError", "MeshError", "PipelineOptions", "PipelineParallel", "Plan",
           "PlanFormatError", "PlanMismatchError", "PlanOptions", "RankFailureError", "ShardingError", "TensorParallel",
           "ZeroOptimizer", "apply", "capture", "convert_to_amp", "forward_backward", "guard_step", "init_distributed",
           "load", "make_optimizer", "memory", "parallelize", "plan", "precision", "save", "zero"]
