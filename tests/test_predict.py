"""autopar.cluster.predict: analytic communication volumes (DP all-reduce 2(n-1)/n*Psi, Megatron 1-D TP four
all-reduces of b*s*h per layer per micro-batch, ZeRO-3 1.5x DP), the pipeline bubble, activation
memory per Korthikanti et al., agreement with the solver's cost functions, and the input errors."""
from dataclasses import replace

import pytest
import torch

from autopar.core.errors import AutoparError, ClusterProfileError, ConfigError
from autopar.models import load_example_module
from autopar.cluster.predict import GPTPlan, params_per_gpu, predict
from autopar.cluster.profile import PRESETS
from autopar.solver.cost import collective_time

H100 = PRESETS["h100-sxm"]
BASE = dict(layers=8, hidden=1024, heads=16, seq=512, vocab=32000, global_batch=64, micro_batch=2)


def _plan(**kw) -> GPTPlan:
    return GPTPlan(**{**BASE, **kw})


def test_params_match_the_example_gpt():
    """Psi of one GPU without TP/PP is the example GPT's own parameter count (tied LM head)."""
    m = load_example_module("gpt")
    cfg = dict(n_layer=2, d_model=64, n_head=4, vocab_size=96, max_seq_len=32)
    with torch.device("meta"):
        model = m.GPT(m.GPTConfig(**cfg))
    model.lm_head.weight = model.wte.weight
    n = sum(p.numel() for p in model.parameters())
    c = GPTPlan(layers=2, hidden=64, heads=4, seq=32, vocab=96, global_batch=4, micro_batch=1)
    assert params_per_gpu(c)["first"] == n


@pytest.mark.parametrize("dp", [2, 4, 8])
def test_dp_all_reduce_volume(dp):
    c = _plan(dp=dp)
    p = predict(c, H100, gpus=dp)
    ar = p.communication["dp_all_reduce"]
    psi_bytes = p.params_per_gpu * 2  # bf16 gradients
    assert ar.count == 1 and ar.bytes_each == psi_bytes
    assert ar.traffic_bytes == pytest.approx(2 * (dp - 1) / dp * psi_bytes)
    assert ar.time_s == pytest.approx(collective_time("all_reduce", psi_bytes, dp, H100.intra_node))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_megatron_tp_four_all_reduces_per_layer_per_micro_batch(tp):
    c = _plan(tp=tp)
    p = predict(c, H100, gpus=tp)
    ar = p.communication["tp_all_reduce"]
    m = c.global_batch // c.micro_batch
    assert ar.count == 4 * c.layers * m
    assert ar.bytes_each == c.micro_batch * c.seq * c.hidden * 2
    assert ar.traffic_bytes == pytest.approx(ar.count * 2 * (tp - 1) / tp * ar.bytes_each)
    assert p.time_breakdown["comm_s"] == pytest.approx(ar.time_s)
    # sequence parallel: all-gather + reduce-scatter of the same tensor instead, the same ring volume
    sp = predict(replace(c, sequence_parallel=True), H100, gpus=tp)
    ag, rs = sp.communication["tp_all_gather"], sp.communication["tp_reduce_scatter"]
    assert ag.count == rs.count == 4 * c.layers * m and "tp_all_reduce" not in sp.communication
    assert ag.traffic_bytes + rs.traffic_bytes == pytest.approx(ar.traffic_bytes)
    # full recompute repeats the two forward all-reduces
    full = predict(replace(c, recompute="full"), H100, gpus=tp)
    assert full.communication["tp_all_reduce"].count == 6 * c.layers * m


@pytest.mark.parametrize("zero, factor", [(1, 1.0), (2, 1.0), (3, 1.5)])
def test_zero_volumes(zero, factor):
    dp = predict(_plan(dp=8), H100, gpus=8)
    z = predict(_plan(dp=8, zero=zero), H100, gpus=8)
    traffic = lambda p: sum(v.traffic_bytes for k, v in p.communication.items() if k.startswith("dp_"))  # noqa: E731
    assert traffic(z) == pytest.approx(factor * traffic(dp))
    mem, mem_z = dp.memory_breakdown, z.memory_breakdown
    assert mem_z["optimizer"] == pytest.approx(mem["optimizer"] / 8, rel=1e-6)
    assert mem_z["grads"] == pytest.approx(mem["grads"] / (8 if zero >= 2 else 1), rel=1e-6)
    assert mem_z["params"] == pytest.approx(mem["params"] / (8 if zero == 3 else 1), rel=1e-6)


@pytest.mark.parametrize("pp, m, v", [(2, 8, 1), (4, 8, 1), (4, 16, 1), (4, 8, 2)])
def test_pipeline_bubble(pp, m, v):
    c = _plan(pp=pp, layers=8, global_batch=m * 2, interleave=v)
    p = predict(c, H100, gpus=pp)
    tb = p.time_breakdown
    assert p.micro_batches == m
    pipeline = tb["compute_s"] + tb["recompute_s"] + p.extras["tp_comm_s"] + p.extras["pp_comm_s"]
    assert tb["bubble_s"] / (pipeline + tb["bubble_s"]) == pytest.approx((pp - 1) / v / (m + (pp - 1) / v))
    sr = p.communication["pp_send_recv"]
    assert sr.count == 2 * m * v and sr.bytes_each == c.micro_batch * c.seq * c.hidden * 2


def test_activation_memory_korthikanti():
    s, b, h, a, L = 512, 2, 1024, 16, 8
    logits = 4 * b * s * 32000
    none = predict(_plan(dtype="float16"), H100, gpus=1).memory_breakdown["activations"]
    assert none == pytest.approx(L * s * b * h * (34 + 5 * a * s / h) + logits, rel=1e-9)
    sel = predict(_plan(dtype="float16", recompute="selective"), H100, gpus=1).memory_breakdown["activations"]
    assert sel == pytest.approx(L * 34 * s * b * h + logits, rel=1e-9)
    t = 4
    tpsp = predict(_plan(dtype="float16", tp=t, sequence_parallel=True), H100, gpus=t).memory_breakdown["activations"]
    assert tpsp == pytest.approx(L * s * b * h / t * (34 + 5 * a * s / h) + logits / t, rel=1e-9)
    tp = predict(_plan(dtype="float16", tp=t), H100, gpus=t).memory_breakdown["activations"]
    assert tp == pytest.approx(L * s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) + logits / t, rel=1e-9)
    full = predict(_plan(dtype="float16", recompute="full"), H100, gpus=1)
    assert full.memory_breakdown["activations"] < sel < none
    assert full.time_breakdown["recompute_s"] > predict(_plan(recompute="selective"), H100, gpus=1
                                                        ).time_breakdown["recompute_s"] > 0


def test_memory_states_and_totals():
    p = predict(_plan(dtype="bfloat16"), H100, gpus=1)
    psi = p.params_per_gpu
    assert p.memory_breakdown["params"] == round(2 * psi) and p.memory_breakdown["grads"] == round(2 * psi)
    assert p.memory_breakdown["optimizer"] == round(12 * psi)  # fp32 master + two AdamW moments
    assert p.peak_memory_bytes == sum(p.memory_breakdown.values())
    assert p.step_time_s == pytest.approx(sum(p.time_breakdown.values()))


def test_links_follow_the_topology():
    """tp stays inside a node (NVLink), dp crosses nodes (InfiniBand): the same model moved costs more."""
    c = _plan(tp=8, dp=2)
    two_nodes = predict(c, H100, nodes=2)
    assert two_nodes.mesh == {"dp": 2, "tp": 8}
    dp = two_nodes.communication["dp_all_reduce"]
    assert dp.time_s == pytest.approx(collective_time("all_reduce", dp.bytes_each, 2, H100.inter_node))
    tp = two_nodes.communication["tp_all_reduce"]
    assert tp.time_s == pytest.approx(tp.count * collective_time("all_reduce", tp.bytes_each, 8, H100.intra_node))


def test_a_measured_profile_must_match_the_mesh():
    prof = replace(PRESETS["cpu-gloo"], mesh_shape=(2, 2), mesh_dim_links=(PRESETS["cpu-gloo"].intra_node,) * 2)
    assert predict(_plan(dp=2, tp=2), prof).mesh == {"dp": 2, "tp": 2}
    with pytest.raises(ClusterProfileError, match=r"measured on mesh \(2, 2\) but the plan is for \(4,\)"):
        predict(_plan(dp=4), prof)


@pytest.mark.parametrize("kw, gpus, match", [
    (dict(tp=3, heads=16), 3, "--tp 3 does not divide --heads 16"),
    (dict(dp=2, tp=2), 8, r"dp x tp x pp = 2 x 2 x 1 = 4 GPUs, but the cluster has 8"),
    (dict(global_batch=10, micro_batch=4), 1, "--global-batch 10 is not a multiple of micro-batch x dp"),
    (dict(layers=6, pp=4), 4, "does not split into pp x interleave"),
    (dict(interleave=2), 1, "--interleave > 1 needs --pp > 1"),
    (dict(recompute="some"), 1, "--recompute 'some'"),
    (dict(zero=4), 1, "ZeRO stage"),
    (dict(hidden=0), 1, "--hidden must be a positive integer"),
])
def test_errors(kw, gpus, match):
    with pytest.raises(ConfigError, match=match) as ei:
        predict(_plan(**kw), H100, gpus=gpus)
    assert isinstance(ei.value, AutoparError)


def test_nodes_set_the_gpu_count():
    with pytest.raises(ConfigError, match=r"= 8 GPUs, but the cluster has 16 \(2 node\(s\) of 8\)"):
        predict(_plan(tp=8), H100, nodes=2)
    assert predict(_plan(tp=8, dp=2), H100, nodes=2).step_time_s > 0
