"""ZeRO-1 / ZeRO-2 (autopar.zero) against one device, and their memory measured per rank.

Each case plans with ``zero=1`` or ``zero=2`` (every parameter whose replicated mesh dims can shard
its state), runs one step in the shared pools with ``autopar.zero.optimizer(pm, torch.optim.AdamW)``
(a ``torch.optim.AdamW`` itself) and checks loss, every ``param.grad`` (``full_tensor()``; under ZeRO-2 a
DTensor holding this rank's shard) and every parameter after the step to fp32 tolerance on every rank,
with FQNs and the plan's DTensor placements unchanged. Memory
(``autopar.memory``, a second, steady-state step): optimizer-state bytes per rank are those of the
plan without ZeRO divided by the ZeRO ways (plus AdamW's 4-byte step counters), gradient bytes too for
ZeRO-2; ZeRO-1 keeps full gradients.
"""
from __future__ import annotations

import pytest

from parallel_check import assert_step_result, check_zero_step, zero_plans
from test_apply_numerics import _tp_fix

DP = {"input:*": ["S(0)"], "param:*": ["R"]}


def _fix(model: str, mesh) -> dict:
    return DP if len(mesh) == 1 else _tp_fix(model, mesh, tp_dims=(1,), dp_dims=(0,))  # dp x Megatron TP


# every model x stage on (2,); on (2, 2) both stages for gpt and ZeRO-2 for llama (llama's ZeRO-1 on
# (2, 2) added 22 s to a suite that must stay under 15 minutes, and covers no path the others miss)
CASES = [pytest.param(model, mesh, zero, id=f"{model}-{'x'.join(map(str, mesh))}-zero{zero}",
                      marks=[pytest.mark.slow] if len(mesh) == 2 else [])
         for model in ("gpt", "llama") for mesh in ((2,), (2, 2)) for zero in (1, 2)
         if not (model == "llama" and mesh == (2, 2) and zero == 1)]


@pytest.mark.parametrize(("model", "mesh", "zero"), CASES)
def test_zero_step_matches_single_device_and_shards_memory(request, model, mesh, zero):
    pool = request.getfixturevalue("dist2" if len(mesh) == 1 else "dist4")
    fix = _fix(model, mesh)
    plans = zero_plans(f"{model}-tiny", mesh, zero, fix)
    results = pool.run(check_zero_step, f"{model}-tiny", mesh, zero, fix, 4, 16, plans, timeout=600)
    case = request.node.callspec.id
    assert_step_result(results, fix, case=case)
    for rank, r in enumerate(results):
        assert r["optimizer_type"] == "ZeroAdamW" and r["is_torch_optimizer"], r["optimizer_type"]
        assert "autopar.zero.optimizer(module, AdamW" in (r["plain_optimizer_warning"] or ""), r["plain_optimizer_warning"]
        # every parameter that has a ZeRO sharding gets it (tied weights: under each of their names)
        assert r["zero_able"] and set(r["zero_able"]) <= set(r["optimizer_sharding"]) <= set(r["fqns"])
        assert set(r["gradient_sharding"]) == (set(r["optimizer_sharding"]) if zero == 2 else set())
        z, b = r["memory"]["zero"], r["memory"]["base"]
        # measured = what the plan's ZeRO shardings imply, and less than without ZeRO
        assert z["final"]["optimizer"] == r["expected"]["optimizer"] < b["final"]["optimizer"], (z, b)
        assert z["category_peaks"]["grads"] == r["expected"]["grads"], (z["category_peaks"], r["expected"])
        if zero == 1:
            assert z["category_peaks"]["grads"] == b["category_peaks"]["grads"]
        else:
            assert z["category_peaks"]["grads"] < b["category_peaks"]["grads"]
        assert z["final"]["params"] == b["final"]["params"], "ZeRO-1/2 keep the parameters as planned (no copy)"
        if len(mesh) == 1:   # every parameter replicated on the one dp dim: exactly 1/dp of the states
            steps = b["final"]["optimizer"] - 2 * b["final"]["params"]
            assert z["final"]["optimizer"] - steps == (b["final"]["optimizer"] - steps) // mesh[0], (rank, z, b)
