"""The step row charges the reducer's bucket copy: at most one bucket (autopar.runtime.grad_sync keeps gradients as
views of its buckets; a bucket exists twice only while it is concatenated)."""
from __future__ import annotations

import pytest

from autopar.frontend.planning import plan
from autopar.core.mesh import MeshSpec
from autopar.core.placement import Replicate, Shard
from autopar.models import build_model
from autopar.solver import cost as C

DP = {"input:*": ["S(0)"], "param:*": ["R"]}
# every op on its batch shard: with a 32-token batch the solver may otherwise take a weight as P(sum) and
# keep that copy for backward, and the backward-start row, not the step row, is the peak
BATCH_SPLIT = {"*": ["S(0)"]}


def _dp_plan(model_name: str, batch: int, seq: int):
    model, inputs = build_model(model_name, batch=batch, seq=seq)
    return plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo", fix=DP, prefer=BATCH_SPLIT, recompute="none", zero=0,
                offload=False)


@pytest.mark.parametrize("model_name, expect_cap", [("gpt-tiny", False), ("gpt2-small", True)])
def test_step_row_holds_at_most_one_bucket_copy(model_name, expect_cap):
    p = _dp_plan(model_name, batch=2, seq=16)   # few activations: the step row is the peak
    mb = p.predicted.memory_breakdown
    extra = p.predicted.peak_memory_bytes - (mb["params"] + mb["grads"] + mb["optimizer"])
    if expect_cap:      # 124M parameters: ~500 MB of gradients, one 25 MiB bucket copied at a time
        assert mb["grads"] > 10 * C.GRAD_BUCKET_BYTES
        assert extra == pytest.approx(C.GRAD_BUCKET_BYTES, rel=1e-3)
    else:               # every gradient fits one bucket: it is copied whole at the end of backward
        assert mb["grads"] < C.GRAD_BUCKET_BYTES
        assert extra == pytest.approx(mb["grads"], rel=1e-3)


def test_position_embedding_gradient_is_priced_in_the_bucket(monkeypatch):
    """GPT's position-embedding lookup is an unsplit op of a parameter alone: under data parallelism its
    output's gradient is a partial sum that the runtime lets flow into the parameter, for the bucketed
    reducer to sum (codegen.insert_collectives.deferred_grads). The ILP prices that edge as a parameter's
    gradient (bytes and a bucket's share of one latency), not as an all-reduce of its own."""
    from autopar.cluster.profile import PRESETS
    from autopar.solver import ilp

    solved = {}
    orig = ilp.solve

    def keep(*a, **k):
        solved["sol"] = orig(*a, **k)
        return solved["sol"]

    monkeypatch.setattr(ilp, "solve", keep)
    model, inputs = build_model("gpt-tiny", batch=8, seq=32)
    plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo", fix=DP, recompute="none", zero=0, offload=False,
         prefer={"root/arange*": ["R"], "wpe/*": ["R"], "*": ["S(0)"]})
    sol = solved["sol"]
    assert sol.chosen["wpe/embedding#0"].outputs[0] == (Replicate(),)
    assert sol.chosen["root/add#0"].outputs[0] == (Shard(0),)
    alpha = PRESETS["cpu-gloo"].dim_links(MeshSpec.make((2,)))[0].collectives["all_reduce"].alpha
    assert 0 < sol.edge_time["root/add#0"] < 0.1 * alpha
