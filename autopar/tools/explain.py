"""``autopar show --explain``: why each node of a plan got its sharding.

The plan JSON holds decisions, not the graph, so the model is recaptured (the fingerprint must
match) and every strategy of every node is costed with the solver's own functions
(``collect_keys`` for compute and memory; ``solver.runtime_model.edge_seconds`` for resharding, the
ILP's own edge pricing, data-parallel gradients bucketed where the ILP prices them so). A strategy's
cost is local: its compute plus the resharding on its input edges (producers at their chosen
placements) and on its output edges (consumers at their chosen placements), times the number of
identical nodes the key stands for. Each node's ``share`` of the step is the plan priced by
``solver.runtime_model.price_plan``: its compute and the resharding on its input edges (on its outputs
to the graph output too), so every edge is counted once and the shares of all nodes
(``every_node=True``) sum to the ILP's objective (plus the recompute and offload seconds of the plan's
memory decisions, ``StepPrice.memory_s``). The chosen strategy is listed with the ``top`` cheapest
alternatives and their difference; the ILP decides globally, so an alternative can be locally
cheaper (it would force costlier choices elsewhere, or break the memory budget). A plan made with
fused kernels (``plan.fusions``) has its fused ops costed as the planner did (solver.fusion). Front
end: imports the solver; plans nothing and changes nothing.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from autopar.core.capture import capture
from autopar.core.errors import PlanMismatchError
from autopar.core.graph import index_graph
from autopar.core.placement import Replicate, parse_sharding
from autopar.core.plan import Plan
from autopar.frontend.planning import fusible_groups  # cost fused ops as the planner did
from autopar.models import build_model
from autopar.solver import cost as C
from autopar.solver import fusion as F
from autopar.solver import runtime_model as RM
from autopar.solver.ilp import OUTPUT, collect_keys
from autopar.solver.strategies import Strategy
from autopar.tools.report import fmt_bytes, fmt_time


@dataclass(frozen=True, kw_only=True)
class Option:
    label: str
    compute_s: float
    comm_s: float
    memory_bytes: float
    chosen: bool

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s


@dataclass(frozen=True, kw_only=True)
class NodeExplanation:
    key: str
    group: str
    count: float
    chosen: Option
    alternatives: tuple[Option, ...]     # cheapest first, the chosen one excluded
    share: RM.NodePrice | None = None    # this key's part of the step as the ILP prices it (sums to the objective)


def _group(key: str) -> str:
    body = key.split(":", 1)[1] if key.startswith(("param:", "buffer:", "input:")) else key
    head = body.split("/")[0]
    if ".*" in head:
        return head[:head.index(".*") + 2]
    return head.split(".")[0] or "root"


def _strategy(ns, key: str) -> Strategy:
    parse = lambda sh, i: tuple(parse_sharding(list(sh), field=f"node_shardings[{key!r}][{i}]"))  # noqa: E731
    return Strategy(inputs=tuple(parse(s, i) for i, s in enumerate(ns.inputs)),
                    outputs=tuple(parse(s, i) if s is not None else None for i, s in enumerate(ns.outputs)))


_consumer_split = RM.consumer_split


def explain(plan: Plan, model_spec: str, *, top: int = 2, every_node: bool = False) -> list[NodeExplanation]:
    """Per node key with a choice (``every_node``: every key): the plan's strategy and the next ``top``
    alternatives, costed, and the key's share of the step (module docstring)."""
    shapes = {i["name"]: i["shape"] for i in plan.model.inputs}
    first = next(iter(shapes.values()), [1, 1])
    batch, seq = (list(first) + [1, 1])[:2]
    model, inputs = build_model(model_spec, batch=batch, seq=seq, device="meta")
    cap = capture(model, inputs, fold_layers=bool(plan.model.folded_layers))
    if cap.fingerprint() != plan.model.fingerprint:
        raise PlanMismatchError(f"{model_spec} with inputs {shapes} is not the model the plan was made for; give "
                                f"the --model the plan was made with")
    mesh, profile = plan.mesh, plan.cluster
    gi = C.precision_graph(index_graph(cap), plan.precision, profile)   # the dtypes the planner priced
    links = profile.dim_links(mesh)
    keys = collect_keys(gi, mesh, profile, training=plan.mode == "training")
    missing = [k for k in keys if k not in plan.node_shardings]
    if missing:
        raise PlanMismatchError(f"the plan has no sharding for {missing[:3]}: it was made by another autopar or "
                                f"for another capture; re-plan the model")
    chosen = {k: _strategy(plan.node_shardings[k], k) for k in keys}
    if plan.fusions and all(chosen[k] in info.strategies for k, info in keys.items()):

        sh = F.shares(gi, F.check_fusions(fusible_groups(cap)))
        F.unfuse_broken(gi, keys, sh, F.fuse_costs(gi, keys, sh, profile, mesh.shape), chosen, {}, profile,
                        mesh.shape)
    ins: dict[str, list] = defaultdict(list)
    outs: dict[str, list] = defaultdict(list)
    for (ku, o, kv, a), m in gi.edge_classes().items():
        ins[kv].append((ku, o, a, m))
        outs[ku].append((o, kv, a, m))
    for ref in gi.output_refs:
        outs[gi.nodes[ref.src].key].append((ref.out, OUTPUT, 0, 1.0))

    def comm(key: str, s: Strategy) -> float:
        total = 0.0
        for ku, o, a, m in ins[key]:
            meta = keys[ku].node.outputs[o]
            if meta is None:
                continue
            total += m * RM.edge_seconds(gi, keys[ku].node, meta, chosen[ku].outputs[o], s.inputs[a],
                                         _consumer_split(s, a), mesh.shape, links).total
        for o, kv, a, m in outs[key]:
            meta = keys[key].node.outputs[o]
            if meta is None or s.outputs[o] is None:
                continue
            if kv == OUTPUT:
                dst, split = tuple(Replicate() for _ in mesh.shape), tuple(False for _ in mesh.shape)
            else:
                dst, split = chosen[kv].inputs[a], _consumer_split(chosen[kv], a)
            total += m * RM.edge_seconds(gi, keys[key].node, meta, s.outputs[o], dst, split, mesh.shape, links).total
        return total

    # ZeRO's collectives are not separable from the edges (price_plan); a strategy not among the key's is
    # reported below
    priceable = not (plan.optimizer_sharding or plan.gradient_sharding) and \
        all(chosen[k] in info.strategies for k, info in keys.items())
    step = RM.price_plan(plan, gi, keys, links, chosen) if priceable else None
    result = []
    for key, info in keys.items():
        if len(info.strategies) < 2 and not every_node:
            continue
        options = [Option(label=s.label(), compute_s=info.mult * info.compute[j].total, comm_s=comm(key, s),
                          memory_bytes=info.mult * sum(info.memory[j].values()), chosen=s == chosen[key])
                   for j, s in enumerate(info.strategies)]
        pick = next((o for o in options if o.chosen), None)
        if pick is None:
            raise PlanMismatchError(f"node {key}: the plan's sharding {chosen[key].label()} is not one of its "
                                    f"strategies; re-plan the model")
        alts = sorted((o for o in options if not o.chosen), key=lambda o: (o.total_s, o.memory_bytes))
        result.append(NodeExplanation(key=key, group=_group(key), count=info.mult, chosen=pick,
                                      alternatives=tuple(alts[:top]),
                                      share=step.nodes[key] if step is not None else None))
    return result


def render_explanation(nodes: list[NodeExplanation], plan: Plan | None = None) -> str:
    """Tables per layer group: node, chosen/alternative strategy, compute, comm, memory, difference."""
    headers = ["node", "choice", "placements (inputs -> outputs)", "compute", "comm", "memory", "vs chosen"]
    groups: dict[str, list[list[str]]] = defaultdict(list)
    for n in nodes:
        name = n.key.split("/", 1)[1] if "/" in n.key else n.key
        for i, o in enumerate((n.chosen,) + n.alternatives):
            diff = "" if o.chosen else f"{'+' if o.total_s >= n.chosen.total_s else '-'}" \
                                       f"{fmt_time(abs(o.total_s - n.chosen.total_s))}"
            groups[n.group].append([name if i == 0 else "", "chosen" if o.chosen else f"alt {i}", o.label,
                                    fmt_time(o.compute_s), fmt_time(o.comm_s), fmt_bytes(o.memory_bytes), diff])
    parts = ["why each node got its sharding: per node, its cost with neighbours at their chosen placements "
             "(times the blocks a shared layer stands for); the ILP trades these off globally under the "
             "memory budget"]
    for g, rows in groups.items():
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        parts += ["", g, line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(parts)
