"""Activation and optimizer offload decided in the sharding ILP (solver/offload.py).

Known answers on the tiny GPT (2 blocks) on a (2,) mesh: with memory to spare nothing is offloaded;
on h100-sxm (a 64 GB/s host link that hides a block's copies behind its compute) a budget that
forces memory decisions offloads activations instead of recomputing them, and the plan is faster
than the best plan without offload at the same budget; on cpu-gloo (the host is the device)
offload is never offered; every plan stays within its budget.
"""
from __future__ import annotations

import dataclasses

import pytest

import autopar
from autopar.cluster.profile import PRESETS
from autopar.core.capture import capture
from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.models import build_model
from autopar.solver import backend, ilp
from autopar.solver.model import value
from autopar.solver.offload import host_link
from autopar.solver.saved import saved_tensors


@pytest.fixture(scope="module")
def gpt():
    return build_model("gpt-tiny", batch=8, seq=32, device="meta")


def _plan(gpt, cluster, budget=None):
    model, inputs = gpt
    return autopar.plan(model, inputs, mesh_shape=(2,), cluster=cluster, memory_budget=budget)


@pytest.fixture(scope="module")
def free_peak(gpt):
    return _plan(gpt, "h100-sxm").predicted.peak_memory_bytes


def test_memory_to_spare_offloads_nothing(gpt):
    p = _plan(gpt, "h100-sxm")
    assert p.offload == () and p.optimizer_offload is False
    assert p.predicted.time_breakdown["offload_s"] == 0.0
    assert "host" not in p.predicted.memory_breakdown


def test_host_is_device_offers_no_offload():
    assert PRESETS["cpu-gloo"].host_is_device and host_link(PRESETS["cpu-gloo"]) is None
    assert not PRESETS["h100-sxm"].host_is_device and host_link(PRESETS["h100-sxm"]).bandwidth == 64e9
    # a profile `autopar profile` measured on gloo names its device "cpu (<model>, N thread(s) per rank)"
    cpu = PRESETS["cpu-gloo"].device
    measured = dataclasses.replace(PRESETS["h100-sxm"], device=dataclasses.replace(
        cpu, name="cpu (AMD EPYC 7B13, 1 thread(s) per rank)"))
    assert measured.host_is_device and host_link(measured) is None


def test_tight_budget_offloads_where_recompute_costs_more(gpt, free_peak):
    budget = int(0.5 * free_peak)
    p = _plan(gpt, "h100-sxm", budget)
    assert p.predicted.peak_memory_bytes <= budget
    assert p.offload and p.offload[0].startswith("blocks."), p.offload
    assert not set(p.offload) & {c.split(":")[0] for c in p.checkpoint}
    assert p.predicted.time_breakdown["offload_s"] > 0
    assert p.predicted.memory_breakdown["host"] > 0
    # the same ILP without the offload options (recompute only) is slower at this budget
    model, inputs = gpt
    cap = capture(model, inputs)
    gi = index_graph(cap)
    mesh = MeshSpec.make((2,))
    prof = PRESETS["h100-sxm"]
    keys = ilp.collect_keys(gi, mesh, prof, saved=saved_tensors(cap.program.graph_module))
    links = prof.dim_links(mesh)
    without = ilp.solve(gi, mesh, prof, links=links, budget=budget, keys=keys, offload=False)
    with_ = ilp.solve(gi, mesh, prof, links=links, budget=budget, keys=keys)
    assert with_.offload and not without.offload
    assert without.peak_bytes <= budget and with_.peak_bytes <= budget
    assert with_.objective < without.objective


def test_smallest_budgets_move_the_optimizer_to_the_host(gpt, free_peak):
    with pytest.raises(autopar.InfeasiblePlanError) as ei:
        _plan(gpt, "h100-sxm", int(0.05 * free_peak))
    need = ei.value.min_feasible_bytes
    p = _plan(gpt, "h100-sxm", int(need * 1.01) + 1)
    assert p.optimizer_offload is True
    assert p.predicted.memory_breakdown["optimizer"] == 0
    assert p.predicted.peak_memory_bytes <= need * 1.01 + 1
    # cpu-gloo cannot go that low: its smallest budget keeps the optimizer on the device
    with pytest.raises(autopar.InfeasiblePlanError) as ej:
        _plan(gpt, "cpu-gloo", int(need * 1.01) + 1)
    assert ej.value.min_feasible_bytes > need


class _WrongSolver:
    """Stands in for a HiGHS run that wrongly reports infeasible (as its presolve once did)."""

    def actualSolve(self, lp, **kwargs):
        lp.assignStatus(-1)   # pulp.LpStatusInfeasible
        return -1


def test_a_wrong_infeasible_answer_is_solved_again_with_cbc(gpt, monkeypatch, caplog):
    real = backend.make_solver
    monkeypatch.setattr(backend, "make_solver", lambda name, tl: (_WrongSolver(), "highs") if name != "cbc"
                        else real(name, tl))
    # a plan of 1 byte "exists" (the min-memory solve would meet the wrong solver too)
    monkeypatch.setattr(ilp, "_min_memory", lambda *a, **k: 1.0)
    p = _plan(gpt, "cpu-gloo", 64 << 20)
    assert p.solver.backend == "cbc" and p.solver.status == "Optimal"
    assert "HiGHS found no plan" in caplog.text


def test_show_names_the_memory_decisions(gpt, free_peak):
    from autopar.tools.report import summary

    p = _plan(gpt, "h100-sxm", int(0.5 * free_peak))
    text = summary(p)
    decisions = next(line for line in text.splitlines() if line.startswith("memory decisions: "))
    assert f"offload activations {p.offload[0]}" in decisions, text
    assert "; offloaded to host " in text and "host" not in text.split("(")[2].split(")")[0]
    assert "memory decisions" not in summary(_plan(gpt, "h100-sxm"))


def test_a_solution_over_budget_is_caught(gpt):
    """The post-solve check that guards against a solver incumbent breaking a memory row (HiGHS at its
    time limit once returned one 184 MiB over on llama3-8b)."""
    model, inputs = gpt
    cap = capture(model, inputs)
    gi = index_graph(cap)
    mesh, prof = MeshSpec.make((2,)), PRESETS["cpu-gloo"]
    keys = ilp.collect_keys(gi, mesh, prof, saved=saved_tensors(cap.program.graph_module))
    m = ilp.ShardingILP(gi, keys, mesh, prof.dim_links(mesh), 1 << 40, remat=True)
    m.build()
    assert backend.solve_problem(m.prob).has_plan
    m.settle()
    peak = max(e.value() for e in m.memory_exprs().values())
    assert ilp._over_budget(m, 1 << 40) is None and ilp._over_budget(m, peak) is None
    row, excess = ilp._over_budget(m, 0.5 * peak)
    assert row in m.memory_exprs() and excess >= 0.5 * peak - 1


def test_offload_can_be_switched_off(gpt, free_peak):
    budget = int(0.5 * free_peak)
    model, inputs = gpt
    p = autopar.plan(model, inputs, mesh_shape=(2,), cluster="h100-sxm", memory_budget=budget, offload=False)
    assert p.offload == () and not p.optimizer_offload and p.predicted.peak_memory_bytes <= budget
    assert p.predicted.step_time_s > _plan(gpt, "h100-sxm", budget).predicted.step_time_s
    with pytest.raises(autopar.ConfigError, match="offload must be True, False or None"):
        autopar.plan(model, inputs, mesh_shape=(2,), offload="no")


def test_told_offload_moves_every_block_and_needs_a_host(gpt):
    model, inputs = gpt
    p = autopar.plan(model, inputs, mesh_shape=(2,), cluster="h100-sxm", recompute="offload")
    none = autopar.plan(model, inputs, mesh_shape=(2,), cluster="h100-sxm", recompute="none")
    assert p.offload == ("blocks.0", "blocks.1") and p.checkpoint == ()
    assert p.predicted.memory_breakdown["host"] > 0
    assert p.predicted.peak_memory_bytes < none.predicted.peak_memory_bytes
    with pytest.raises(autopar.ConfigError, match="device is not the host"):
        autopar.plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo", recompute="offload")
    with pytest.raises(autopar.ConfigError, match="offload=True"):
        autopar.plan(model, inputs, mesh_shape=(2,), cluster="h100-sxm", recompute="offload", offload=False)


def test_offloaded_block_holds_one_op_not_the_block(gpt):
    """In backward an offloaded block's tensors come back one op at a time (codegen.offload_activations),
    a recomputed block holds them all: under the same budget-free plan, the recompute row of the offload
    plan is below the full-recompute plan's by the block's activations less its largest op's."""
    model, inputs = gpt
    cap = capture(model, inputs)
    gi = index_graph(cap)
    mesh = MeshSpec.make((2,))
    prof = PRESETS["h100-sxm"]
    saved = saved_tensors(cap.program.graph_module, set(cap.program.graph_signature.inputs_to_parameters))
    rows = {}
    for mode in ("full", "offload"):
        keys = ilp.collect_keys(gi, mesh, prof, saved=saved)
        prob = ilp.ShardingILP(gi, keys, mesh, prof.dim_links(mesh), None, remat=True, recompute=mode,
                               host=host_link(prof))
        prob.build()
        assert backend.solve_problem(prob.prob).has_plan
        prob.settle()
        lv = prob.remat_rows.lists["blocks"]
        rows[mode] = (lv.peak.varValue, sum(c * value(x) for c, x in lv.recomputed) / 2**20,
                      max(sum(c * value(x) for c, x in t) for t in lv.offloaded) / 2**20 if lv.offloaded else None)
    assert rows["full"][0] == pytest.approx(rows["full"][1])          # T_g: the whole block
    assert rows["offload"][0] == pytest.approx(rows["offload"][2])    # T_g: the largest op
    assert 0 < rows["offload"][0] < 0.5 * rows["full"][0]
