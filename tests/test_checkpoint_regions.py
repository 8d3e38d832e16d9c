"""Checkpoint and offload regions: numerics against one device, recompute counted in backward FLOPs,
offload seen in measured device bytes (codegen/checkpoint_regions.py, codegen/offload_activations.py).

The distributed cases apply ``dataclasses.replace(plan, checkpoint=..., offload=...)`` on a (2,) gloo
mesh (the dist2 pool); the single-process cases run the passes alone on a captured graph.
"""
from __future__ import annotations

import pytest
import torch

import memory_check
from autopar.core.errors import PlanFormatError, PlanMismatchError

VARIANTS = {
    "none": {},
    "recompute": {"checkpoint": ["blocks.0:full", "blocks.1:selective"]},
    "offload": {"offload": ["blocks.*"]},
}
# gpt-tiny data parallel (batch split; the gradient reducer works under recompute); llama-tiny with a
# Megatron MLP (the regions hold the MLP's all-reduce, recomputed in backward)
CASES = {
    "gpt-tiny": {"input:*": ["S(0)"]},
    "llama-tiny": {"input:*": ["R"], "param:blocks.*.mlp.gate_proj.weight": ["S(0)"],
                   "param:blocks.*.mlp.up_proj.weight": ["S(0)"], "param:blocks.*.mlp.down_proj.weight": ["S(1)"]},
}


@pytest.mark.parametrize("spec", list(CASES))
def test_recompute_and_offload_on_two_ranks(dist2, spec):
    results = dist2.run(memory_check.check_memory_variants, spec, (2,), VARIANTS, CASES[spec], timeout=300)
    for rank, res in enumerate(results):
        for name, r in res.items():
            bad = {k: v for k, v in r["errors"].items() if not v <= 0}
            assert not bad, f"{spec} {name} rank {rank}: beyond rtol=1e-4/atol=1e-5 by {bad}"
        none, rec, off = res["none"], res["recompute"], res["offload"]
        assert none["submodules"] == []
        assert rec["submodules"] == ["checkpoint_blocks_0", "checkpoint_blocks_1"]
        assert off["submodules"] == ["offload_blocks_0", "offload_blocks_1"]
        # full recompute redoes blocks.0's forward in backward; selective (blocks.1) keeps its matmul and
        # attention outputs, so its recompute adds no counted FLOPs
        full_fwd = rec["region_forward_flops"]["checkpoint_blocks_0"]
        assert full_fwd > 0 and rec["region_forward_flops"]["checkpoint_blocks_1"] > 0
        assert rec["backward_flops"] - none["backward_flops"] == full_fwd
        assert off["backward_flops"] == none["backward_flops"]
        # what forward leaves on the device for backward
        act = {n: res[n]["after_forward"]["activations"] for n in res}
        assert act["recompute"] < act["none"], act
        assert act["offload"] < act["none"], act
        assert off["after_forward"]["host"] >= act["none"] - act["offload"] > 0
        assert none["after_forward"]["host"] == rec["after_forward"]["host"] == 0
        assert off["memory"]["peak_bytes"] <= none["memory"]["peak_bytes"]
        # DTensor parameters count their local shards: the plan's shapes and placements give the bytes
        final, nbytes = none["memory"]["final"], none["analytic_param_bytes"]
        assert final["params"] == final["grads"] == nbytes, (final, nbytes)
        assert final["optimizer"] == 2 * nbytes + 4 * none["num_params"], final   # AdamW moments + step
    if spec == "llama-tiny":   # the MLP's all-reduce is inside the region and runs again in backward
        code = results[0]["recompute"]["region_code"]["checkpoint_blocks_0"]
        assert "reshard" in code, code


# --------------------------------------------------------------------------------- single process


@pytest.fixture(scope="module")
def gpt_none():
    return memory_check.local_step("gpt-tiny")


def _same_grads(a: dict, b: dict) -> None:
    torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
    for n in a["grads"]:
        torch.testing.assert_close(a["grads"][n], b["grads"][n], rtol=1e-6, atol=1e-7, msg=n)


def test_selective_saves_more_than_full_and_less_than_none(gpt_none):
    full = memory_check.local_step("gpt-tiny", checkpoint=("blocks.*:full",))
    sel = memory_check.local_step("gpt-tiny", checkpoint=("blocks.*:selective",))
    for r in (full, sel):
        _same_grads(r, gpt_none)
        assert r["submodules"] == ["checkpoint_blocks_0", "checkpoint_blocks_1"]
    act = [r["after_forward"]["activations"] for r in (full, sel, gpt_none)]
    assert act[0] < act[1] < act[2], act
    regions = sum(full["region_forward_flops"].values())
    assert full["backward_flops"] - gpt_none["backward_flops"] == regions
    assert 0 <= sel["backward_flops"] - gpt_none["backward_flops"] < regions


def test_nested_regions_and_offload_of_a_checkpointed_module(gpt_none):
    r = memory_check.local_step("gpt-tiny", checkpoint=("blocks.0:full", "blocks.0.mlp:selective"),
                                offload=("blocks.0",))
    _same_grads(r, gpt_none)
    assert r["submodules"] == ["offload_blocks_0"]     # offload(checkpoint(... checkpoint(mlp) ...))
    assert "checkpoint_blocks_0" in r["code"] or "offload_blocks_0" in r["code"]
    assert r["after_forward"]["host"] > 0


def test_empty_lists_change_nothing():
    from autopar.core.capture import capture
    from autopar.models import build_model

    gm, _, _ = memory_check.local_graph("gpt-tiny")
    model, inputs = build_model("gpt-tiny", batch=2, seq=8, device="cpu")
    captured = capture(model, inputs, fold_layers=False).program.graph_module
    assert not list(gm.named_children())
    assert [(n.op, n.target) for n in gm.graph.nodes] == [(n.op, n.target) for n in captured.graph.nodes]


@pytest.mark.parametrize("entry, error, words", [
    ("blocks.9:full", PlanMismatchError, "names no module"),
    ("blocks.0:everything", PlanFormatError, "mode one of"),
    ("blocks.0", PlanFormatError, "<module FQN>:<mode>"),
])
def test_bad_checkpoint_entries(entry, error, words):
    with pytest.raises(error, match=words):
        memory_check.local_graph("gpt-tiny", checkpoint=(entry,))


def test_a_module_listed_with_two_modes():
    with pytest.raises(PlanFormatError, match="listed as 'full' and 'selective'"):
        memory_check.local_graph("gpt-tiny", checkpoint=("blocks.0:full", "blocks.*:selective"))


def test_unknown_offload_module():
    with pytest.raises(PlanMismatchError, match="plan.offload"):
        memory_check.local_graph("gpt-tiny", offload=("decoder.*",))
