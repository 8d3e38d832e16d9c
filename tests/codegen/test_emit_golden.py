"""Golden snapshot of the emitted code for the demo-sized GPT on a (dp, tp) = (2, 2) mesh.

The snapshot is emitted from a stored plan (tests/golden/gpt_tiny_2x2_dptp.plan.json), which pins every
decision: every node's input and output placements, every parameter, the memory decisions. So the
snapshot moves only when codegen changes, never with the cost model or the solver. Any codegen change
shows up here as a diff. To accept an intended change, regenerate with
``python tests/codegen/test_emit_golden.py`` (it re-plans with FIX below and rewrites both files) and
review the diff of tests/golden/.
"""
from __future__ import annotations

import difflib
import sys
from pathlib import Path

import autopar
from autopar.core.capture import capture
from autopar.codegen import build_parallel_graph
from autopar.codegen.emit import emit_source, place_factories
from autopar.core.plan import Plan
from autopar.models import build_model

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "gpt_tiny_2x2_dptp.py"
GOLDEN_PLAN = GOLDEN.with_suffix(".plan.json")
# Megatron-style DP x TP, pinned so the snapshot does not move with cost-model changes.
FIX = {"input:*": ["S(0)", "R"],
       "param:*attn.qkv.*": ["R", "S(0)"], "param:*mlp.fc.*": ["R", "S(0)"],
       "param:*attn.proj.weight": ["R", "S(1)"], "param:*mlp.proj.weight": ["R", "S(1)"],
       "blocks.*/attn.qkv/linear#0": ["S(0)", "S(2)"], "blocks.*/mlp.fc/linear#0": ["S(0)", "S(2)"],
       "blocks.*/attn/scaled_dot_product_attention#0": ["S(0)", "S(1)"],
       "blocks.*/attn.proj/linear#0": ["S(0)", "P(sum)"], "blocks.*/mlp.proj/linear#0": ["S(0)", "P(sum)"]}


def planned() -> Plan:
    """The plan the golden was emitted from, solved anew (only when regenerating)."""
    model, inputs = build_model("gpt-tiny", batch=8, seq=16, device="meta")
    return autopar.plan(model, inputs, mesh_shape=(2, 2), mesh_dim_names=("dp", "tp"), cluster="h100-sxm", fix=FIX,
                        recompute="none", zero=0, offload=False)


def emitted(fuse: bool = False, plan: Plan | None = None) -> str:
    model, inputs = build_model("gpt-tiny", batch=8, seq=16, device="meta")
    plan = plan if plan is not None else Plan.from_json(GOLDEN_PLAN)
    gm, _ = build_parallel_graph(capture(model, inputs, fold_layers=False), plan, fuse=fuse)
    return emit_source(place_factories(gm, "cpu"), plan)


def test_the_stored_plan_pins_every_decision():
    plan = Plan.from_json(GOLDEN_PLAN)
    model, inputs = build_model("gpt-tiny", batch=8, seq=16, device="meta")
    assert set(plan.param_placements) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    keys = set(plan.node_shardings)
    assert len(keys) > 40 and all(plan.node_shardings[k].outputs for k in keys)
    assert not plan.checkpoint and not plan.offload and not plan.optimizer_sharding and not plan.optimizer_offload


def test_emitted_code_matches_golden():
    src = emitted()
    want = GOLDEN.read_text()
    if src != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), src.splitlines(True), "golden", "emitted", n=2))
        raise AssertionError(f"emitted code changed; review and regenerate with "
                             f"`python tests/codegen/test_emit_golden.py`:\n{diff[:6000]}")


def test_emitted_code_compiles_and_shows_the_plan():
    src = emitted()
    compile(src, "rewritten.py", "exec")
    assert "class RewrittenModule(torch.nn.Module)" in src
    # column-parallel QKV keeps its output split over tp; row-parallel proj yields a partial sum reduced after
    assert "'S(0) R', 'S(0) S(2)'" in src or "'S(0) S(2)'" in src
    assert "P(sum)" in src


def test_fused_emit_replaces_the_golden_ops_by_kernel_calls():
    """`autopar emit --fuse` of the same plan: each LayerNorm and GELU of the golden is a runtime_kernels call."""
    src, golden = emitted(fuse=True), GOLDEN.read_text()
    compile(src, "rewritten_fused.py", "exec")
    n_norm, n_gelu = golden.count("torch.ops.aten.layer_norm.default("), golden.count("torch.ops.aten.gelu.default(")
    assert n_norm == 5 and n_gelu == 2
    assert src.count(" = autopar.runtime_kernels.layer_norm(") == n_norm
    assert src.count(" = autopar.runtime_kernels.bias_gelu(") == n_gelu
    assert "torch.ops.aten.layer_norm" not in src and "torch.ops.aten.gelu" not in src
    assert f"# Fused kernels (fuse_kernels pass): layer_norm x{n_norm}, bias_gelu x{n_gelu}" in src
    assert "import autopar.runtime_kernels" in src.splitlines()


if __name__ == "__main__":
    p = planned()
    p.to_json(GOLDEN_PLAN)
    GOLDEN.write_text(emitted(plan=p))
    print(f"wrote {GOLDEN_PLAN} and {GOLDEN}", file=sys.stderr)
