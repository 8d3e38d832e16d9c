"""What the ILP charges for ZeRO-3 parameters against the analytic per-rank volume.

A parameter stored ``S(0)`` over a data-parallel dim of ``n`` ranks and read replicated by a batch-split
op moves, per rank and step (Psi = the parameter's bytes):

* forward: all-gather ``(n-1)/n Psi``; autograd keeps the gathered copy for backward (the ILP charges
  its memory), so without recompute backward does not gather again;
* backward: reduce-scatter of the Partial gradient ``(n-1)/n Psi``;
* a block whose activations are recomputed (``torch.utils.checkpoint`` around the block, collectives
  inside) gathers again in backward: another ``(n-1)/n Psi``, 3 (n-1)/n Psi in all (FSDP's count).

Measured on 2 gloo ranks with this file's model (4 blocks of a 256x256 weight, Psi = 1,048,576 bytes,
counting the full tensors ``autopar.ops.collectives`` gathers and reduce-scatters): a plain step gathers Psi
and reduce-scatters Psi; with every block checkpointed it gathers 2 Psi; when the weight feeds the
block's first op the gather sits before the checkpoint region and a checkpointed step gathers Psi.
Links here are synthetic (alpha 0, 1 GB/s), so every time is a volume / bandwidth.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from autopar.cluster.profile import PRESETS, LinkSpec
from autopar.core.capture import capture
from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.solver import backend, ilp
from autopar.solver.model import TimeCategory

N_BLOCKS, WIDTH, BATCH, DP = 4, 256, 8, 2
BW = 1e9
LINK = LinkSpec.uniform("test", alpha=0.0, bandwidth=BW)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x):
        return self.fc(torch.relu(x))   # the weight's first use inside the block (see below)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(N_BLOCKS))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.sum()


PSI = N_BLOCKS * WIDTH * WIDTH * 4          # bytes of the block weights
FIX = {"input:*": ["S(0)"], "param:*": ["S(0)"]}
PREFER = {"blocks.*": ["S(0)"]}              # every op batch-split: the weight is read replicated


class LinearFirst(Block):
    def forward(self, x):
        return torch.relu(self.fc(x))


def _keys(block):
    with torch.device("meta"):
        model = Stack()
        model.blocks = nn.ModuleList(block() for _ in range(N_BLOCKS))
    cap = capture(model, (torch.empty(BATCH, WIDTH, device="meta"),), fold_layers=False)
    gi = index_graph(cap)
    mesh = MeshSpec.make((DP,), ("dp",))
    keys = ilp.collect_keys(gi, mesh, PRESETS["h100-sxm"], FIX, PREFER)
    return gi, mesh, keys


@pytest.fixture(scope="module")
def zero3():
    return _keys(Block)


@pytest.fixture(scope="module")
def zero3_first():
    return _keys(LinearFirst)


def _solve(zero3, recompute_all: bool):
    gi, mesh, keys = zero3
    # a budget far above any peak switches the recompute decision on without constraining it
    prob = ilp.ShardingILP(gi, keys, mesh, (LINK,), budget=1e15, remat=True)
    prob.build()
    cnt = prob.remat_rows.lists["blocks"].counts
    prob.add_row(cnt["full"] == (N_BLOCKS if recompute_all else 0), "test_full")
    assert backend.solve_problem(prob.prob).has_plan
    val = lambda terms: sum(c * (v.value() if v is not None else 1.0) for c, v in terms)  # noqa: E731
    recompute_fwd_compute = sum(
        info.mult * info.compute[j].fwd_s * v.value()
        for info in keys.values() for j, v in enumerate(prob.x[info.key])
        if info.node.kind == "op" and info.node.layer is not None) if recompute_all else 0.0
    param_comm = sum(val(prob.edge_terms[k]) for k in keys if "linear" in k)
    return param_comm, val(prob.time_terms(TimeCategory.RECOMPUTE)) - recompute_fwd_compute


def test_zero3_without_recompute_charges_gather_plus_reduce_scatter(zero3):
    param_comm, recompute_comm = _solve(zero3, recompute_all=False)
    analytic = 2 * (DP - 1) / DP * PSI / BW      # all-gather + reduce-scatter, (n-1)/n Psi each
    assert param_comm == pytest.approx(analytic)
    assert recompute_comm == pytest.approx(0.0, abs=1e-12)


def test_zero3_recomputed_blocks_pay_the_second_gather(zero3):
    param_comm, recompute_comm = _solve(zero3, recompute_all=True)
    assert param_comm == pytest.approx(2 * (DP - 1) / DP * PSI / BW)
    assert recompute_comm == pytest.approx((DP - 1) / DP * PSI / BW)   # 3 (n-1)/n Psi in all


def test_a_gather_before_the_blocks_first_op_is_not_recomputed(zero3_first):
    """When the weight feeds the block's first op its gather is inserted before the checkpoint region
    (codegen.checkpoint_regions cuts from the block's first node): it is not run again."""
    _, recompute_comm = _solve(zero3_first, recompute_all=True)
    assert recompute_comm == pytest.approx(0.0, abs=1e-12)
