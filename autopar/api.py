"""The front end: ``autopar.plan`` (no process group needed) and ``autopar.parallelize`` / ``apply``.

Wires capture -> solver -> codegen; the only module besides the CLI that imports both floors.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from torch import nn

from autopar.capture import ExampleInputs, capture
from autopar.errors import ConfigError
from autopar.mesh import MeshSpec
from autopar.plan import Plan
from autopar.profile import ClusterProfile, load_cluster

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
PLAN_OPTIONS = {"fix", "backend", "time_limit", "nodes", "fold_layers"}


def parse_bytes(value: int | float | str | None) -> int | None:
    """``40GiB``, ``80GB``, ``1.5e9`` or an int -> bytes (None stays None); must be positive."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"memory budget {value!r} is not a size; write bytes (int) or e.g. '40GiB', '80GB'")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n > 0:
        raise ConfigError(f"memory budget must be positive, got {value!r}")
    return int(n)


def plan(model: nn.Module, example_inputs: ExampleInputs, *, mesh_shape: tuple[int, ...] | list[int] | str,
         mesh_dim_names: tuple[str, ...] | list[str] | str | None = None,
         cluster: str | Path | ClusterProfile = "h100-sxm", memory_budget: int | str | None = None,
         **options) -> Plan:
    """Capture ``model`` on ``example_inputs`` and solve a sharding plan for a mesh of ``mesh_shape``.

    ``cluster``: a preset name (``h100-sxm``, ``h200-sxm``, ``a100-80g-sxm``, ``cpu-gloo``) or a profile
    JSON path. ``memory_budget``: bytes per device (int or ``"40GiB"``); default the device capacity.
    Options: ``fix`` {key or FQN glob: placements} pins placements (e.g. ``{"input:*": ["S(0)", "R"]}``),
    ``backend`` ("auto" = HiGHS when installed, else CBC; "highs"; "cbc"), ``time_limit`` seconds,
    ``nodes`` (how many nodes the mesh spans), ``fold_layers`` (capture 2 of N identical blocks).
    """
    unknown = set(options) - PLAN_OPTIONS
    if unknown:
        raise ConfigError(f"unknown plan option(s) {sorted(unknown)}; known: {sorted(PLAN_OPTIONS)}")
    mesh = MeshSpec.make(mesh_shape, mesh_dim_names)
    profile = load_cluster(cluster)
    budget = parse_bytes(memory_budget)
    if budget is None:
        budget = profile.device.memory_capacity
    t0 = time.perf_counter()
    cap = capture(model, example_inputs, fold_layers=options.get("fold_layers", True))
    t1 = time.perf_counter()
    from autopar.solver import plan_graph
    return plan_graph(cap, mesh, profile, nodes=options.get("nodes"), budget=budget, fix=options.get("fix"),
                      backend=options.get("backend", "auto"), time_limit=float(options.get("time_limit", 60.0)),
                      phase_times={"capture": t1 - t0})
