"""Every error autopar raises. Each message says what went wrong and what to do about it.

This module imports nothing of autopar's own.
"""
from __future__ import annotations


class AutoparError(Exception):
    """Base of every error autopar raises."""


class CaptureError(AutoparError):
    """torch.export could not capture the model (names the op and source line when known)."""


class MeshError(AutoparError):
    """The mesh does not fit the devices, the world size or the plan."""


class ClusterProfileError(AutoparError):
    """A cluster preset is unknown or a profile file is missing, malformed or inconsistent."""


class PlanFormatError(AutoparError):
    """A plan file is malformed (names the field) or has an unknown version."""


class InfeasiblePlanError(AutoparError):
    """No plan fits the memory budget; ``min_feasible_bytes`` is the smallest budget that would."""

    def __init__(self, message: str, *, min_feasible_bytes: int | None = None) -> None:
        super().__init__(message)
        self.min_feasible_bytes = min_feasible_bytes

    def __reduce__(self):  # keeps min_feasible_bytes when the error crosses a process boundary
        return _infeasible, (str(self), self.min_feasible_bytes)


class PlanMismatchError(AutoparError):
    """A plan does not belong to this model or these inputs (names the parameter or input)."""


class ShardingError(AutoparError):
    """A dimension cannot be split as planned (uneven, or not allowed by the op)."""


class ConfigError(AutoparError):
    """A bad option or argument (a budget that is not positive, an unknown option, ...)."""


class RankFailureError(AutoparError):
    """A rank died or stopped responding during a step; ``lost_ranks`` names it (empty when unknown)."""

    def __init__(self, message: str, *, lost_ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.lost_ranks = tuple(lost_ranks)

    def __reduce__(self):  # keeps lost_ranks when the error crosses a process boundary
        return _rank_failure, (str(self), self.lost_ranks)


def _rank_failure(message: str, lost_ranks: tuple[int, ...]) -> RankFailureError:
    return RankFailureError(message, lost_ranks=lost_ranks)


def _infeasible(message: str, min_feasible_bytes: int | None) -> InfeasiblePlanError:
    return InfeasiblePlanError(message, min_feasible_bytes=min_feasible_bytes)
