"""The ILP's model and its parts: categories fail loudly, one table places them in rows, the parts use the
model's public interface only, and one backend function owns the solver policy."""
from __future__ import annotations

import ast
from pathlib import Path

import pulp
import pytest

from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.models import build_model
from autopar.solver import backend
from autopar.solver.model import ROWS, MemCategory, MemRow, ShardingModel, TimeCategory

SOLVER = Path(__file__).resolve().parents[2] / "solver"
PARTS = ("model", "categories", "keys", "edges", "buckets", "remat", "zero_rows", "offload", "backend")


@pytest.fixture(scope="module")
def model():
    from autopar.core.capture import capture
    m, x = build_model("gpt-tiny", batch=2, seq=8, device="meta")
    gi = index_graph(capture(m, x))
    return ShardingModel(gi, {}, MeshSpec.make((2,)), (), remat=False)


def test_every_category_has_its_rows_and_the_rows_read_the_table():
    assert set(ROWS) == set(MemCategory)
    assert ROWS[MemCategory.HOST] == ()   # host memory is reported, never a device row
    for cat in (MemCategory.PARAMS, MemCategory.OPTIMIZER):
        assert set(ROWS[cat]) == set(MemRow)


def test_a_wrong_category_fails_loudly(model):
    with pytest.raises(TypeError):
        model.add_mem("blocks", [(1.0, None)])
    with pytest.raises(TypeError):
        model.add_time("recompute", [(1.0, None)])
    with pytest.raises(TypeError):
        model.mem(("grads",))
    with pytest.raises(TypeError):
        model.add_mem(TimeCategory.COMM, [(1.0, None)])
    with pytest.raises(KeyError, match="blokcs"):
        MemCategory.parse("blokcs")


def test_memory_rows_sum_their_categories(model):
    v = model.var("t_v", lowBound=0)
    model.add_mem(MemCategory.RECOMPUTE_HOLD, [(3.0, v)])
    model.add_mem(MemCategory.GRADS, [(5.0, v)])
    rows = model.memory_exprs()
    assert list(rows) == ["backward", "step"]   # the recompute row is closed until remat opens it
    assert rows["step"].get(v) == 5.0 and rows["backward"].get(v) is None
    model.open_row(MemRow.RECOMPUTE)
    assert model.memory_exprs()["recompute"].get(v) == 3.0


def test_parts_use_the_public_interface_and_never_import_the_ilp():
    for name in PARTS:
        tree = ast.parse((SOLVER / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "autopar.solver.ilp" and not (
                    node.module == "autopar.solver" and any(a.name == "ilp" for a in node.names)), name
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                # another object's private field (cost's _shard_factor is a helper of the cost model)
                assert ast.unparse(node.value) in ("self", "C"), f"{name}.py:{node.lineno} {ast.unparse(node)}"


def _tiny_lp() -> pulp.LpProblem:
    prob = pulp.LpProblem("t", pulp.LpMinimize)
    x = prob.add_variable("x", cat="Binary")
    y = prob.add_variable("y", cat="Binary")
    prob += x + 2 * y
    prob += x + y >= 1, "one"
    return prob


def test_backend_solves_and_falls_back_to_cbc_when_told():
    res = backend.solve_problem(_tiny_lp())
    assert res.has_plan and res.optimal and not res.timed_out and res.status == "Optimal"
    if res.backend != "highs":
        pytest.skip("highspy is not installed: no HiGHS answer to distrust")
    seen = []
    res = backend.solve_problem(_tiny_lp(), distrust=lambda r: seen.append(r.backend) or "test says so")
    assert seen == ["highs"] and res.backend == "cbc" and res.has_plan


class _IncumbentAtTimeLimit:
    """CBC at its time limit: status "Optimal" with an unproved incumbent (sol_status)."""

    def actualSolve(self, lp, **kwargs):
        for v in lp.variables():
            v.varValue = 1.0
        lp.assignStatus(pulp.LpStatusOptimal, pulp.LpSolutionIntegerFeasible)
        return pulp.LpStatusOptimal


def test_optimality_is_read_from_sol_status(monkeypatch):
    monkeypatch.setattr(backend, "make_solver", lambda name, tl: (_IncumbentAtTimeLimit(), "cbc"))
    res = backend.solve_problem(_tiny_lp())
    assert res.has_plan and not res.optimal and res.status == "Optimal"
