"""Strategy rules on real captured graphs (gpt-tiny, llama-tiny) over 1-, 2- and 3-D meshes.

Invariants for every op node: at least one strategy, one placement per mesh dim for every tensor,
every sharded dim divisible by the mesh sizes sharding it. Known strategies per op family
(Megatron column/row linear, batch/head attention, batch/vocab loss, vocab-parallel embedding).
The replicate fallback for ops without a rule, shared variables for identical layers, and folding.
"""
import logging

import pytest
import torch
from torch import nn

from autopar.core.capture import capture
from autopar.core.graph import GNode, index_graph
from autopar.core.mesh import MeshSpec
from autopar.models import BUILTIN_MODELS, build_model, load_example_module
from autopar.core.placement import Partial, Replicate, Shard
from autopar.cluster.profile import PRESETS
from autopar.tools.report import summary
from autopar.solver import plan_graph
from autopar.solver.strategies import rule_for, strategies_for
from autopar.solver.strategies.base import in_meta

aten = torch.ops.aten
R, P = Replicate(), Partial("sum")
MESHES = [(2,), (4,), (2, 2), (2, 2, 2)]
CPU = PRESETS["cpu-gloo"]


@pytest.fixture(scope="module", params=["gpt-tiny", "llama-tiny"])
def graph(request):
    model, inputs = build_model(request.param, batch=4, seq=16)
    return index_graph(capture(model, inputs))


def _ops(gi, target=None) -> list[GNode]:
    return [n for n in gi.nodes.values() if n.kind == "op" and (target is None or n.target == target)]


def _on(p, d: int, ndim: int) -> tuple:
    """Placement p on mesh dim d, Replicate on the others."""
    return tuple(p if i == d else R for i in range(ndim))


def _pairs(gi, node, mesh) -> set[tuple[tuple, tuple]]:
    """Strategies as (input placements, output placements) for set lookups."""
    strategies, _ = strategies_for(node, gi.nodes, mesh)
    return {(s.inputs, s.outputs) for s in strategies}


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_every_op_has_strategies_that_divide_evenly(graph, mesh):
    for node in _ops(graph):
        strategies, fallback = strategies_for(node, graph.nodes, mesh)
        assert strategies, node.key
        assert not fallback, f"{node.key} ({node.target}) fell back to replicate"
        all_r = tuple(R for _ in mesh)
        assert any(all(s == all_r for s in st.inputs) for st in strategies), f"{node.key}: no replicated strategy"
        metas = [in_meta(node, graph.nodes, i) for i in range(len(node.inputs))]
        for st in strategies:
            assert len(st.inputs) == len(node.inputs) and len(st.outputs) == len(node.outputs), node.key
            tensors = list(zip(metas, st.inputs)) + [(m, p) for m, p in zip(node.outputs, st.outputs) if m is not None]
            for meta, placements in tensors:
                assert len(placements) == len(mesh), (node.key, st.label())
                split = [1] * len(meta.shape)
                for p, n in zip(placements, mesh):
                    if isinstance(p, Shard):
                        assert 0 <= p.dim < len(meta.shape), (node.key, st.label(), meta.shape)
                        split[p.dim] *= n
                assert all(s % k == 0 for s, k in zip(meta.shape, split)), (node.key, st.label(), meta.shape)


def test_registered_rules_return_strategies(graph):
    for node in _ops(graph):
        rule = rule_for(node)
        assert rule is not None, f"no rule for {node.target} ({node.key})"
        metas = [in_meta(node, graph.nodes, i) for i in range(len(node.inputs))]
        for n in (2, 4):
            assert rule(node, n, metas), f"{rule.__name__} gave no strategy for {node.key}"


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_linear_has_megatron_column_and_row(graph, mesh):
    nd = len(mesh)
    linears = _ops(graph, aten.linear.default)
    assert linears
    for node in linears:
        x_nd = len(in_meta(node, graph.nodes, 0).shape)
        has_bias = len(node.inputs) == 3
        pairs = _pairs(graph, node, mesh)
        for d in range(nd):
            column = ((_on(R, d, nd), _on(Shard(0), d, nd)) + ((_on(Shard(0), d, nd),) if has_bias else ()),
                      (_on(Shard(x_nd - 1), d, nd),))
            row = ((_on(Shard(x_nd - 1), d, nd), _on(Shard(1), d, nd)) + ((_on(P, d, nd),) if has_bias else ()),
                   (_on(P, d, nd),))
            batch = ((_on(Shard(0), d, nd), _on(R, d, nd)) + ((_on(R, d, nd),) if has_bias else ()),
                     (_on(Shard(0), d, nd),))
            assert column in pairs, (node.key, "column", d)
            assert row in pairs, (node.key, "row", d)
            assert batch in pairs, (node.key, "batch", d)
    if nd >= 2:  # DP x TP in one strategy: batch on dim 0, column on the last dim
        node = next(n for n in linears if "mlp" in n.key or "fc" in n.key or "up" in n.key)
        x_nd = len(in_meta(node, graph.nodes, 0).shape)
        strategies, _ = strategies_for(node, graph.nodes, mesh)
        assert any(s.inputs[0][0] == Shard(0) and s.inputs[1][-1] == Shard(0) and s.outputs[0][-1] == Shard(x_nd - 1)
                   for s in strategies), node.key


@pytest.mark.parametrize("mesh", [(2,), (2, 2)], ids=lambda m: "x".join(map(str, m)))
def test_sdpa_splits_batch_and_heads(graph, mesh):
    nd = len(mesh)
    nodes = _ops(graph, aten.scaled_dot_product_attention.default)
    assert nodes
    for node in nodes:
        pairs = _pairs(graph, node, mesh)
        for d in range(nd):
            for dim in (0, 1):  # batch, heads
                s = _on(Shard(dim), d, nd)
                assert ((s, s, s), (s,)) in pairs, (node.key, dim, d)
        assert not any(isinstance(p, Shard) and p.dim >= 2 for st in pairs for t in st[0] for p in t), \
            "sequence and head dims stay whole"


@pytest.mark.parametrize("mesh", [(2,), (2, 2)], ids=lambda m: "x".join(map(str, m)))
def test_cross_entropy_splits_batch_and_vocab(graph, mesh):
    nd = len(mesh)
    (node,) = _ops(graph, aten.cross_entropy_loss.default)
    pairs = _pairs(graph, node, mesh)
    for d in range(nd):
        assert ((_on(Shard(0), d, nd), _on(Shard(0), d, nd)), (_on(P, d, nd),)) in pairs, "batch"
        assert ((_on(Shard(1), d, nd), _on(R, d, nd)), (_on(R, d, nd),)) in pairs, "vocab-parallel"


@pytest.mark.parametrize("mesh", [(2,), (2, 2)], ids=lambda m: "x".join(map(str, m)))
def test_embedding_is_vocab_parallel(graph, mesh):
    nd = len(mesh)
    token_embedding = next(n for n in _ops(graph, aten.embedding.default)
                           if graph.nodes[n.inputs[0].src].outputs[0].shape[0] == 256)  # vocab rows
    pairs = _pairs(graph, token_embedding, mesh)
    for d in range(nd):
        assert ((_on(Shard(0), d, nd), _on(R, d, nd)), (_on(P, d, nd),)) in pairs, "weight S(0) -> output P(sum)"
        assert ((_on(R, d, nd), _on(Shard(0), d, nd)), (_on(Shard(0), d, nd),)) in pairs, "batch"


class _MatmulNet(nn.Module):
    """x @ W (3-D by 2-D: aten.matmul) and a 2-D mm."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(16, 32))
        self.w2 = nn.Parameter(torch.empty(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w1
        return torch.mm(h.flatten(0, 1), self.w2).sum()


def test_matmul_and_mm_have_megatron_column_and_row():
    with torch.device("meta"):
        model = _MatmulNet()
    gi = index_graph(capture(model, (torch.empty(4, 8, 16, device="meta"),)))
    (mat,) = _ops(gi, aten.matmul.default)
    (mm,) = _ops(gi, aten.mm.default)
    for node, out_nd in ((mat, 3), (mm, 2)):
        pairs = _pairs(gi, node, (2,))
        x_last = Shard(out_nd - 1)
        assert (((R,), (Shard(1),)), ((x_last,),)) in pairs, (node.key, "column: W split on its output dim")
        assert (((x_last,), (Shard(0),)), ((P,),)) in pairs, (node.key, "row: W split on its input dim")
        assert (((Shard(0),), (R,)), ((Shard(0),),)) in pairs, (node.key, "batch")


# --- the replicate fallback ----------------------------------------------------------------
@torch.library.custom_op("autopar_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _twice_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _NoRuleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flip(self.fc(x), dims=[1])
        return torch.ops.autopar_test.twice(h).sum()


def test_op_without_rule_gets_logged_replicate_fallback(caplog):
    with torch.device("meta"):
        model = _NoRuleNet()
    cap = capture(model, (torch.empty(8, 4, 16, device="meta"),))
    gi = index_graph(cap)
    no_rule = [n for n in _ops(gi) if rule_for(n) is None]
    assert {n.target for n in no_rule} == {aten.flip.default, torch.ops.autopar_test.twice.default}
    for node in no_rule:
        for mesh in MESHES:
            strategies, fallback = strategies_for(node, gi.nodes, mesh)
            assert fallback
            assert len(strategies) == 1 and all(p == R for t in strategies[0].inputs + strategies[0].outputs for p in t)

    caplog.set_level(logging.INFO, logger="autopar.solver")
    plan = plan_graph(cap, MeshSpec.make((2,)), CPU, budget=CPU.device.memory_capacity)
    assert plan.solver.status == "Optimal"
    fallback_keys = set(plan.nodes_fallback)
    assert fallback_keys == {n.key for n in no_rule}, plan.nodes_fallback
    assert any("flip" in k for k in fallback_keys) and any("twice" in k for k in fallback_keys)
    logged = [r.getMessage() for r in caplog.records if "no sharding rule" in r.getMessage()]
    for key in fallback_keys:
        assert any(key in m for m in logged), (key, logged)
    for key in fallback_keys:
        ns = plan.node_shardings[key]
        assert all(s == ("R",) for s in ns.inputs + ns.outputs)
    assert "replicate fallback (no sharding rule)" in summary(plan)


# --- shared layers and folding --------------------------------------------------------------
def _gpt_tiny(n_layer: int):
    gpt = load_example_module("gpt")
    cfg = dict(BUILTIN_MODELS["gpt-tiny"].config, n_layer=n_layer)
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(**cfg))
    idx = torch.empty(4, 16, dtype=torch.long, device="meta")
    return model, {"idx": idx, "labels": idx}


def _plan(model, inputs, *, fold: bool = True, mesh=(2,), **pins):
    cap = capture(model, inputs, fold_layers=fold)
    return cap, plan_graph(cap, MeshSpec.make(mesh), CPU, budget=CPU.device.memory_capacity, **pins)


# data parallel pinned: the depth changes the optimum (6 blocks split the batch, 2 replicate), so the
# per-block time is compared under the same block strategies
_DP = {"fix": {"input:*": ["S(0)"], "param:*": ["R"]}, "prefer": {"root/arange*": ["R"], "wpe/*": ["R"], "*": ["S(0)"]}}


def test_identical_layers_share_variables():
    _, two = _plan(*_gpt_tiny(2), **_DP)
    cap6, six = _plan(*_gpt_tiny(6), fold=False, **_DP)
    assert {k: v for k, v in six.node_shardings.items() if k.startswith("blocks.*")} == \
        {k: v for k, v in two.node_shardings.items() if k.startswith("blocks.*")}
    assert cap6.folded_layers == {}, "6 layers captured in full"
    assert six.solver.num_variables == two.solver.num_variables
    assert six.solver.num_constraints == two.solver.num_constraints
    rows = {r.name: r for r in six.layers}
    assert rows["blocks.*"].count == 6 and {r.name: r for r in two.layers}["blocks.*"].count == 2
    assert rows["blocks.*"].time_s == pytest.approx(3 * {r.name: r for r in two.layers}["blocks.*"].time_s)


def test_folded_capture_plans_every_block():
    model, inputs = _gpt_tiny(8)
    cap, plan = _plan(model, inputs, mesh=(2, 2))
    assert cap.folded_layers == {"blocks": 8}
    assert len(model.blocks) == 8, "folding restores the model"
    gi = index_graph(cap)
    assert gi.observed_counts == {"blocks": 2} and gi.layer_counts == {"blocks": 8}
    assert plan.model.folded_layers == {"blocks": 8}
    names = {fqn for fqn, _ in model.named_parameters(remove_duplicate=False)}
    assert set(plan.param_placements) == names
    for suffix in ("attn.qkv.weight", "mlp.proj.weight", "ln_1.bias"):
        placed = [plan.param_placements[f"blocks.{i}.{suffix}"] for i in range(8)]
        assert len(set(placed)) == 1, "shared blocks have one placement"
    assert plan.model.num_parameters == sum(p.numel() for p in model.parameters())
    _, unfolded = _plan(model, inputs, fold=False, mesh=(2, 2))
    assert unfolded.solver.num_variables == plan.solver.num_variables
    assert unfolded.predicted.step_time_s == pytest.approx(plan.predicted.step_time_s, rel=1e-6)
    assert unfolded.predicted.peak_memory_bytes == pytest.approx(plan.predicted.peak_memory_bytes, rel=1e-6)
