"""Cost model v0 against hand-computed answers: alpha-beta ring volumes, placement transitions (forward
and gradient), the compute roofline, and per-rank parameter state.

Links are synthetic (alpha = 0, beta = 1 / bandwidth) so every expected time is a ring volume
times beta, written out as in the formulas: all-reduce 2(n-1)/n*S, all-gather and
reduce-scatter (n-1)/n*S, all-to-all (n-1)/n*S.
"""
import pytest
import torch

from autopar.core.graph import GNode, InputRef, TensorMeta
from autopar.core.mesh import MeshSpec
from autopar.core.placement import Partial, Replicate, Shard
from autopar.cluster.profile import PRESETS, LinkSpec
from autopar.solver import cost as C
from autopar.solver.strategies.base import Strategy

aten = torch.ops.aten
R, P = Replicate(), Partial("sum")
S0, S1 = Shard(0), Shard(1)
BW = 1e9                      # bytes/s
BETA = 1.0 / BW
LINK = LinkSpec.uniform("test", alpha=0.0, bandwidth=BW)
META = TensorMeta(shape=(64, 128), dtype=torch.float32)
S = META.nbytes               # 32 KiB, the full tensor


def ring(kind: str, n: int, nbytes: float = S) -> float:
    return {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
            "all_to_all": (n - 1) / n, "send_recv": 1.0}[kind] * nbytes * BETA


# --- collectives ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_collective_time_is_ring_volume_times_beta(kind, n):
    assert C.collective_time(kind, S, n, LINK) == pytest.approx(ring(kind, n))


def test_collective_time_alpha_once_and_trivial_cases():
    slow = LinkSpec.uniform("lat", alpha=1e-5, bandwidth=BW)
    assert C.collective_time("all_reduce", S, 4, slow) == pytest.approx(1e-5 + ring("all_reduce", 4))
    assert C.collective_time("all_reduce", S, 1, slow) == 0.0, "one rank: nothing to communicate"
    assert C.collective_time("all_gather", 0, 4, slow) == 0.0


def test_all_reduce_is_reduce_scatter_plus_all_gather():
    for n in (2, 4, 8):
        rs_ag = C.collective_time("reduce_scatter", S, n, LINK) + C.collective_time("all_gather", S, n, LINK)
        assert C.collective_time("all_reduce", S, n, LINK) == pytest.approx(rs_ag)


# --- transitions on a 4-way mesh dim ----------------------------------------------------------
MESH4 = (4,)


@pytest.mark.parametrize("src, dst, expected", [
    ((R,), (R,), 0.0),
    ((R,), (S0,), 0.0),                                 # chunk locally
    ((R,), (S1,), 0.0),
    ((S0,), (R,), ring("all_gather", 4)),               # 3/4 S beta
    ((P,), (R,), ring("all_reduce", 4)),                # 2 * 3/4 S beta
    ((P,), (S0,), ring("reduce_scatter", 4)),
    ((S0,), (S1,), ring("all_to_all", 4)),
], ids=["R->R", "R->S0", "R->S1", "S0->R", "P->R", "P->S0", "S0->S1"])
def test_transition_time_1d(src, dst, expected):
    assert C.transition_time(META, src, dst, MESH4, (LINK,)) == pytest.approx(expected)


def test_transition_volume_counts_the_tensor_as_sharded_by_other_mesh_dims():
    mesh, links = (2, 4), (LINK, LINK)
    # gather on the inner dim of a tensor still split in 2 by the outer dim: ring over S/2
    assert C.transition_time(META, (S0, S1), (S0, R), mesh, links) == pytest.approx(ring("all_gather", 4, S / 2))
    # both dims gathered: inner first (over S/2), then the outer over the full tensor
    assert C.transition_time(META, (S0, S1), (R, R), mesh, links) == pytest.approx(
        ring("all_gather", 4, S / 2) + ring("all_gather", 2))
    # partial on the outer dim only
    assert C.transition_time(META, (P, R), (R, R), mesh, links) == pytest.approx(ring("all_reduce", 2))


def test_transition_uses_each_mesh_dims_link():
    slow = LinkSpec.uniform("slow", alpha=0.0, bandwidth=BW / 10)
    mesh, links = (2, 4), (slow, LINK)
    outer = C.transition_time(META, (P, R), (R, R), mesh, links)
    inner = C.transition_time(META, (R, P), (R, R), mesh, links)
    assert outer == pytest.approx(2 * (2 - 1) / 2 * S * 10 * BETA)
    assert inner == pytest.approx(ring("all_reduce", 4))


# --- edges: forward resharding plus the gradient's way back ----------------------------------
def test_replicated_weight_into_batch_split_op_pays_the_dp_all_reduce():
    """A replicated parameter read by an op that splits its work (the batch) on the mesh dim gets a
    Partial gradient there: the backward is the data-parallel gradient all-reduce."""
    c = C.edge_cost(META, (R,), (R,), (True,), MESH4, (LINK,))
    assert c.fwd_s == 0.0
    assert c.bwd_s == pytest.approx(ring("all_reduce", 4))
    idle = C.edge_cost(META, (R,), (R,), (False,), MESH4, (LINK,))
    assert idle.total == 0.0, "an op that does not split its work needs no gradient reduction"


def test_sharded_weight_into_op_sharding_it_the_same_way_is_free():
    """Megatron column-parallel: the weight is S(0) and the op reads it S(0): nothing to move."""
    assert C.edge_cost(META, (S0,), (S0,), (True,), MESH4, (LINK,)).total == 0.0


def test_zero3_edge_costs_one_dp_all_reduce_of_volume():
    """A parameter stored S(0) (ZeRO-3 / FSDP) read replicated by a batch-split op: all-gather forward,
    reduce-scatter of the Partial gradient backward -- together the volume of one DP all-reduce.

    autopar's runtime keeps the gathered weight for backward (autograd saves it; the ILP charges its
    memory), so a step gathers once; a recomputed block gathers again in backward, which the ILP's
    recompute term charges (tests/solver/test_zero3_pricing.py).
    """
    z3 = C.edge_cost(META, (S0,), (R,), (True,), MESH4, (LINK,))
    assert z3.fwd_s == pytest.approx(ring("all_gather", 4))
    assert z3.bwd_s == pytest.approx(ring("reduce_scatter", 4))
    dp = C.edge_cost(META, (R,), (R,), (True,), MESH4, (LINK,))
    assert z3.total == pytest.approx(dp.total)


def test_grad_transition_placements():
    assert C.grad_transition((R,), (R,), (True,)) == ((P,), (R,))
    assert C.grad_transition((S0,), (R,), (True,)) == ((P,), (S0,))
    assert C.grad_transition((P,), (R,), (False,)) == ((R,), (R,)), "the gradient of a Partial is replicated"
    assert C.grad_transition((R, R), (R, S1), (True, True)) == ((P, S1), (R, R))


def test_partial_output_into_replicated_consumer_backward_is_free():
    """P -> R forward is an all-reduce; its gradient (R at the consumer) flows back to P as R: free."""
    c = C.edge_cost(META, (P,), (R,), (False,), MESH4, (LINK,))
    assert c.fwd_s == pytest.approx(ring("all_reduce", 4)) and c.bwd_s == 0.0


# --- presets: which link a mesh dim uses decides what a collective costs ---------------------
def test_h100_8x8_dp_all_reduce_crosses_nodes():
    p = PRESETS["h100-sxm"]
    links = p.dim_links(MeshSpec.make("8x8"))
    assert [lk.name for lk in links] == ["infiniband", "nvlink"]
    ib, nv = links[0].collectives["all_reduce"], links[1].collectives["all_reduce"]
    assert ib.beta == pytest.approx(1 / (0.8 * 50e9)) and nv.beta == pytest.approx(1 / (0.8 * 450e9))
    grad = TensorMeta(shape=(4096, 4096), dtype=torch.float32)
    t_outer = C.transition_time(grad, (P, R), (R, R), (8, 8), links)
    t_inner = C.transition_time(grad, (R, P), (R, R), (8, 8), links)
    assert t_outer == pytest.approx(ib.alpha + ib.beta * 2 * 7 / 8 * grad.nbytes)
    assert t_inner == pytest.approx(nv.alpha + nv.beta * 2 * 7 / 8 * grad.nbytes)
    assert t_outer > 8 * t_inner
    # two nodes of a 2x8 mesh, named explicitly: same split
    assert [lk.name for lk in p.dim_links(MeshSpec.make("2x8"), nodes=2)] == ["infiniband", "nvlink"]


# --- compute ----------------------------------------------------------------------------------
def _node(target, in_shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]) -> tuple[GNode, list[TensorMeta]]:
    metas = [TensorMeta(shape=s, dtype=torch.float32) for s in in_shapes]
    node = GNode(name="n", key="k", kind="op", target=target, outputs=(TensorMeta(shape=out_shape, dtype=torch.float32),),
                 inputs=tuple(InputRef(src=f"i{i}", out=0) for i in range(len(in_shapes))))
    return node, metas


LINEAR = ([(8, 1024, 4096), (4096, 4096)], (8, 1024, 4096))


def test_matmul_time_decreases_when_split():
    h100 = PRESETS["h100-sxm"]
    node, metas = _node(aten.linear.default, *LINEAR)
    rep = C.compute_cost(node, Strategy(inputs=((R,), (R,)), outputs=((R,),)), metas, h100, (8,))
    batch = C.compute_cost(node, Strategy(inputs=((S0,), (R,)), outputs=((S0,),)), metas, h100, (8,))
    column = C.compute_cost(node, Strategy(inputs=((R,), (S0,)), outputs=((Shard(2),),)), metas, h100, (8,))
    flops = 2 * 8 * 1024 * 4096 * 4096
    assert C.contraction_flops(node, metas) == flops
    assert batch.fwd_s < rep.fwd_s / 4 and column.fwd_s < rep.fwd_s / 4
    assert rep.fwd_s / batch.fwd_s < 8, "smaller ops run less efficiently: less than linear speed-up"
    # compute bound: the roofline's FLOP side, and backward is twice the forward
    dev = h100.device
    eff = dev.max_matmul_efficiency * flops / (flops + dev.matmul_half_efficiency_flops)
    assert rep.fwd_s == pytest.approx(dev.op_overhead_s + flops / (dev.peak_flops["float32"] * eff))
    assert rep.bwd_s == pytest.approx(2 * rep.fwd_s)
    on_2x4 = C.compute_cost(node, Strategy(inputs=((S0, R), (R, S0)), outputs=((S0, Shard(2)),)), metas, h100, (2, 4))
    assert on_2x4.fwd_s < rep.fwd_s / 4


def test_memory_bound_op_is_bytes_over_bandwidth():
    h100 = PRESETS["h100-sxm"]
    node, metas = _node(aten.gelu.default, [(8, 1024, 4096)], (8, 1024, 4096))
    nbytes = 2 * 8 * 1024 * 4096 * 4
    dev = h100.device
    rep = C.compute_cost(node, Strategy(inputs=((R,),), outputs=((R,),)), metas, h100, (4,))
    assert rep.fwd_s == pytest.approx(dev.op_overhead_s + nbytes / (dev.memory_bandwidth * dev.max_memory_efficiency))
    split = C.compute_cost(node, Strategy(inputs=((S0,),), outputs=((S0,),)), metas, h100, (4,))
    assert split.fwd_s - dev.op_overhead_s == pytest.approx((rep.fwd_s - dev.op_overhead_s) / 4)


@pytest.mark.parametrize("target", [aten.view.default, aten.transpose.int, aten.permute.default, aten.expand.default])
def test_view_ops_are_free(target):
    node, metas = _node(target, [(8, 1024, 4096)], (8, 1024, 4096))
    c = C.compute_cost(node, Strategy(inputs=((R,),), outputs=((R,),)), metas, PRESETS["h100-sxm"], (4,))
    assert c.total == 0.0
    assert C.activation_bytes(node, Strategy(inputs=((R,),), outputs=((R,),)), (4,)) == 0.0, "views own no memory"


def test_activation_bytes_are_local():
    node, _ = _node(aten.gelu.default, [(8, 16)], (8, 16))
    assert C.activation_bytes(node, Strategy(inputs=((S0,),), outputs=((S0,),)), (4,)) == 8 * 16 * 4 / 4


# --- memory -----------------------------------------------------------------------------------
def test_adamw_state_is_4_4_8_bytes_per_fp32_element():
    w = TensorMeta(shape=(1024, 1024), dtype=torch.float32)
    n = 1024 * 1024
    assert C.param_state_bytes(w, (R,), (4,)) == {"params": 4 * n, "grads": 4 * n, "optimizer": 8 * n}
    assert C.param_state_bytes(w, (S0,), (4,)) == {"params": n, "grads": n, "optimizer": 2 * n}
    assert C.param_state_bytes(w, (S0, S1), (2, 4)) == {"params": 4 * n / 8, "grads": 4 * n / 8, "optimizer": n}
    assert C.param_state_bytes(w, (R, S1), (2, 4)) == {"params": n, "grads": n, "optimizer": 2 * n}


def test_parameter_gradient_all_reduce_shares_one_latency_per_bucket():
    """The runtime reduces data-parallel parameter gradients in 25 MiB buckets (autopar.runtime.grad_sync), so
    a parameter's gradient all-reduce pays bytes / bucket of the latency, not a whole one; activation
    gradients and the forward are unbatched and pay it in full."""
    alpha = 1e-3
    link = LinkSpec.uniform("lat", alpha=alpha, bandwidth=BW)
    act = C.edge_cost(META, (R,), (R,), (True,), MESH4, (link,))
    par = C.edge_cost(META, (R,), (R,), (True,), MESH4, (link,), param=True)
    share = S / C.GRAD_BUCKET_BYTES
    assert act.bwd_s == pytest.approx(alpha + ring("all_reduce", 4))
    assert par.bwd_s == pytest.approx(alpha * share + ring("all_reduce", 4))
    z3 = C.edge_cost(META, (S0,), (R,), (True,), MESH4, (link,), param=True)   # ZeRO-3 gather: not bucketed
    assert z3.fwd_s == pytest.approx(alpha + ring("all_gather", 4))
    big = TensorMeta(shape=(8192, 8192), dtype=torch.float32)   # 256 MiB: a bucket of its own at least
    whole = C.edge_cost(big, (R,), (R,), (True,), MESH4, (link,), param=True)
    assert whole.bwd_s == pytest.approx(C.edge_cost(big, (R,), (R,), (True,), MESH4, (link,)).bwd_s)


def test_checkpoint_overhead_is_the_profiles_per_op_surcharge():
    import dataclasses
    import operator

    dev = dataclasses.replace(PRESETS["cpu-gloo"].device, selective_op_overhead_s=3e-4, recompute_op_overhead_s=1e-4)
    for target in (aten.gelu.default, aten.view.default, aten.linear.default):   # views dispatch too
        node, _ = _node(target, [(8, 16)], (8, 16))
        assert C.checkpoint_overhead(node, dev) == C.OpCost(3e-4, 1e-4)
    node, _ = _node(operator.getitem, [(8, 16)], (8, 16))
    assert C.checkpoint_overhead(node, dev) == C.OpCost(0.0, 0.0), "a Python getitem dispatches nothing"


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_charges_the_checkpoint_surcharge_per_block_op(mode):
    """A recomputed block pays its op nodes (getitem aside) times the profile's per-op surcharge on top of
    re-running its ops; the other mode's surcharge is not charged."""
    import dataclasses
    import operator

    import autopar
    from autopar.core.capture import capture
    from autopar.core.graph import index_graph
    from autopar.models import load_example_module

    gpt = load_example_module("gpt")
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, max_seq_len=16))
    idx = torch.randint(0, 64, (4, 16))
    inputs = {"idx": idx, "labels": idx}
    gi = index_graph(capture(model, inputs, fold_layers=False))
    ops = sum(1 for n in gi.nodes.values()
              if n.kind == "op" and n.layer is not None and n.layer[0] == "blocks" and n.target is not operator.getitem)
    gloo = PRESETS["cpu-gloo"]
    base = dataclasses.replace(gloo, device=dataclasses.replace(gloo.device, selective_op_overhead_s=0.0,
                                                                 recompute_op_overhead_s=0.0))
    sel, full = 7e-3, 3e-3        # seconds per op, large enough to stand out of the recomputed ops' time
    charged = dataclasses.replace(base, device=dataclasses.replace(base.device, selective_op_overhead_s=sel,
                                                                    recompute_op_overhead_s=full))
    t = {}
    for name, prof in (("base", base), ("charged", charged)):
        p = autopar.plan(model, inputs, mesh_shape=(1,), mesh_dim_names=("dp",), cluster=prof, recompute=mode)
        t[name] = p.predicted.time_breakdown["recompute_s"]
    want = ops * (sel if mode == "selective" else full)
    assert ops > 20
    assert t["charged"] - t["base"] == pytest.approx(want, rel=1e-6)
