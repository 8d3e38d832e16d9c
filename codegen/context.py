"""What every codegen pass reads: the plan's placements per fx node, the mesh, the graph index."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from autopar.core.capture import CapturedModel
from autopar.core.errors import PlanMismatchError
from autopar.core.graph import GNode, GraphIndex, index_graph
from autopar.core.plan import NodeSharding, Plan


@dataclass
class ShardingContext:
    plan: Plan
    gi: GraphIndex
    shardings: dict[str, NodeSharding]     # fx node name -> placements from the plan
    mesh_shape: tuple[int, ...]
    # per graph output (flattened, in order): the placements it is returned in; None: replicated (a pipeline
    # stage returns the values it sends on in its send placements, autopar.frontend.applying.apply_pipeline)
    output_targets: tuple[str, ...] | None = None

    @staticmethod
    def build(cap: CapturedModel, plan: Plan) -> "ShardingContext":
        gi = index_graph(cap)
        shardings = {}
        for name, g in gi.nodes.items():
            ns = plan.node_shardings.get(g.key)
            if ns is None:
                raise PlanMismatchError(
                    f"the plan has no placements for graph node {g.key!r} ({name}); it was made for another model "
                    f"or other inputs: re-plan this model with autopar.plan / `autopar plan`")
            if len(ns.inputs) != len(g.inputs) or len(ns.outputs) != len(g.outputs):
                raise PlanMismatchError(f"graph node {g.key!r} has {len(g.inputs)} tensor inputs and "
                                        f"{len(g.outputs)} outputs but the plan lists {len(ns.inputs)} and "
                                        f"{len(ns.outputs)}; re-plan this model")
            shardings[name] = ns
        return ShardingContext(plan=plan, gi=gi, shardings=shardings, mesh_shape=tuple(plan.mesh.shape))

    def output_sharding(self, name: str, out: int = 0) -> str:
        s = self.shardings[name].outputs[out]
        return " ".join(s) if s is not None else " ".join("R" for _ in self.mesh_shape)

    def input_sharding(self, name: str, i: int) -> str:
        return " ".join(self.shardings[name].inputs[i])

    def split_dims(self, name: str) -> tuple[bool, ...]:
        """Per mesh dim: does the node's strategy divide its work (any placement not R)?"""
        ns = self.shardings[name]
        all_pl = [s for s in ns.inputs + ns.outputs if s is not None]
        return tuple(any(s[d] != "R" for s in all_pl) for d in range(len(self.mesh_shape)))

    def gnode(self, name: str) -> GNode | None:
        return self.gi.nodes.get(name)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh GraphModule over a copy of gm's graph (same node names), owning no parameters."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    for old, copied in val_map.items():
        if copied.name != old.name:
            # fx's namespace renames nodes that shadow builtins (a placeholder ``input`` becomes ``input_1``);
            # the passes find nodes by the captured names, and a local variable may shadow a builtin
            copied.name = old.name
            graph._graph_namespace._used_names.add(old.name)
    new = fx.GraphModule(torch.nn.Module(), graph)
    return new

