"""ZeRO-1/2 decided in the sharding ILP: known answers on the tiny GPT (batch 2 x 8 tokens, so the
end-of-backward row -- parameters, gradients, AdamW states and the gradient reducer's flat copy of the
data-parallel gradients: 4 + 4 + 8 + 4 bytes per parameter -- sets the peak)
on a (2,) mesh with the batch split and recompute told off (the decisions here are ZeRO's alone).

- memory to spare: no ZeRO (it only costs all-gathers);
- parameters pinned replicated (ZeRO-3 unavailable): a slightly tight budget is met by ZeRO-1 alone
  (sharding optimizer states costs one all-gather per parameter, ZeRO-2 a reduce-scatter more); below
  what ZeRO-1 on every parameter reaches (16 of 20 bytes), ZeRO-2 appears; below ZeRO-2's floor
  (4 + 2 + 4 of 20: no flat copy, it reduce-scatters), InfeasiblePlanError names it;
- placements free (ops preferring the batch split, so a sharded weight is gathered: FSDP's form):
  ZeRO-1 on a few parameters first, sharded parameters (ZeRO-3) only under tighter budgets.
Every plan's predicted peak stays within its budget and the plan records its decisions.
"""
from __future__ import annotations

import pytest

import autopar
from autopar.models import build_model
from autopar.core.placement import format_sharding, parse_sharding, zero_sharding

REPLICATED = {"input:*": ["S(0)"], "param:*": ["R"]}


@pytest.fixture(scope="module")
def gpt():
    return build_model("gpt-tiny", batch=2, seq=8, device="meta")


_CACHE: dict[str, autopar.Plan] = {}


def _plan(gpt, budget=None, fix=REPLICATED, **kw):
    """Plans are deterministic: one solve per distinct request in this module."""
    key = repr((budget, sorted(fix.items()), sorted(kw.items())))
    if key not in _CACHE:
        model, inputs = gpt
        _CACHE[key] = autopar.plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo", fix=fix, recompute="none",
                                   memory_budget=budget, **kw)
    return _CACHE[key]


def _stages(p) -> tuple[int, int, int]:
    """(ZeRO-1 parameters, ZeRO-2 parameters, sharded parameters) of a plan."""
    z2 = len(p.gradient_sharding)
    z3 = sum(any(x != "R" for x in v) for v in p.param_placements.values())
    return len(p.optimizer_sharding) - z2, z2, z3


def _check_recorded(p) -> None:
    """Recorded ZeRO shardings are the rule's for the parameter's placements (what autopar.zero builds)."""
    for fqn, zs in p.optimizer_sharding.items():
        want = zero_sharding(p.model.param_shapes[fqn], parse_sharding(list(p.param_placements[fqn])), p.mesh.shape)
        assert want is not None and tuple(format_sharding(want)) == zs, fqn
    assert set(p.gradient_sharding) <= set(p.optimizer_sharding)


def test_memory_to_spare_shards_nothing(gpt):
    p = _plan(gpt)
    assert _stages(p) == (0, 0, 0)
    assert p.optimizer_sharding == {} and p.gradient_sharding == {}


def test_replicated_parameters_go_zero1_then_zero2(gpt):
    free = _plan(gpt).predicted.peak_memory_bytes
    p = _plan(gpt, int(0.95 * free))
    z1, z2, z3 = _stages(p)
    assert z1 > 0 and z2 == 0 and z3 == 0, _stages(p)
    assert p.predicted.peak_memory_bytes <= 0.95 * free
    assert p.predicted.memory_breakdown["optimizer"] < _plan(gpt).predicted.memory_breakdown["optimizer"]
    _check_recorded(p)
    # ZeRO-1 on everything takes the row to 16/20 of its size: below that only ZeRO-2 helps
    p = _plan(gpt, int(0.7 * free))
    z1, z2, z3 = _stages(p)
    assert z2 > 0 and z3 == 0, _stages(p)
    assert p.predicted.peak_memory_bytes <= 0.7 * free
    _check_recorded(p)
    with pytest.raises(autopar.InfeasiblePlanError) as ei:
        _plan(gpt, int(0.45 * free))
    # the floor is ZeRO-2 on every parameter: 4 + 2 + 4 of 20 bytes per parameter (+ activations)
    assert ei.value.min_feasible_bytes == pytest.approx(_plan(gpt, zero=2).predicted.peak_memory_bytes, rel=1e-3)


def test_free_placements_shard_optimizer_states_before_parameters(gpt):
    fsdp = {"fix": {"input:*": ["S(0)"]}, "prefer": {"*": ["S(0)"]}}
    free = _plan(gpt, **fsdp).predicted.peak_memory_bytes
    assert _stages(_plan(gpt, **fsdp)) == (0, 0, 0)
    z1, z2, z3 = _stages(_plan(gpt, int(0.95 * free), **fsdp))
    # states (and gradients) are sharded, parameters not; ZeRO-1 or ZeRO-2 may come first: here they tie in
    # time (ZeRO-2 of the tied embedding and ZeRO-1 of both blocks' fc weight are two 64 KiB collectives each)
    assert z1 + z2 > 0 and z3 == 0, (z1, z2, z3)
    p = _plan(gpt, int(0.6 * free), **fsdp)
    assert _stages(p)[2] > 0 and p.predicted.peak_memory_bytes <= 0.6 * free   # ZeRO-3 is needed there
    _check_recorded(p)


def test_told_zero_and_bad_values(gpt):
    p = _plan(gpt, zero=2)
    assert set(p.gradient_sharding) == set(p.optimizer_sharding) == set(p.param_placements)
    assert _plan(gpt, zero=1).gradient_sharding == {}
    with pytest.raises(autopar.ConfigError, match="zero="):
        _plan(gpt, zero=3)
    with pytest.raises(autopar.ConfigError, match="recompute="):
        autopar.plan(gpt[0], gpt[1], mesh_shape=(2,), cluster="cpu-gloo", recompute="some")
