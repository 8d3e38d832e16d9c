"""Stage boundaries sent per rank (issue 21): a pipelined plan's stages send each value they pass on in the
placements the plan gives it (``pipeline.stages[i].send_placements``), each rank its own piece to its peer in the
next stage, and the next stage takes it so, without gathering it whole.

On gloo (shared ``dist4`` pool), the tiny GPT on a (pp, dp) and a (pp, tp) mesh (1F1B, GPipe) and a 4-block GPT
with interleaved 1F1B (2 stages per pp rank), planned on a fast-network profile so the stage plans split the
batch: loss, every gradient and the parameters after one AdamW step equal one device (fp32 rtol 1e-4 / atol 1e-5),
and every tensor a rank hands to ``isend`` is its piece (half the micro-batch's residual stream), never the whole.
The (pp, tp) case also rewrites the send placements to cut the hidden dim (scatter/gather), which the next stage's
plan reads batch-split: the runtime redistributes on receipt.
Planning-only checks: the pricing's ``send_placement`` rule and the plan format's checks of the new field.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from pipeline_boundary_check import check_sharded_boundary

from autopar.cluster.profile import PRESETS, LinkSpec
from autopar.core.errors import PlanFormatError
from autopar.core.graph import TensorMeta
from autopar.core.placement import Partial, Replicate, Shard
from autopar.solver.pipeline import boundary_seconds, send_placement

CASES = {
    # id: (model, mesh dims, pipeline, send placements written into stage 0's plan row (None: the planner's))
    "pp2xdp2-1f1b": ("gpt-tiny", ("pp", "dp"), {"schedule": "1f1b", "microbatches": 2}, None),
    "pp2xtp2-gpipe-hidden-cut": ("gpt-tiny", ("pp", "tp"), {"schedule": "gpipe", "microbatches": 2},
                                 [["S(2)"], ["R"]]),
    # 4 stages on 2 pp ranks: stage 1 (pp rank 1) sends to stage 2 on pp rank 0, the same dp coordinate
    "pp2xdp2-interleaved": ("gpt-4layer", ("pp", "dp"), {"schedule": "interleaved", "virtual_stages": 2,
                                                           "microbatches": 2}, None),
}


def _errors_ok(res, rank):
    bad = {k: v for k, v in res["errors"].items() if v > 0}
    assert not bad, f"rank {rank}: beyond fp32 tolerance: {bad}"
    assert any(k.startswith("grad:") for k in res["errors"]) and "loss" in res["errors"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_boundary_matches_one_device(case, dist4):
    spec, names, pipeline, send = CASES[case]
    results = dist4.run(check_sharded_boundary, (2, 2), names, pipeline, 8, 8, send, spec, timeout=240)
    whole = results[0]["hidden_whole"]
    whole_bytes = math.prod(whole) * 4
    rows = results[0]["rows"]
    hidden = rows[0]["send_placements"][0]
    if send is None:
        # the planner's own placements: the residual stream leaves stage 0 split over the batch, and stage 1's
        # plan reads it exactly so (its input pinned to what is sent)
        for i in range(1, len(rows)):
            assert rows[i - 1]["send_placements"][0] == ["S(0)"], rows
            assert results[0]["input_placements"][i][f"input:{rows[i]['inputs'][0]}"] == ["S(0)"]
        piece = [whole[0] // 2, *whole[1:]]
    else:
        assert hidden == ["S(2)"] and results[0]["input_placements"][1][f"input:{rows[1]['inputs'][0]}"] != hidden
        piece = [*whole[:2], whole[2] // 2]
    assert rows[-1].get("send_placements") is None
    last = len(rows) - 1
    for rank, res in enumerate(results):
        _errors_ok(res, rank)
        floats = [(shape, nbytes) for shape, nbytes in res["sent"] if len(shape) == 3]
        # per micro-batch, each stage but the last sends the activation forward, each but the first its gradient back
        want = res["microbatches"] * sum((s < last) + (s > 0) for s in res["stages"])
        assert len(floats) == want, (rank, res["sent"])
        for shape, nbytes in floats:
            assert shape == piece and nbytes == whole_bytes // 2, (rank, shape, nbytes, whole)
        # the static metadata of torch's stages describes the pieces too
        for s, (ins, outs) in res["stage_io"].items():
            if int(s) < last:
                assert outs[0] == piece
            if int(s) > 0:
                assert ins[0] == piece


# ------------------------------------------------------------------------------------------ planning only

SUB = (4, 8)   # (dp, tp) sub-mesh of the rule tests


def _links(bw_tp: float):
    slow = LinkSpec.uniform("dp", alpha=1e-5, bandwidth=25e9)
    fast = LinkSpec.uniform("tp", alpha=1e-6, bandwidth=bw_tp)
    return (slow, fast)


def test_send_placement_rule():
    meta = TensorMeta(shape=(32, 2048, 8192), dtype=torch.float32)
    pp = LinkSpec.uniform("pp", alpha=1e-5, bandwidth=25e9)
    # a partial sum is summed before it is sent (it cannot be sent per rank)
    src = (Shard(0), Partial())
    assert send_placement(meta, src, SUB, _links(300e9), None) == (Shard(0), Replicate())
    # a value already split is sent as it is: no gather, one rank's piece
    assert send_placement(meta, (Shard(0), Shard(1)), SUB, _links(300e9), pp) == (Shard(0), Shard(1))
    # whole over tp with fast tp and a slow pp link: cut over tp along the largest free dim (scatter/gather)
    assert send_placement(meta, (Shard(0), Replicate()), SUB, _links(300e9), pp) == (Shard(0), Shard(2))
    # ... unless gathering it back costs more than the smaller send saves
    assert send_placement(meta, (Shard(0), Replicate()), SUB, _links(1e9), pp) == (Shard(0), Replicate())
    # without a pp link (a pp-only mesh's units) nothing is cut
    assert send_placement(meta, (Shard(0), Replicate()), SUB, _links(300e9), None) == (Shard(0), Replicate())


def test_boundary_seconds():
    meta = TensorMeta(shape=(32, 2048, 8192), dtype=torch.float32)
    links = _links(300e9)
    # sent as placed: nothing to reshard
    assert boundary_seconds(meta, (Shard(0), Replicate()), (Shard(0), Replicate()), SUB, links) == 0.0
    # a partial sum: one all-reduce forward (its gradient is replicated already)
    ar = boundary_seconds(meta, (Shard(0), Partial()), (Shard(0), Replicate()), SUB, links)
    assert ar > 0
    # scatter/gather: a gather on the receiving side forward and on the sending side backward
    sg = boundary_seconds(meta, (Shard(0), Replicate()), (Shard(0), Shard(2)), SUB, links)
    assert sg > 0


def test_plan_format_checks_send_placements():
    from pipeline_check import build

    import autopar
    model, inputs = build("gpt-tiny", 4, 8)
    plan = autopar.plan(model, inputs, mesh_shape=(2, 2), mesh_dim_names=("pp", "dp"),
                        pipeline={"schedule": "gpipe", "microbatches": 2}, cluster=PRESETS["cpu-gloo"])
    d = json.loads(plan.to_json())
    assert "send_placements" in d["pipeline"]["stages"][0]
    for bad, msg in (([["P(sum)"], ["R"]], "partial sum"), ([["R", "R"], ["R"]], "placements"),
                     ([["R"]], "one list of placements per output")):
        d["pipeline"]["stages"][0]["send_placements"] = bad
        with pytest.raises(PlanFormatError, match=msg):
            autopar.Plan.from_dict(d)
    d["pipeline"]["stages"][0].pop("send_placements")
    d["pipeline"]["stages"][1]["send_placements"] = [["R"]]
    with pytest.raises(PlanFormatError, match="last stage"):
        autopar.Plan.from_dict(d)
