"""Folding a ModuleList whose first blocks differ from the rest (issue 17). T5 keeps the relative-position bias in
block 0 of each stack only, so its blocks are not all alike; capture keeps that head block and two of the identical
ones, the head is keyed by index and the others share keys, and the folded graph must stand for the whole model
exactly: the same keys, multiplicities and edge weights as the capture of every block, a plan that places every
parameter, and (on a 2x2 gloo mesh) the loss, every gradient and one AdamW step of one device. A list whose
differing block is not among its first ``MAX_HEAD_BLOCKS`` is not folded at all (exact or absent)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import autopar
from autopar.cluster.profile import load_cluster
from autopar.core.capture import MAX_HEAD_BLOCKS, capture, fold_candidates, list_head
from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.core.options import PlanOptions
from autopar.frontend.planning import capture_exact, solve_captured

transformers = pytest.importorskip("transformers")

from zoo.check import check_zoo_step
from zoo.models import build

ENC, DEC = "m.encoder.block", "m.decoder.block"


def _same_index(folded, full) -> None:
    """A folded graph index stands for the full one: same keys, multiplicities and edge weights."""
    mult = lambda gi: {k: gi.multiplicity(k, m) for k, m in gi.by_key().items()}
    assert mult(folded) == mult(full)
    assert folded.edge_classes() == full.edge_classes()
    assert folded.layer_counts == full.layer_counts and folded.heads == full.heads


class MLPBlock(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    """A residual MLP stack whose blocks' hidden widths are given: a block of another width differs."""

    def __init__(self, widths: list[int], d: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(d, h) for h in widths)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.out(x).square().mean()


def _stack(widths):
    torch.manual_seed(0)
    return Stack(widths), (torch.randn(8, 16),)


def test_list_head():
    blocks = lambda ws: [MLPBlock(4, w) for w in ws]
    assert list_head(blocks([8, 8, 8])) == 0
    assert list_head(blocks([16, 8, 8, 8])) == 1
    assert list_head(blocks([16, 12, 8, 8])) == 2
    assert list_head(blocks([8, 8, 16, 8, 8])) == 3     # a differing block ends the head: the blocks before it too
    assert list_head(blocks([8, 8, 8, 16])) == 3


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_t5_folds_its_repeated_blocks_after_block_0():
    model, inputs = build("t5", "kwargs")
    assert {n: h for n, (_, h) in fold_candidates(model, 4).items()} == {ENC: 1, DEC: 1}
    cap = capture_exact(model, inputs)      # folding passed the exactness checks (graph.folding_problem, 3 blocks)
    assert cap.folded_layers == {ENC: 4, DEC: 4}
    assert len(model.m.encoder.block) == 4, "folding restores the model"
    gi = index_graph(cap)
    assert gi.shared_lists == {ENC, DEC} and gi.heads == {ENC: 1, DEC: 1}
    assert gi.observed_counts == {ENC: 2, DEC: 2} and gi.layer_counts == {ENC: 3, DEC: 3}
    keys = {g.key for g in gi.nodes.values()}
    assert f"param:{ENC}.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys   # the head, by index
    assert f"param:{ENC}.*.layer.0.SelfAttention.q.weight" in keys
    assert not any(k.split(":")[-1].startswith((f"{ENC}.1", f"{ENC}.2")) for k in keys)   # blocks 1, 2 share keys
    _same_index(gi, index_graph(capture(model, inputs, fold_layers=False)))

    # autopar.plan's path after capture_exact (its planning-time coverage check included)
    plan = solve_captured(cap, MeshSpec.make((2,)), load_cluster("cpu-gloo"), PlanOptions(recompute="full"))
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert set(plan.param_placements) == names
    assert plan.model.num_parameters == sum(p.numel() for p in model.parameters())
    # the shared blocks recompute, named by their own index (the head is not one of them)
    assert sorted(plan.checkpoint) == sorted(f"{lst}.{i}:full" for lst in (ENC, DEC) for i in (1, 2, 3))
    # the same under bf16 autocast, priced on solver.cost's copy of the graph index
    bf16 = solve_captured(cap, MeshSpec.make((2,)), load_cluster("h100-sxm"),
                          PlanOptions(recompute="full", precision="bf16"))
    assert set(bf16.param_placements) == names and sorted(bf16.checkpoint) == sorted(plan.checkpoint)


@pytest.mark.parametrize("widths", [[32] + [16] * 7, [48, 32] + [16] * 6])
def test_stack_with_a_head_folds_exactly(widths):
    model, x = _stack(widths)
    cap = capture_exact(model, x)
    assert cap.folded_layers == {"blocks": 8}
    gi = index_graph(cap)
    head = len(widths) - widths.count(16)
    assert gi.heads == {"blocks": head} and gi.observed_counts == {"blocks": 2}
    assert gi.layer_counts == {"blocks": 8 - head}
    _same_index(gi, index_graph(capture(model, x, fold_layers=False)))
    plan = autopar.plan(model, x, mesh_shape=(2,), cluster="cpu-gloo")
    assert set(plan.param_placements) == {n for n, _ in model.named_parameters()}
    assert plan.model.num_parameters == sum(p.numel() for p in model.parameters())


class ScaledBlock(MLPBlock):
    """Blocks alike in parameters whose forward differs by index: from block 2 on the output is doubled."""

    def __init__(self, d: int, i: int):
        super().__init__(d, d)
        self.double = i >= 2

    def forward(self, x):
        y = super().forward(x)
        return y * 2 if self.double else y


def test_blocks_alike_in_parameters_but_not_in_graph_are_not_folded():
    torch.manual_seed(0)
    model, x = Stack([16] * 6), (torch.randn(8, 16),)
    model.blocks = nn.ModuleList(ScaledBlock(16, i) for i in range(6))
    assert capture(model, x).folded_layers == {"blocks": 6}   # two blocks captured: they look alike
    cap = capture_exact(model, x)    # three captured: the third differs, so every block is
    assert cap.folded_layers == {}
    gi = index_graph(cap)
    assert gi.heads == {"blocks": 2} and gi.layer_counts == {"blocks": 4}   # blocks 2..5 alike after all
    assert sum(1 for g in gi.nodes.values() if g.key == "blocks.*/mul#0") == 4


@pytest.mark.parametrize("widths", [[16] * 4 + [32] + [16] * 3,           # a middle block differs
                                    [16] * 7 + [32],                       # the last one
                                    [64, 56, 48, 40] + [16] * 4])          # a head longer than MAX_HEAD_BLOCKS
def test_list_differing_after_its_head_is_not_folded(widths):
    assert list_head([MLPBlock(16, w) for w in widths]) > MAX_HEAD_BLOCKS
    model, x = _stack(widths)
    assert capture(model, x).folded_layers == {}
    gi = index_graph(capture_exact(model, x))
    assert "blocks" not in gi.shared_lists and not gi.heads
    assert {f"blocks.{i}/fc1/linear#0" for i in range(8)} <= {g.key for g in gi.nodes.values()}
    plan = autopar.plan(model, x, mesh_shape=(2,), cluster="cpu-gloo")
    assert set(plan.param_placements) == {n for n, _ in model.named_parameters()}


# Megatron-style tensor parallelism over tp for the head and the shared blocks alike, the batch over dp
TP = {"input:*": ["S(0)", "R"], **{f"param:*.{w}.weight": ["R", "S(0)"] for w in ("q", "k", "v", "wi")},
      **{f"param:*.{w}.weight": ["R", "S(1)"] for w in ("o", "wo")}}


@pytest.mark.slow   # T5 on 4 gloo ranks
@pytest.mark.parametrize("options", [{}, {"fix": TP, "recompute": "full"}], ids=["default", "tp-recompute"])
def test_t5_plan_matches_one_device_on_2x2(dist4, options):
    model, inputs = build("t5", "kwargs")
    plan = autopar.plan(model, inputs, mesh_shape=(2, 2), cluster="cpu-gloo", **options)
    if options:   # the shared blocks 1..3 of both stacks recompute; the head's weights are split as the others
        assert len(plan.checkpoint) == 6
        assert plan.param_placements[f"{ENC}.0.layer.0.SelfAttention.q.weight"] == ("R", "S(0)")
        assert plan.param_placements[f"{DEC}.3.layer.2.DenseReluDense.wo.weight"] == ("R", "S(1)")
    assert plan.model.folded_layers == {ENC: 4, DEC: 4}
    assert set(plan.param_placements) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for r in dist4.run(check_zoo_step, "t5", "kwargs", (2, 2), plan.to_json()):
        assert not r["missing_grads"] and not r["bad"], r
        assert r["checked"] > 2 * len(list(model.parameters()))   # loss, every gradient, every parameter after
