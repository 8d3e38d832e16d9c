"""The step row charges the reducer's bucket copy: at most one bucket (autopar.runtime.grad_sync keeps gradients as
views of its buckets; a bucket exists twice only while it is concatenated)."""
from __future__ import annotations

import pytest
import torch

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


def _bucket_bytes(model, inputs, mesh_shape, fix, prefer):
    """The solved ILP's bucket-copy bytes (MemCategory.GRAD_BUCKETS) and its gradient bytes."""
    from autopar.cluster.profile import load_cluster
    from autopar.core.graph import index_graph
    from autopar.frontend.planning import capture_exact
    from autopar.solver import backend, ilp
    from autopar.solver.model import MemCategory, value
    from autopar.solver.saved import saved_tensors

    cap = capture_exact(model, inputs)
    gi, mesh, prof = index_graph(cap), MeshSpec.make(mesh_shape), load_cluster("cpu-gloo")
    saved = saved_tensors(cap.program.graph_module, set(cap.program.graph_signature.inputs_to_parameters))
    keys = ilp.collect_keys(gi, mesh, prof, fix, prefer, saved=saved)
    m = ilp.ShardingILP(gi, keys, mesh, prof.dim_links(mesh, None), None, remat=False, zero=0)
    m.build()
    assert backend.solve_problem(m.prob).optimal
    m.settle()
    total = lambda cat: sum(c * value(v) for c, v in m.mem_terms(cat))   # noqa: E731
    return total(MemCategory.GRAD_BUCKETS), total(MemCategory.GRADS)


def test_no_bucket_copy_where_no_op_splits_its_work():
    """A replicated parameter's gradient reaches the reducer only where an op reading it splits its work on that
    mesh dim (runtime_rules.deferred_grads): a plan that replicates every op reduces nothing, and the step row
    holds no bucket copy (it did: every replicated parameter was counted, +13 % on HF Falcon's default plan).
    Through a pass-through op (GPT's embedding lookup, Falcon's weight transposes) its uses decide."""
    model, inputs = build_model("gpt-tiny", batch=2, seq=16)
    every_r = {"*": ["R"]}
    copy, grads = _bucket_bytes(model, inputs, (2,), {"param:*": ["R"], "input:*": ["R"]}, every_r)
    assert grads > 0 and copy == 0
    copy, grads = _bucket_bytes(model, inputs, (2,), DP, BATCH_SPLIT)
    assert copy == pytest.approx(grads)   # data parallel: every gradient, one bucket
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    hidden_dropout=0.0, attention_dropout=0.0)
    falcon = transformers.FalconForCausalLM(cfg)
    ids = torch.randint(0, 128, (2, 8))
    copy, grads = _bucket_bytes(falcon, {"input_ids": ids, "labels": ids}, (2,), {"param:*": ["R"], "input:*": ["R"]},
                                every_r)
    assert grads > 0 and copy == 0
    copy, grads = _bucket_bytes(falcon, {"input_ids": ids, "labels": ids}, (2,), DP, BATCH_SPLIT)
    assert copy == pytest.approx(grads)
