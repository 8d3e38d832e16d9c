"""Fused kernels in the cost model: a fused region costs the fused kernel's traffic (inputs read once,
outputs written once, one op overhead), by the analytic byte counts of the unfused and fused forms;
without fusion nothing changes; folded blocks count their fusions as the full model does."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.frontend.planning import fusible_groups
from autopar.core.capture import capture
from autopar.core.errors import ConfigError
from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.cluster.profile import PRESETS
from autopar.solver import fusion, ilp
from autopar.solver.planner import plan_graph

B, D = 6, 16            # rows, hidden
N = B * D               # elements of one activation
FP32 = 4


class SwiGLU(nn.Module):
    def forward(self, g, u):
        return (F.silu(g) * u).sum()


class BiasGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return F.gelu(x + self.bias).sum()


class RMSNorm(nn.Module):
    """HF-style RMSNorm written out: pow, mean, add eps, rsqrt, mul, weight mul."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, h):
        return (self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))).sum()


x = torch.randn(B, D)
# (model, inputs, kind, ops in the region, unfused bytes, fused bytes), counted by hand from the shapes
CASES = {
    # silu: read g, write s; mul: read s, u, write y  ->  fused: read g, u, write y
    "swiglu": (SwiGLU, (x, x.clone()), "swiglu", 2, 5 * N, 3 * N),
    # add: read x, b, write x+b; gelu: read, write  ->  fused: read x, b, write y
    "bias_gelu": (BiasGelu, (x,), "bias_gelu", 2, 4 * N + D, 2 * N + D),
    # pow 2N, mean N+B, add 2B, rsqrt 2B, mul 2N+B, weight mul 2N+D  ->  fused: read h, w, write y
    "rms_norm": (RMSNorm, (x,), "rms_norm", 6, 7 * N + 6 * B + D, 2 * N + D),
}


def _region(case: str, profile):
    """(unfused, fused) forward+backward seconds of the fused region under its replicated strategies."""
    make, inputs, kind, ops, _, _ = CASES[case]
    cap = capture(make(), inputs)
    gi = index_graph(cap)
    mesh = MeshSpec.make((1,))
    keys = ilp.collect_keys(gi, mesh, profile)
    groups = fusion.check_fusions(fusible_groups(cap))
    assert [k for k, _ in groups] == [kind] and len(groups[0][1]) == ops, groups
    region = [gi.nodes[n].key for n in groups[0][1]]
    before = sum(keys[k].compute[0].total for k in region)
    fusion.fuse_costs(gi, keys, fusion.shares(gi, groups), profile, mesh.shape)
    return before, sum(keys[k].compute[0].total for k in region)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_region_costs_the_fused_traffic(case):
    _, _, _, ops, unfused_bytes, fused_bytes = CASES[case]
    dev = PRESETS["h100-sxm"].device
    no_overhead = dataclasses.replace(PRESETS["h100-sxm"], device=dataclasses.replace(dev, op_overhead_s=0.0))
    before, after = _region(case, no_overhead)
    assert after / before == pytest.approx(fused_bytes / unfused_bytes, rel=1e-12)
    # with the per-op overhead: the bytes saved (forward 1x, backward 2x) plus ops - 1 launches each way
    before, after = _region(case, PRESETS["h100-sxm"])
    bw = dev.memory_bandwidth * dev.max_memory_efficiency
    saved = 3 * (unfused_bytes - fused_bytes) * FP32 / bw + 2 * (ops - 1) * dev.op_overhead_s
    assert before - after == pytest.approx(saved, rel=1e-9)


def test_plan_fuse_option_changes_only_the_fused_ops():
    model, inputs = SwiGLU(), (x, x.clone())
    kw = dict(mesh_shape=(2,), fix={"input:*": ["R"]})
    off = autopar.plan(model, inputs, cluster="h100-sxm", fuse=False, **kw)
    on = autopar.plan(model, inputs, cluster="h100-sxm", fuse=True, **kw)
    default_gpu = autopar.plan(model, inputs, cluster="h100-sxm", **kw)
    default_cpu = autopar.plan(model, inputs, cluster="cpu-gloo", **kw)
    assert off.fusions == () and default_cpu.fusions == ()
    assert default_gpu.fusions == on.fusions
    (f,) = on.fusions
    assert (f.kind, f.count, len(f.nodes)) == ("swiglu", 1, 2) and f.time_saved_s > 0
    assert off.predicted.step_time_s - on.predicted.step_time_s == pytest.approx(f.time_saved_s, rel=1e-9)
    # unfused costs are what they were before fusion existed: the planner without fusions gives the same plan
    assert plan_graph(capture(model, inputs), MeshSpec.make((2,)), PRESETS["h100-sxm"], fix=kw["fix"]
                      ).predicted == off.predicted


def test_a_reshard_inside_a_group_is_costed_unfused():
    """silu's output split, the mul's inputs replicated: an all-gather sits between them, codegen cannot
    fuse them, and the plan predicts (and lists) them unfused."""
    model, inputs = SwiGLU(), (x, x.clone())
    fix = {"input:*": ["R"], "root/silu#0": ["S(0)"], "root/mul#0": ["R"]}
    on = autopar.plan(model, inputs, mesh_shape=(2,), cluster="h100-sxm", fuse=True, fix=fix)
    off = autopar.plan(model, inputs, mesh_shape=(2,), cluster="h100-sxm", fuse=False, fix=fix)
    assert on.node_shardings["root/silu#0"].outputs[0] == ("S(0)",) and on.fusions == ()
    assert on.predicted == off.predicted and on.layers == off.layers


def _llama4():
    from autopar.models import load_example_module

    llama = load_example_module("llama")
    cfg = llama.LlamaConfig(n_layer=4, d_model=32, n_head=2, n_kv_head=1, d_ff=64, vocab_size=64, max_seq_len=8)
    with torch.device("meta"):
        model = llama.Llama(cfg)
    return model, {"idx": torch.zeros(2, 8, dtype=torch.long, device="meta"),
                   "labels": torch.zeros(2, 8, dtype=torch.long, device="meta")}


def test_folded_blocks_count_fusions_like_the_full_model():
    model, inputs = _llama4()
    plans = [autopar.plan(model, inputs, mesh_shape=(1,), cluster="h100-sxm", fold_layers=fold) for fold in (True, False)]
    assert plans[0].model.folded_layers == {"blocks": 4} and not plans[1].model.folded_layers
    counts = [{(f.kind, f.nodes): f.count for f in p.fusions} for p in plans]
    assert counts[0] == counts[1]
    # the first block's norm reads the embedding (plain rms_norm); every later one fuses the residual add
    norm = "blocks.*/attn_norm/rms_norm#0"
    assert counts[0][("rms_norm", (norm,))] == 1 and counts[0][("add_norm", ("blocks.*/add#1", norm))] == 3
    saved = [sum(f.time_saved_s for f in p.fusions) for p in plans]
    assert saved[0] == pytest.approx(saved[1], rel=1e-9) and saved[0] > 0
    assert plans[0].predicted.step_time_s == pytest.approx(plans[1].predicted.step_time_s, rel=1e-12)
    off = autopar.plan(model, inputs, mesh_shape=(1,), cluster="h100-sxm", fuse=False)
    assert off.predicted.step_time_s - plans[0].predicted.step_time_s == pytest.approx(saved[0], rel=1e-9)


@pytest.mark.parametrize("bad", ["swiglu", [{"kind": "swiglu"}], [{"kind": 1, "nodes": ["mul"]}], [["mul"]]])
def test_bad_fusion_lists_are_refused(bad):
    with pytest.raises(ConfigError, match="fusions"):
        fusion.check_fusions(bad)


def test_folded_plan_with_a_broken_group_matches_the_full_model():
    """The last block's residual add split over the sequence, the final norm replicated: that add_norm is
    not fused (it stands for one add of four), the other three block adds still are."""
    model, inputs = _llama4()
    kw = dict(mesh_shape=(2,), cluster="h100-sxm", fix={"input:*": ["R"], "blocks.[*]/add#1": ["S(1)"],
                                                       "blocks.[*]/attn_norm/rms_norm#0": ["S(1)"],
                                                       "norm/rms_norm#0": ["R"]})
    plans = [autopar.plan(model, inputs, fold_layers=fold, **kw) for fold in (True, False)]
    for p in plans:
        fused = {(f.kind, f.nodes): f.count for f in p.fusions}
        assert ("add_norm", ("blocks.*/add#1", "norm/rms_norm#0")) not in fused
        assert fused[("add_norm", ("blocks.*/add#1", "blocks.*/attn_norm/rms_norm#0"))] == 3
    assert plans[0].predicted.step_time_s == pytest.approx(plans[1].predicted.step_time_s, rel=1e-12)
    off = autopar.plan(model, inputs, fuse=False, **kw)
    saved = sum(f.time_saved_s for f in plans[0].fusions)
    assert off.predicted.step_time_s - plans[0].predicted.step_time_s == pytest.approx(saved, rel=1e-9)


def test_explain_costs_fused_ops_as_the_planner():
    from autopar.tools.explain import explain
    from autopar.models import build_model

    model, inputs = build_model("llama-tiny", batch=2, seq=8, device="meta")
    kw = dict(mesh_shape=(2,), cluster="h100-sxm", fix={"input:*": ["S(0)"]})
    on, off = autopar.plan(model, inputs, fuse=True, **kw), autopar.plan(model, inputs, fuse=False, **kw)
    assert on.node_shardings == off.node_shardings   # the same placements, so the costs differ by fusion only
    region = ("blocks.*/mlp/silu#0", "blocks.*/mlp/mul#0")
    cost = [sum(n.chosen.compute_s for n in explain(p, "llama-tiny") if n.key in region) for p in (on, off)]
    (swiglu,) = [f for f in on.fusions if f.kind == "swiglu"]
    assert cost[1] - cost[0] == pytest.approx(swiglu.time_saved_s, rel=1e-9)
