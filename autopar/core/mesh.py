"""Mesh description used by the planner (no process group needed) and its checks."""
from __future__ import annotations

import math
from dataclasses import dataclass

from autopar.core.errors import MeshError

PP_DIM = "pp"   # the mesh dim name that pipeline stages are laid along


@dataclass(frozen=True, kw_only=True)
class MeshSpec:
    """The logical device mesh: sizes and names of its dimensions (outer first)."""

    shape: tuple[int, ...]
    dim_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.shape or any((not isinstance(s, int)) or s < 1 for s in self.shape):
            raise MeshError(f"mesh shape {self.shape!r} must be a non-empty tuple of positive ints, e.g. (2, 4)")
        if len(self.dim_names) != len(self.shape):
            raise MeshError(f"mesh has {len(self.shape)} dims {self.shape} but {len(self.dim_names)} names "
                            f"{self.dim_names}; give one name per dim, e.g. ('dp', 'tp')")
        if len(set(self.dim_names)) != len(self.dim_names):
            raise MeshError(f"mesh dim names {self.dim_names} must be distinct")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @staticmethod
    def make(shape: tuple[int, ...] | list[int] | str, dim_names: tuple[str, ...] | list[str] | str | None = None
             ) -> "MeshSpec":
        if isinstance(shape, str):
            shape = parse_mesh_shape(shape)
        shape = tuple(int(s) for s in shape)
        if isinstance(dim_names, str):
            dim_names = tuple(n.strip() for n in dim_names.split(",") if n.strip())
        if dim_names is None:
            dim_names = default_dim_names(len(shape))
        return MeshSpec(shape=shape, dim_names=tuple(dim_names))

    def check_world_size(self, world_size: int) -> None:
        if self.size != world_size:
            raise MeshError(f"mesh {'x'.join(map(str, self.shape))} needs {self.size} ranks but the process group "
                            f"has {world_size}; launch with --nproc-per-node {self.size} or plan for another mesh")


def default_dim_names(ndim: int) -> tuple[str, ...]:
    return {1: ("dp",), 2: ("dp", "tp"), 3: ("dp", "sp", "tp")}.get(ndim, tuple(f"d{i}" for i in range(ndim)))


def parse_mesh_shape(text: str) -> tuple[int, ...]:
    body = text.lower().replace("(", "").replace(")", "").replace(" ", "").replace(",", "x").rstrip("x") \
        if text.strip().endswith(",)") else text.lower().replace("(", "").replace(")", "").replace(" ", "").replace(",", "x")
    try:
        shape = tuple(int(p) for p in body.split("x"))
    except ValueError:
        raise MeshError(f"mesh {text!r} is not of the form 8x8 or 2x2x2") from None
    if not shape or any(s < 1 for s in shape):
        raise MeshError(f"mesh {text!r} must have positive sizes, e.g. 8x8")
    return shape
