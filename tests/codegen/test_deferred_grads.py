"""Data-parallel gradient sums left to the bucketed reducer, and the loss replicated in one all-reduce.

GPT's position embedding is read by an unsplit lookup whose output joins the batch-split stream: its
gradient arrives as a partial sum. The lookup is a pass-through op (replicated parameter and integer
positions in, gradient linear through it), so the partial sum flows into ``wpe.weight`` and the
reducer sums it with the other DP gradients, instead of an inline all-reduce at the end of backward.
A batch-split cross-entropy returned as the graph output sums its loss and target count in one
all-reduce (``replicated=True``) instead of two.
"""
from __future__ import annotations

import torch
from torch import nn

import autopar
from autopar.ops import parallel_ops
from autopar.core.capture import capture
from autopar.codegen import build_parallel_graph
from autopar.models import build_model
from parallel_check import assert_step_result, check_training_step

DP = {"fix": {"input:*": ["S(0)"], "param:*": ["R"]},
      "prefer": {"root/arange*": ["R"], "wpe/*": ["R"], "*": ["S(0)"]}}


def _graph(model, inputs, **options):
    plan = autopar.plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo", **options)
    gm, _ = build_parallel_graph(capture(model, inputs, fold_layers=False), plan)
    return gm, plan


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def test_gpt_data_parallel_graph_has_no_inline_collective():
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="meta")
    gm, plan = _graph(model, inputs, **DP)
    assert plan.node_shardings["wpe/embedding#0"].outputs[0] == ("R",)   # the lookup is not split
    deferred = gm.meta["autopar_deferred_grads"]
    wpe = [n.name for n in gm.graph.nodes if n.op == "placeholder" and "wpe" in n.name]
    assert wpe and wpe[0] in deferred and deferred[wpe[0]] == (0,)
    assert _calls(gm, parallel_ops.reshard) == [], gm.code
    (ce,) = _calls(gm, parallel_ops.sharded_cross_entropy)
    assert ce.args[-1] is True and list(ce.users)[0].op == "output"


class PosReadTwice(nn.Module):
    """A position table read by the batch-split stream and, unsplit, by a term of the loss."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(8, 16)
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        p = self.pos(torch.arange(8))
        return self.lin(x + p).pow(2).mean() + self.pos.weight.sum() * 1e-3


def test_parameter_with_a_complete_gradient_use_is_not_deferred():
    torch.manual_seed(0)
    model = PosReadTwice()
    inputs = {"x": torch.randn(4, 8, 16)}
    gm, plan = _graph(model, inputs, fix={"input:*": ["S(0)"], "param:*": ["R"]},
                      prefer={"root/arange*": ["R"], "pos/*": ["R"], "lin/*": ["S(0)"]})
    pos = [n.name for n in gm.graph.nodes if n.op == "placeholder" and "pos" in n.name][0]
    assert pos not in gm.meta["autopar_deferred_grads"]   # its unsplit read needs the full gradient
    reshards = _calls(gm, parallel_ops.reshard)
    assert any(r.args[0].target is torch.ops.aten.embedding.default for r in reshards), gm.code


def test_gpt_data_parallel_step_matches_single_device(dist2):
    results = dist2.run(check_training_step, "gpt-tiny", (2,), DP["fix"], 4, 16, {"prefer": DP["prefer"]})
    assert_step_result(results, DP["fix"], case="gpt-tiny dp (2,), pass-through position lookup")
    assert results[0]["reshards"] == 0 and results[0]["deferred_grads"] > 0
