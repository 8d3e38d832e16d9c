"""Ranking mesh layouts of the same devices by predicted step time (``plan_layouts``)."""
from __future__ import annotations

from torch import nn

from autopar.cluster.profile import load_cluster
from autopar.core.capture import ExampleInputs
from autopar.core.errors import InfeasiblePlanError, ShardingError
from autopar.core.mesh import PP_DIM, MeshSpec
from autopar.core.options import parse_bytes
from autopar.frontend.pipeline import choose_partition
from autopar.frontend.planning import plan as plan_fn

__all__ = ["plan_layouts"]


def plan_layouts(model: nn.Module, example_inputs: ExampleInputs, layouts: list[tuple[tuple[int, ...], tuple[str, ...]]],
                 *, cluster="h100-sxm", memory_budget=None, nodes: int | None = None, pipeline="auto",
                 backend: str = "auto", time_limit: float = 60.0) -> list[tuple[MeshSpec, float | None, str]]:
    """Compare mesh layouts of the same devices: each (shape, dim names) is planned (with pipeline stages
    when it has a ``pp`` dim, ``pipeline`` as in autopar.plan) and ranked by predicted step time.

    Returns ``(mesh, predicted step time or None, note)`` fastest first; a layout that does not fit the
    memory budget (or whose ILP found no plan within ``time_limit``) gets None and the reason; the note of
    a layout without a pipeline says whether its
    ILP was solved to proven optimality (else its time is an upper bound on that layout's best plan).
    Only the inter-op decision is made for pipelined layouts (no per-stage plans): enough to choose,
    e.g., whether the pipeline, DP or TP crosses the nodes.
    """
    profile = load_cluster(cluster)
    budget = parse_bytes(memory_budget)
    if budget is None:
        budget = profile.device.memory_capacity
    out = []
    for shape, names in layouts:
        mesh = MeshSpec.make(shape, names)
        try:
            if PP_DIM in names:
                part, _, _ = choose_partition(model, example_inputs, mesh, profile, budget, pipeline, nodes=nodes,
                                              backend=backend, time_limit=time_limit)
                out.append((mesh, part.step_time_s, f"{part.schedule}, {part.microbatches} micro-batches, "
                                                     f"bubble {part.bubble_fraction:.1%}"))
            else:
                p = plan_fn(model, example_inputs, mesh_shape=shape, mesh_dim_names=names, cluster=profile,
                            memory_budget=budget, nodes=nodes, backend=backend, time_limit=time_limit,
                            pipeline=False)
                proven = "optimal" if p.solver.optimal else "not proven optimal (time limit): an upper bound"
                out.append((mesh, p.predicted.step_time_s, f"no pipeline, {proven}"))
        except InfeasiblePlanError as e:
            out.append((mesh, None, str(e).split(";")[0]))
        except ShardingError as e:     # not solved in time: unknown, not infeasible
            out.append((mesh, None, str(e)))
    return sorted(out, key=lambda r: (r[1] is None, r[1] or 0.0))
