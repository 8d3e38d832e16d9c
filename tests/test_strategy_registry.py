"""Walks the strategy registry: every strategy of every rule, forced on a small graph, matches one device."""
from __future__ import annotations

import pytest
import torch

from autopar.solver.strategies import registered_rules
from strategy_cases import CASES, case_strategy_counts, force_every_strategy

MESHES = [((2,), "dist2"), ((2, 2), "dist4")]


def test_every_registered_rule_has_a_case():
    covered = {op for _, _, ops in CASES.values() for op in ops}
    rules = {t for t in registered_rules() if t != "pointwise"}
    # ops registered for completeness whose cases are variants of the covered ones
    variants = {torch.ops.aten._unsafe_view.default, torch.ops.aten.unflatten.int, torch.ops.aten.squeeze.dim,
                torch.ops.aten.squeeze.dims, torch.ops.aten.squeeze.default, torch.ops.aten.split_with_sizes.default,
                torch.ops.aten.unbind.int, torch.ops.aten._softmax.default, torch.ops.aten._log_softmax.default,
                torch.ops.aten.sum.default, torch.ops.aten.mean.default, torch.ops.aten.native_dropout.default,
                torch.ops.aten.arange.start, torch.ops.aten.zeros.default, torch.ops.aten.ones.default,
                torch.ops.aten.full.default, torch.ops.aten.empty.memory_format, torch.ops.aten.scalar_tensor.default,
                torch.ops.aten.clone.default, torch.ops.aten._to_copy.default, torch.ops.aten.alias.default,
                torch.ops.aten.detach.default, torch.ops.aten.to.dtype, torch.ops.aten.lift_fresh_copy.default,
                torch.ops.aten.neg.default}
    missing = rules - covered - variants
    assert not missing, f"rules without a forced-strategy case: {missing}"


@pytest.mark.parametrize("mesh_shape,pool", MESHES, ids=["(2,)", "(2,2)"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_strategy_matches_single_device(case, mesh_shape, pool, request):
    expected = case_strategy_counts(case, mesh_shape)
    assert expected >= 1
    r = request.getfixturevalue(pool).run(force_every_strategy, case, mesh_shape)[0]
    assert r["checked"] == expected
    assert not r["failures"], "\n".join(r["failures"][:20])


def test_moe_routing_ops_are_not_replicate_fallbacks():
    """topk / gather / scatter_add / argmax / cumsum / sort take DTensor's rules, one_hot / index_add autopar's:
    each offers split strategies on a mesh dim instead of the logged replicate fallback."""
    from autopar.core.capture import capture
    from autopar.core.graph import index_graph
    from autopar.solver.strategies import strategies_for
    from strategy_cases import CASES

    seen = set()
    for case in ("topk", "gather_argmax", "scatter_add", "sort_cumsum", "one_hot", "index_add"):
        model_fn, inputs_fn, ops = CASES[case]
        gi = index_graph(capture(model_fn(), inputs_fn(), fold_layers=False))
        for g in gi.nodes.values():
            if g.kind == "op" and g.target in ops:
                strategies, fallback = strategies_for(g, gi.nodes, (2,))
                assert not fallback and len(strategies) > 1, (case, g.target)
                seen.add(g.target)
    assert len(seen) == 8
