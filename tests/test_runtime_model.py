"""One model of what the runtime does (autopar.solver.runtime_model), checked against the runtime and the ILP.

A. For the fuzzer's random plans (solver.random_plan, without memory decisions) of gpt-tiny and llama-tiny on
   meshes (2,) and (2,2), the collectives the parallel module really runs in one forward + backward (counted in
   the gloo workers by wrapping every torch.distributed collective: tests/runtime_model_check.py) are exactly
   ``planned_collectives``: the same calls by (phase, kind, mesh dim, bytes).
B. ``price_plan`` prices a plan term by term as the ILP's objective does: for the solver's own plans and for
   fixed DP / TP plans its total equals ``plan.solver.objective`` (rel 1e-9), and explain's per-node shares sum
   to it.
"""
from __future__ import annotations

from collections import Counter

import pytest
from fuzz_check import case_for
from runtime_model_check import capture_for, count_collectives, make_plan, planned_counts

import autopar
from autopar.core import runtime_rules as RR
from autopar.core.capture import capture
from autopar.core.errors import ConfigError
from autopar.core.graph import index_graph
from autopar.models import build_model
from autopar.solver import runtime_model as RM
from autopar.solver.ilp import collect_keys
from autopar.tools.explain import explain

SEEDS_2 = [0, 1, 4, 5]     # gpt-tiny, llama-tiny on (2,) (fuzz_check.case_for)
SEEDS_4 = [2, 3, 6, 7]     # gpt-tiny, llama-tiny on (2, 2)


def test_seeds_cover_both_models_on_both_meshes():
    assert {case_for(s) for s in SEEDS_2} == {(m, (2,)) for m in ("gpt-tiny", "llama-tiny")}
    assert {case_for(s) for s in SEEDS_4} == {(m, (2, 2)) for m in ("gpt-tiny", "llama-tiny")}


def _check_counts(pool, seeds):
    cases = [make_plan(s) for s in seeds]
    rows = pool.run(count_collectives, [(spec, plan.to_json(), seed) for spec, plan, seed in cases])
    kinds = set()
    for (spec, plan, seed), *per_rank in zip(cases, *rows):
        want = planned_counts(spec, plan)
        for rank, row in enumerate(per_rank):
            assert row["seed"] == seed and "error" not in row, row
            got = [(tuple(k), n) for k, n in row["counts"]]
            if got != want:
                diff = sorted(set(got) ^ set(want))
                pytest.fail(f"seed {seed} ({spec} on {plan.mesh.shape}), rank {rank}: the runtime ran other "
                            f"collectives than planned_collectives lists; (phase, kind, mesh dim, bytes), count "
                            f"differing: {diff}")
        kinds |= {k[:3] for k, _ in want}
    return kinds


def test_runtime_runs_the_planned_collectives_on_2_ranks(dist2):
    kinds = _check_counts(dist2, SEEDS_2)
    # the sample exercises forward reshards, their gradients and the reducer's buckets
    assert {("fwd", "all_gather", 0), ("bwd", "all_reduce", 0)} <= kinds, kinds


def test_runtime_runs_the_planned_collectives_on_2x2(dist4):
    kinds = _check_counts(dist4, SEEDS_4)
    assert {k[2] for k in kinds} == {0, 1} and {k[0] for k in kinds} == {"fwd", "bwd"}, kinds


def test_planned_collectives_of_a_dp_plan_are_the_buckets():
    """Pure data parallelism: every parameter gradient summed by the reducer in buckets on mesh dim 0 (the count
    runtime_rules.grad_bucket_count gives), the loss returned replicated by one (loss, count) all-reduce."""
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="meta")
    plan = autopar.plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo", recompute="none", zero=0, offload=False,
                        fix={"input:*": ["S(0)"], "param:*": ["R"], "wpe/*": ["R"], "root/arange*": ["R"]},
                        prefer={"*": ["S(0)"]})
    gi = index_graph(capture_for("gpt-tiny"))
    cols = RM.planned_collectives(plan, gi)
    buckets = [c for c in cols if c.what.startswith("gradient bucket")]
    grad_bytes = sum(n.outputs[0].nbytes for n in gi.nodes.values() if n.kind == "param")
    assert buckets and all((c.phase, c.kind, c.mesh_dim) == ("bwd", "all_reduce", 0) for c in buckets)
    assert sum(c.bytes for c in buckets) == grad_bytes
    assert len(buckets) == RR.grad_bucket_count(grad_bytes)   # one dtype, one set of dims: the count rule
    rest = [c for c in cols if c not in buckets]
    assert [(c.phase, c.kind, c.bytes) for c in rest] == [("fwd", "all_reduce", 8)], rest


def test_planned_collectives_refuses_what_it_does_not_model():
    spec, plan, _ = make_plan(0)
    gi = index_graph(capture_for(spec))
    import dataclasses
    with pytest.raises(ConfigError, match="recompute"):
        RM.planned_collectives(dataclasses.replace(plan, checkpoint=("blocks.0:full",)), gi)


# ---------------------------------------------------------------------------------------------------- B

DP = {"input:*": ["S(0)"], "param:*": ["R"]}
TP = {"input:*": ["R"], "param:*": ["S(0)"]}
DP_TP = {"input:*": ["S(0)", "R"], "param:*": ["R", "S(0)"]}
PLANS = [((2,), None), ((2, 2), None), ((2,), DP), ((2,), TP), ((2, 2), DP_TP)]


@pytest.fixture(scope="module")
def gpt_meta():
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="meta")
    cap = capture(model, inputs)
    return model, inputs, cap, index_graph(cap)


@pytest.mark.parametrize("mesh, fix", PLANS, ids=["solver-2", "solver-2x2", "dp-2", "tp-2", "dp-tp-2x2"])
def test_price_plan_is_the_ilp_objective(gpt_meta, mesh, fix):
    model, inputs, _, gi = gpt_meta
    kw = {"fix": fix, "recompute": "none", "zero": 0, "offload": False} if fix else {}
    plan = autopar.plan(model, inputs, mesh_shape=mesh, cluster="cpu-gloo", **kw)
    assert not plan.checkpoint and not plan.offload and not plan.optimizer_sharding
    keys = collect_keys(gi, plan.mesh, plan.cluster)
    links = plan.cluster.dim_links(plan.mesh)
    price = RM.price_plan(plan, gi, keys, links)
    assert price.memory_s == 0
    assert price.total_s == pytest.approx(plan.solver.objective, rel=1e-9)
    assert price.total_s == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
    assert price.comm_s == pytest.approx(plan.predicted.time_breakdown["comm_s"], rel=1e-9, abs=1e-15)
    nodes = explain(plan, "gpt-tiny", every_node=True)
    assert {n.key for n in nodes} == set(keys)
    assert sum(n.share.total_s for n in nodes) == pytest.approx(plan.solver.objective, rel=1e-9)
    if fix is not None:   # the fixed plans communicate; their edges are priced as the ILP priced them
        assert price.comm_s > 0


def test_edge_pricing_buckets_parameter_gradients_as_the_ilp(gpt_meta):
    """explain once charged every data-parallel gradient a latency of its own (edge_cost without param=); it now
    prices edges with runtime_model.edge_seconds, the ILP's pricing: a DP plan's shares sum to the objective,
    and a replicated parameter's gradient pays a bucket's share of one latency, not one latency."""
    model, inputs, _, gi = gpt_meta
    plan = autopar.plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo", fix=DP, recompute="none", zero=0,
                        offload=False)
    keys = collect_keys(gi, plan.mesh, plan.cluster)
    links = plan.cluster.dim_links(plan.mesh)
    chosen = RM.chosen_strategies(plan, keys)
    w = keys["param:blocks.*.mlp.fc.weight"]
    (kv, a), = [(kv, a) for (ku, o, kv, a) in gi.edge_classes() if ku == w.node.key]
    meta = w.node.outputs[0]
    priced = RM.edge_seconds(gi, w.node, meta, chosen[w.node.key].outputs[0], chosen[kv].inputs[a],
                             RM.consumer_split(chosen[kv], a), plan.mesh.shape, links)
    alone = RM.price_collectives([RM.Collective("bwd", "all_reduce", 0, meta.nbytes)], plan.mesh.shape, links)
    alpha = links[0].collectives["all_reduce"].alpha + links[0].sync_s
    assert priced.fwd_s == 0 and priced.bwd_s == pytest.approx(alone - alpha * (1 - meta.nbytes / RR.GRAD_BUCKET_BYTES))


@pytest.mark.parametrize("seed", [0, 2])   # gpt-tiny on (2,) and (2, 2)
def test_a_resharded_parameter_pays_its_inline_gradient_all_reduce(seed):
    """A parameter whose use reshards it is never deferred (runtime_rules.deferred_grads): its data-parallel
    gradient is summed inline by the reshard's backward, a full latency per collective. The ILP prices that edge so
    (edges.grad_priced_bucketed; it once priced it as a bucket's share): per such edge of a random plan, the ILP's
    price is the priced runtime collectives of its reshards."""
    spec, plan, _ = make_plan(seed)
    gi = index_graph(capture_for(spec))
    keys = collect_keys(gi, plan.mesh, plan.cluster)
    links = plan.cluster.dim_links(plan.mesh)
    chosen = RM.chosen_strategies(plan, keys)
    cols = RM.planned_collectives(plan, gi)
    uses = Counter(ku for ku, *_ in gi.edge_classes())
    checked = 0
    for (ku, o, kv, a), mult in gi.edge_classes().items():
        if not ku.startswith("param:") or uses[ku] != 1:
            continue
        src, dst, split = chosen[ku].outputs[0], chosen[kv].inputs[a], RM.consumer_split(chosen[kv], a)
        if src == dst or not any(split):
            continue
        mine = [c for c in cols if c.what.startswith(f"reshard {ku}[0]")]
        assert any(c.phase == "bwd" and c.kind in ("all_reduce", "reduce_scatter") for c in mine), (ku, mine)
        priced = RM.edge_seconds(gi, keys[ku].node, keys[ku].node.outputs[0], src, dst, split, plan.mesh.shape, links)
        assert mult * priced.total == pytest.approx(RM.price_collectives(mine, plan.mesh.shape, links), rel=1e-12), ku
        checked += 1
    assert checked >= 2


def test_explain_prices_a_bf16_plan_at_its_dtypes(gpt_meta):
    """explain costs a plan on the graph the planner priced (cost.precision_graph): a bf16 plan's shares sum to
    its objective; on the float32 graph they did not (compute at fp32 throughput, activations at 4 bytes)."""
    model, inputs, _, _ = gpt_meta
    plan = autopar.plan(model, inputs, mesh_shape=(2,), cluster="h100-sxm", precision="bf16", fix=DP,
                        recompute="none", zero=0, offload=False)
    nodes = explain(plan, "gpt-tiny", every_node=True)
    assert sum(n.share.total_s for n in nodes) == pytest.approx(plan.solver.objective, rel=1e-9)
