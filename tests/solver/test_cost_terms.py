"""The cost-model terms the published-results check (benchmarks/published.py) added, one test each, with the
source of each formula:

* rail-parallel inter-node rings (profile.rail_parallel): NCCL runs one channel per NIC, so a group with g
  members per node moves its ring traffic over g NICs (Jeaugey, NVIDIA blog 2019; nccl-tests PERFORMANCE.md);
* pipeline scatter/gather (Narayanan et al. SC'21 sec. 4.1): each tp rank sends 1/t of a stage boundary over
  InfiniBand, the receiver all-gathers over NVLink;
* dropout traffic (Korthikanti et al. 2022 sec. 4.1: a 1-byte mask per element of the attention probabilities
  and of the two hidden dropouts);
* the AdamW step as one memory-bound pass (Kingma & Ba 2015, Algorithm 1: read g, m, v, the fp32 master;
  write m, v, master and the low-precision parameter);
* the tied word embedding's gradient all-reduce between the first and the last pipeline stage (Shoeybi et al.
  2019 / Narayanan et al. 2021: the input embedding and the LM head share one weight on two stages);
* the interleaved-1F1B bubble (p-1)/v slots (Narayanan et al. SC'21 sec. 2.2.2);
* search_plans: every candidate priced by predict, the memory cap honoured, the published plan not beaten
  by a plan that does not fit.
"""
from dataclasses import replace

import pytest

from autopar.cluster.predict import GPTPlan, optimizer_step_time, predict, search_plans
from autopar.cluster.profile import PRESETS, rail_parallel
from autopar.core.errors import ConfigError
from autopar.core.mesh import MeshSpec
from autopar.solver.cost import collective_time

A100 = PRESETS["a100-80g-sxm"]
BASE = {"layers": 8, "hidden": 1024, "heads": 16, "seq": 512, "vocab": 32000, "global_batch": 64, "micro_batch": 2}


def _plan(**kw) -> GPTPlan:
    return GPTPlan(**{**BASE, **kw})


def test_rail_parallel_rings_use_one_nic_per_member_in_a_node():
    """A dp group with g members per node gets g x the inter-node ring bandwidth, capped by NVLink; a group
    with one member per node, send/recv and all-to-all keep one NIC."""
    ib, nv = A100.inter_node, A100.intra_node
    links = A100.dim_links(MeshSpec.make("32"))           # 32 ranks over 4 nodes, 8 per node
    links_tp = A100.dim_links(MeshSpec.make("16x2"))      # dp=16 with tp=2 inside: 4 dp members per node
    links_8 = A100.dim_links(MeshSpec.make("4x8"))        # tp=8 fills the node: 1 dp member per node
    for k in ("all_reduce", "all_gather", "reduce_scatter"):
        ib_beta, nv_beta = ib.collectives[k].beta, nv.collectives[k].beta
        assert links[0].collectives[k].beta == pytest.approx(max(ib_beta / 8, nv_beta))
        assert links_tp[0].collectives[k].beta == pytest.approx(max(ib_beta / 4, nv_beta))
        assert links_8[0].collectives[k] == ib.collectives[k]
        assert links[0].collectives[k].alpha == ib.collectives[k].alpha
    for k in ("send_recv", "all_to_all"):
        assert links[0].collectives[k] == ib.collectives[k]
    assert rail_parallel(ib, nv, 1) is ib
    # 8 x 25 GB/s HDR at 80 % is 160 GB/s, under NVLink's 240: the all-reduce of 1 GiB over 32 ranks
    t = collective_time("all_reduce", 2**30, 32, links[0])
    assert t == pytest.approx(ib.collectives["all_reduce"].alpha + 2 * 31 / 32 * 2**30 / (8 * 0.8 * 25e9))


def test_scatter_gather_sends_one_tth_and_gathers_over_tp():
    c = _plan(tp=4, pp=2, global_batch=16)
    plain = predict(c, A100, gpus=8)
    sg = predict(replace(c, scatter_gather=True), A100, gpus=8)
    bsh = c.micro_batch * c.seq * c.hidden * 2
    assert plain.communication["pp_send_recv"].bytes_each == bsh
    assert sg.communication["pp_send_recv"].bytes_each == bsh / 4
    gather = sg.communication["pp_gather"]
    m = c.global_batch // c.micro_batch
    assert gather.count == 2 * m and gather.ranks == 4 and gather.bytes_each == bsh
    with pytest.raises(ConfigError, match="--scatter-gather .* needs --pp > 1 and --tp > 1"):
        _plan(tp=4, scatter_gather=True)


def test_dropout_adds_its_mask_traffic():
    """Attention dropout reads and writes b*a*s^2 probabilities and writes a 1-byte mask; each of the two
    hidden dropouts writes a 1-byte mask of b*s*h (memory-bound ops at the achieved HBM bandwidth)."""
    c = _plan(dtype="bfloat16")
    p0, p1 = predict(c, A100, gpus=1), predict(replace(c, dropout=True), A100, gpus=1)
    b, s, h, a, e = c.micro_batch, c.seq, c.hidden, c.heads, 2
    dev = A100.device
    bw = dev.memory_bandwidth * dev.max_memory_efficiency
    per_layer_fwd = dev.op_overhead_s + b * a * s * s * (2 * e + 1) / bw + 2 * b * s * h / bw
    m = c.global_batch // c.micro_batch
    # forward + backward (2x bytes, one overhead) per layer and micro-batch
    want = m * c.layers * (per_layer_fwd + dev.op_overhead_s + 2 * (per_layer_fwd - dev.op_overhead_s))
    assert p1.time_breakdown["compute_s"] - p0.time_breakdown["compute_s"] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("dtype, per_elem", [("bfloat16", 28), ("float16", 28), ("float32", 28)])
def test_adamw_step_is_one_memory_bound_pass(dtype, per_elem):
    dev = A100.device
    t = optimizer_step_time(1e9, {"bfloat16": 2, "float16": 2, "float32": 4}[dtype], A100)
    assert t == pytest.approx(dev.op_overhead_s + 1e9 * per_elem / (dev.memory_bandwidth * dev.max_memory_efficiency))
    p = predict(_plan(dtype=dtype, dp=8, zero=1), A100, gpus=8)
    assert p.time_breakdown["optimizer_s"] == pytest.approx(
        optimizer_step_time(p.params_per_gpu / 8, 4 if dtype == "float32" else 2, A100))


def test_tied_embedding_gradient_all_reduce_between_first_and_last_stage():
    c = _plan(pp=4, tp=2, global_batch=16)
    p = predict(c, A100, gpus=8)
    emb = p.communication["pp_embedding_grad"]
    assert emb.count == 1 and emb.ranks == 2 and emb.bytes_each == c.vocab * c.hidden / 2 * 2
    assert "pp_embedding_grad" not in predict(_plan(), A100, gpus=1).communication


@pytest.mark.parametrize("v", [1, 2, 4])
def test_interleaved_bubble_is_p_minus_1_over_v_slots(v):
    c = _plan(pp=2, layers=8, global_batch=32, interleave=v)
    p = predict(c, A100, gpus=2)
    m = p.micro_batches
    slot = (p.time_breakdown["compute_s"] + p.time_breakdown["recompute_s"] + p.extras["tp_comm_s"]
            + p.extras["pp_comm_s"]) / m
    assert p.time_breakdown["bubble_s"] == pytest.approx((2 - 1) / v * slot)


def test_search_plans_prices_every_candidate_and_honours_memory():
    model = _plan(layers=8, hidden=2048, heads=16, seq=1024, global_batch=64)
    (best, bp), *rest = search_plans(model, A100, 16, top=3)
    assert len(rest) == 2 and all(bp.step_time_s <= p.step_time_s for _, p in rest)
    assert predict(best, A100, gpus=16).step_time_s == bp.step_time_s
    # a hand-written plan that fits is never faster than the best found
    mine = replace(model, tp=2, dp=8, micro_batch=2)
    assert bp.step_time_s <= predict(mine, A100, gpus=16).step_time_s
    # a tighter cap: the answer fits it
    cap = bp.peak_memory_bytes * 0.6
    (_, p2), = search_plans(model, A100, 16, memory=cap)
    assert p2.peak_memory_bytes <= cap and p2.step_time_s >= bp.step_time_s
    with pytest.raises(ConfigError, match="no Megatron-style plan"):
        search_plans(model, A100, 16, memory=1e6)


def test_gradient_reduction_dtype():
    """Gradients kept and all-reduced in fp32 (Megatron-LM's --accumulate-allreduce-grads-in-fp32; autopar's own
    runtime under autocast, whose float32 parameters get float32 gradients) double the data-parallel volume and the
    gradient memory of bf16 gradients; parameters and AdamW states are unchanged."""
    c = _plan(dp=8, dtype="bfloat16")
    bf, fp = predict(c, A100, gpus=8), predict(replace(c, grad_dtype="float32"), A100, gpus=8)
    assert fp.communication["dp_all_reduce"].bytes_each == 2 * bf.communication["dp_all_reduce"].bytes_each
    assert fp.memory_breakdown["grads"] == 2 * bf.memory_breakdown["grads"]
    for k in ("params", "optimizer", "activations"):
        assert fp.memory_breakdown[k] == bf.memory_breakdown[k]
    z = predict(replace(c, grad_dtype="float32", zero=1), A100, gpus=8)
    assert z.communication["dp_reduce_scatter"].bytes_each == fp.communication["dp_all_reduce"].bytes_each
    assert z.communication["dp_all_gather"].bytes_each == bf.communication["dp_all_reduce"].bytes_each
    with pytest.raises(ConfigError, match="--grad-dtype 'int8'"):
        _plan(grad_dtype="int8")
