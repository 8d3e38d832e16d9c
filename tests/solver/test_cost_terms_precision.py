"""Mixed precision in the cost model (solver.cost.autocast_dtypes / autocast_graph): the dtypes a float32 capture's
values take under autocast with float32 parameters, and what the cost functions then charge.

* CPU: torch's own dispatch on fake tensors, checked here against the captured graph run on real tensors under
  ``torch.autocast("cpu", torch.bfloat16)`` (every node of the example GPT and LLaMA);
* CUDA: the op lists of PyTorch's Autocast Op Reference (CUDA Op-Specific Behavior): matmul-like ops and SDPA in
  the lower precision, layer_norm / softmax / losses in float32, everything else at its inputs' promoted dtype;
* costs: a bf16 matmul at the device's bf16 peak (H100 tensor cores, 989.5 vs 67 TFLOP/s), its activation at
  2 bytes (saved and resharded), parameters, gradients and AdamW states float32.
"""
import pytest
import torch
from torch.fx import Interpreter

from autopar.cluster.profile import PRESETS
from autopar.core.capture import capture
from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.models import build_model
from autopar.solver import cost as C
from autopar.solver.strategies.base import Strategy

H100 = PRESETS["h100-sxm"]


def _graph(spec: str):
    model, inputs = build_model(spec, batch=2, seq=8, device="cpu")
    cap = capture(model, inputs, fold_layers=False)
    return cap, index_graph(cap)


def _real_autocast_dtypes(cap) -> dict[str, tuple]:
    """Each fx node's output dtypes when the captured graph runs on real tensors under CPU autocast."""
    seen = {}

    class Rec(Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            vals = r if isinstance(r, (list, tuple)) else (r,)
            seen[n.name] = tuple(v.dtype if isinstance(v, torch.Tensor) else None for v in vals)
            return r

    gm = cap.program.graph_module
    args = [torch.randn(v.shape) if v.dtype.is_floating_point else torch.zeros(v.shape, dtype=v.dtype)
            for v in (n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder")]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        Rec(gm).run(*args)
    return seen


@pytest.mark.parametrize("spec", ["gpt-tiny", "llama-tiny"])
def test_cpu_dtypes_are_what_autocast_gives(spec):
    cap, gi = _graph(spec)
    got = C.autocast_dtypes(gi, torch.bfloat16, "cpu")
    real = _real_autocast_dtypes(cap)
    compared = [k for k in got if k in real]
    assert len(compared) == len(gi.nodes)
    assert {k: got[k] for k in compared} == {k: real[k] for k in compared}
    # something did change: the linears compute in bf16, the parameters stay fp32
    ops = {k: g for k, g in gi.nodes.items() if g.kind == "op"}
    assert any(str(g.target) == "aten.linear.default" and got[k][0] == torch.bfloat16 for k, g in ops.items())
    assert all(got[k][0] == torch.float32 for k, g in gi.nodes.items() if g.kind == "param")


def test_cuda_rules_follow_the_autocast_op_reference():
    _, gi = _graph("gpt-tiny")
    got = C.autocast_dtypes(gi, torch.bfloat16, "cuda")
    by_op: dict[str, set] = {}
    for k, g in gi.nodes.items():
        if g.kind == "op":
            by_op.setdefault(str(g.target), set()).add(got[k][0])
    assert by_op["aten.linear.default"] == {torch.bfloat16}
    assert by_op["aten.scaled_dot_product_attention.default"] == {torch.bfloat16}
    assert by_op["aten.layer_norm.default"] == {torch.float32}       # fp32 list
    assert by_op["aten.cross_entropy_loss.default"] == {torch.float32}
    assert by_op["aten.gelu.default"] == {torch.bfloat16}            # follows its bf16 input
    assert by_op["aten.add.Tensor"] == {torch.float32}               # residual: fp32 + bf16 promotes to fp32
    assert by_op["aten.arange.default"] == {torch.int64}
    assert C.autocast_graph(gi, torch.float32) is gi


def test_costs_at_the_compute_dtype():
    _, gi = _graph("gpt-tiny")
    bf = C.autocast_graph(gi, torch.bfloat16, "cuda")
    name = next(k for k, g in gi.nodes.items() if str(g.target) == "aten.linear.default")
    g32, g16 = gi.nodes[name], bf.nodes[name]
    mesh = (1,)
    strat = Strategy(inputs=tuple((C.Replicate(),) for _ in g32.inputs), outputs=((C.Replicate(),),))
    metas32 = [gi.nodes[r.src].outputs[r.out] for r in g32.inputs]
    metas16 = [bf.nodes[r.src].outputs[r.out] for r in g16.inputs]
    c32 = C.compute_cost(g32, strat, metas32, H100, mesh)
    c16 = C.compute_cost(g16, strat, metas16, H100, mesh)
    flops = C.contraction_flops(g32, metas32)
    dev = H100.device
    eff = dev.max_matmul_efficiency * flops / (flops + dev.matmul_half_efficiency_flops)
    assert c32.fwd_s >= flops / (67e12 * eff)
    nbytes16 = sum(m.nbytes for m in metas16) + g16.outputs[0].nbytes
    assert c16.fwd_s == pytest.approx(dev.op_overhead_s + max(flops / (989.5e12 * eff),
                                                              nbytes16 / (dev.memory_bandwidth * dev.max_memory_efficiency)))
    assert c16.fwd_s < c32.fwd_s
    # its output is kept (and resharded) at 2 bytes, the weight and its states stay fp32
    assert C.activation_bytes(g16, strat, mesh) == C.activation_bytes(g32, strat, mesh) / 2
    w = next(r for r in g16.inputs if bf.nodes[r.src].kind == "param")
    assert bf.nodes[w.src].outputs[0].dtype == torch.float32
    links = H100.dim_links(MeshSpec.make("8"))
    sh, rep = (C.Shard(0),), (C.Replicate(),)
    e32 = C.edge_cost(g32.outputs[0], sh, rep, (False,), (8,), links)
    e16 = C.edge_cost(g16.outputs[0], sh, rep, (False,), (8,), links)
    alpha = links[0].collectives["all_gather"].alpha
    assert e16.fwd_s - alpha == pytest.approx((e32.fwd_s - alpha) / 2)
