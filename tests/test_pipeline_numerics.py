"""Pipelined plans on gloo match the single-device model: loss and every parameter gradient (and the
parameters after one AdamW step), fp32 rtol 1e-4 / atol 1e-5, on every rank.

Cases (shared pools ``dist2`` / ``dist4``): pp=2 on 2 ranks, pp=2 x tp=2 and pp=2 x dp=2 on 4 ranks,
with GPipe and 1F1B, for the tiny GPT (tied embedding / LM head on different stages: their gradients
are summed over the pp group) and LLaMA, plus interleaved 1F1B with 2 virtual stages per rank on a
4-block GPT, and a small model whose stages pass a non-contiguous (expanded) tensor. The 4-rank GPT cases get a memory budget below the replicated stage footprint, so the
stage plans shard parameters (checked) and the stages run DTensor parameters on the sub-mesh; the
LLaMA pp2 x tp2 case pins a weight with ``fix=`` (checked sharded in every stage).
"""
from __future__ import annotations

import pytest

from pipeline_check import check_pipeline_step

SHARDING = {"cluster": "h100-sxm", "memory_budget": 1_000_000}
# fix= on a pipelined plan: the pinned weight is column-split over tp in every stage
PINNED = {"fix": {"param:blocks.*.mlp.up_proj.weight": ["R", "S(0)"]}}

CASES = {
    # id: (pool, model, mesh, dim names, pipeline, options)
    "gpt-pp2-gpipe": ("dist2", "gpt-tiny", (2,), ("pp",), {"schedule": "gpipe", "microbatches": 2}, None),
    "llama-pp2-1f1b": ("dist2", "llama-tiny", (2,), ("pp",), {"schedule": "1f1b", "microbatches": 4}, None),
    # a non-contiguous value crosses the stage boundary, a constant made in forward sits in the graph
    "expanded-pp2-gpipe": ("dist2", "expanded", (2,), ("pp",), {"schedule": "gpipe", "microbatches": 2}, None),
    "gpt-interleaved-v2": ("dist2", "gpt-4layer", (2,), ("pp",),
                           {"schedule": "interleaved", "virtual_stages": 2, "microbatches": 2}, None),
    "gpt-pp2xtp2-1f1b": ("dist4", "gpt-tiny", (2, 2), ("pp", "tp"), {"schedule": "1f1b", "microbatches": 2},
                         SHARDING),
    "gpt-pp2xdp2-gpipe": ("dist4", "gpt-tiny", (2, 2), ("pp", "dp"), {"schedule": "gpipe", "microbatches": 2},
                          SHARDING),
    "llama-pp2xtp2-gpipe": ("dist4", "llama-tiny", (2, 2), ("pp", "tp"), {"schedule": "gpipe", "microbatches": 2},
                            PINNED),
    "llama-pp2xdp2-1f1b": ("dist4", "llama-tiny", (2, 2), ("pp", "dp"), {"schedule": "1f1b", "microbatches": 2},
                           None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_matches_single_device(case, request):
    pool_name, spec, mesh, names, pipeline, options = CASES[case]
    pool = request.getfixturevalue(pool_name)
    results = pool.run(check_pipeline_step, spec, mesh, names, pipeline, 4, 8, 1, options, timeout=240)
    pp = mesh[0]
    nstages = pp * pipeline.get("virtual_stages", 1)
    held = set()
    for rank, res in enumerate(results):
        bad = {k: v for k, v in res["errors"].items() if v > 0}
        assert not bad, f"rank {rank}: beyond fp32 tolerance: {bad}"
        assert res["pipeline"]["schedule"] == pipeline["schedule"]
        assert res["pipeline"]["microbatches"] == pipeline["microbatches"]
        pp_rank = rank // (len(results) // pp)
        assert res["stages"] == [s for s in range(nstages) if s % pp == pp_rank]
        # original FQNs, only this rank's stages, every one checked
        assert res["fqns"] and set(res["fqns"]) <= set(res["ref_fqns"])
        assert all(f"grad0:{n}" in res["errors"] for n in res["fqns"])
        held |= set(res["fqns"])
        if options is SHARDING:
            assert res["sharded"], f"rank {rank}: the memory budget should make the stage plans shard parameters"
        if options is PINNED:
            pinned = {n for n in res["fqns"] if n.endswith("mlp.up_proj.weight")}
            assert pinned and pinned <= set(res["sharded"]), f"rank {rank}: fix= not applied to its stage"
    # together the ranks hold every parameter of the model (tied ones under one name)
    assert held == {n for n in results[0]["ref_fqns"] if n != "lm_head.weight" or "lm_head.weight" in held}
