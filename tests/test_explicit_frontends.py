"""Explicit front ends (autopar.frontend.explicit): DataParallel, TensorParallel 1D/2D/2.5D/3D, PipelineParallel,
convert_to_amp and ZeroOptimizer as plan constraints.

Per mode, on gloo against one device (tests/explicit_check.py): loss, every gradient and every parameter after
one AdamW step (built before the first forward, so rebinding is exercised). Per tensor-parallel mode, the
layout: each parameter's placements by its role (column / row linear, other) and the collectives per layer
of one step (``planned_collectives`` of the plan, grouped by kind and mesh dim, every block alike), which
must also be exactly what the runtime ran (every collective call recorded in the workers).
"""
from __future__ import annotations

import re
from collections import Counter

import pytest
from explicit_check import check_cases, tiny_llama

import autopar
from autopar.core.capture import capture
from autopar.core.graph import index_graph
from autopar.frontend import explicit as E
from autopar.solver.runtime_model import collective_counts, planned_collectives

N_LAYER = 2
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")
LINEARS = COLUMN + ROW


def _ok(res: dict) -> None:
    assert "error" not in res, res.get("error")
    bad = {k: v for k, v in res["errors"].items() if v > 0}
    assert not bad, f"differs from one device beyond tolerance: {sorted(bad.items())[:6]}"


def _gi():
    model, inputs = tiny_llama()
    return index_graph(capture(model, inputs, fold_layers=False))


def _per_layer(plan: autopar.Plan) -> Counter:
    """(phase, kind, mesh dim name, 'weight' | 'act') -> calls per block (the blocks' total / blocks), from the
    plan's collectives."""
    names = plan.mesh.dim_names
    c: Counter = Counter()
    for col in planned_collectives(plan, _gi()):
        if "blocks.*" not in col.what:
            continue
        what = "weight" if re.search(r"param:blocks\.\*\.\S+\.weight", col.what) else "act"
        c[(col.phase, col.kind, names[col.mesh_dim], what)] += 1
    assert all(n % N_LAYER == 0 for k, n in c.items() if k[3] == "weight"), c
    # a reshard is listed under its producer: block 0's input comes from the embedding (not counted here)
    return Counter({k: n / N_LAYER for k, n in c.items()})


def _same_as_runtime(plan: autopar.Plan, res: dict) -> None:
    want = sorted(collective_counts(planned_collectives(plan, _gi())).items())
    got = [(tuple(k), n) for k, n in res["calls"]]
    assert got == want, f"runtime ran other collectives than planned: {sorted(set(got) ^ set(want))}"


def _placements(plan: autopar.Plan, layer: int = 0) -> dict[str, tuple[str, ...]]:
    return {name: tuple(plan.param_placements[f"blocks.{layer}.{mod}.{name}.weight"])
            for mod, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                               ("mlp", ("gate_proj", "up_proj", "down_proj"))) for name in names}


def _outer(plan: autopar.Plan, norm: tuple[str, ...], embed: tuple[str, ...], head: tuple[str, ...]) -> None:
    """The parameters outside the linears of the blocks: every norm's weight, the embedding, the LM head."""
    for fqn, pl in plan.param_placements.items():
        if "norm" in fqn:
            assert pl == norm, (fqn, pl)
    assert plan.param_placements["embed.weight"] == embed and plan.param_placements["lm_head.weight"] == head


def _norm_stats(plan: autopar.Plan) -> Counter:
    """(phase, mesh dim name) -> the norms' statistics all-reduces (parallel_ops.sharded_norm) in one step."""
    names = plan.mesh.dim_names
    return Counter((c.phase, names[c.mesh_dim]) for c in planned_collectives(plan, _gi())
                   if c.what.startswith("norm statistics") and c.kind == "all_reduce")


# ----------------------------------------------------------------------------------------- 2 ranks

@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_data_parallel_amp_zero_and_pipeline_on_2(dist2):
    cases = [{"steps": [("dp", None)]},
             {"steps": [("dp", None), ("amp",)], "amp": True},
             {"steps": [("dp", None), ("zero", 1)], "record": False},
             {"steps": [("pp", 2)], "record": False}]
    dp, amp, zero, pp = zip(*dist2.run(check_cases, cases))
    for res in (*dp, *amp, *zero, *pp):
        _ok(res)
    # DataParallel: every parameter replicated, the batch split, gradients all-reduced in buckets only
    plan = autopar.Plan.from_json(dp[0]["plan"])
    assert plan.mesh.dim_names == ("dp",) and set(plan.param_placements.values()) == {("R",)}
    assert plan.node_shardings["input:idx"].outputs[0] == ("S(0)",)
    kinds = {(k[0], k[1]) for k, _ in dp[0]["calls"]}
    assert ("bwd", "all_reduce") in kinds and not any(p == "fwd" and k != "all_reduce" for p, k in kinds), kinds
    _same_as_runtime(plan, dp[0])
    # convert_to_amp: bf16 autocast, fp32 master weights; the bf16 path really ran (its loss is not fp32's)
    plan = autopar.Plan.from_json(amp[0]["plan"])
    assert plan.precision["compute_dtype"] == "bfloat16" and amp[0]["param_dtypes"] == ["torch.float32"]
    assert amp[0]["amp_vs_fp32"] > 1e-6
    # ZeroOptimizer: the user's AdamW became a ZeRO AdamW; the plan shards optimizer states over dp
    plan = autopar.Plan.from_json(zero[0]["plan"])
    assert zero[0]["opt_class"][:3] == ["ZeroAdamW", "ZeroOptimizer", "AdamW"]
    assert plan.optimizer_sharding and all(pl == ["S(0)"] or pl == ("S(0)",)
                                           for pl in plan.optimizer_sharding.values())
    # PipelineParallel: 2 stages, each rank holds and checks its stage's parameters, together all of them
    plan = autopar.Plan.from_json(pp[0]["plan"])
    assert len(plan.pipeline["stages"]) == 2
    assert sorted(pp[0]["checked_names"] + pp[1]["checked_names"]) == sorted(plan.param_placements)
    assert pp[0]["checked_names"] and pp[1]["checked_names"]


# ----------------------------------------------------------------------------------------- 4 ranks

@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_tensor_parallel_1d_2d_and_dp_x_tp_x_zero_on_4(dist4):
    cases = [{"steps": [("tp", "1D", None)]},
             {"steps": [("tp", "2D", None)]},
             {"steps": [("tp", "1D", 2), ("dp", None), ("zero", 1)], "record": False}]
    one, two, comp = zip(*dist4.run(check_cases, cases))
    for res in (*one, *two, *comp):
        _ok(res)
    # 1D (Megatron): column weights split on their output, row weights on their input; per layer one
    # all-reduce forward and one backward for attention and for the MLP, and no weight ever gathered
    plan = autopar.Plan.from_json(one[0]["plan"])
    assert plan.mesh.shape == (4,) and plan.mesh.dim_names == ("tp",)
    assert _placements(plan) == {**{n: ("S(0)",) for n in COLUMN}, **{n: ("S(1)",) for n in ROW}}
    assert _per_layer(plan) == {("fwd", "all_reduce", "tp", "act"): 2, ("bwd", "all_reduce", "tp", "act"): 2}
    assert plan.node_shardings["blocks.*/attn/scaled_dot_product_attention#0"].inputs[0] == ("S(1)",)  # heads
    # Megatron's vocab-parallel embedding (partial sums all-reduced into the stream) and LM head (logits split
    # on the vocabulary into the vocab-parallel cross-entropy); norms replicated on the replicated stream
    _outer(plan, norm=("R",), embed=("S(0)",), head=("S(0)",))
    assert plan.node_shardings["embed/embedding#0"].outputs[0] == ("P(sum)",)
    assert plan.node_shardings["root/cross_entropy_loss#0"].inputs[0] == ("S(1)",)
    assert not _norm_stats(plan)
    _same_as_runtime(plan, one[0])
    # 2D (SUMMA): weights split input over rows, output over columns; activations batch over rows, hidden over
    # columns; per layer each of the 7 weights gathered over rows (forward) and its gradient reduce-scattered
    # over rows (backward); activations gathered only over columns
    plan = autopar.Plan.from_json(two[0]["plan"])
    assert plan.mesh.shape == (2, 2) and plan.mesh.dim_names == ("tp_row", "tp_col")
    assert set(_placements(plan).values()) == {("S(1)", "S(0)")}
    assert plan.node_shardings["blocks.*/add#0"].outputs[0] == ("S(0)", "S(2)")
    # norms on the hidden-split stream (statistics all-reduced over columns, once forward, once backward per
    # norm: 2 per block + the final one), the embedding split on the hidden dim like the stream, the LM head
    # on the vocabulary over columns into the vocab-parallel cross-entropy
    _outer(plan, norm=("R", "S(0)"), embed=("R", "S(1)"), head=("R", "S(0)"))
    for key in ("blocks.*/attn_norm/rms_norm#0", "blocks.*/mlp_norm/rms_norm#0", "norm/rms_norm#0"):
        assert plan.node_shardings[key].inputs[0] == ("S(0)", "S(2)"), key
    assert plan.node_shardings["root/cross_entropy_loss#0"].inputs[0] == ("S(0)", "S(1)")
    assert _norm_stats(plan) == {("fwd", "tp_col"): 2 * N_LAYER + 1, ("bwd", "tp_col"): 2 * N_LAYER + 1}
    per = _per_layer(plan)
    assert per[("fwd", "all_gather", "tp_row", "weight")] == 7 and per[("bwd", "reduce_scatter", "tp_row",
                                                                      "weight")] == 7, per
    assert per[("fwd", "all_gather", "tp_col", "act")] >= 2, per
    assert per[("fwd", "all_reduce", "tp_col", "act")] == 2 == per[("bwd", "all_reduce", "tp_col", "act")], per
    assert not [k for k in per if k[3] == "act" and k[2] == "tp_row"], per   # rows carry only weights
    assert not [k for k in per if k[3] == "weight" and k[2] == "tp_col"], per
    _same_as_runtime(plan, two[0])
    # DataParallel x TensorParallel 1D x ZeroOptimizer on dp=2 x tp=2
    plan = autopar.Plan.from_json(comp[0]["plan"])
    assert plan.mesh.shape == (2, 2) and plan.mesh.dim_names == ("dp", "tp")
    assert _placements(plan) == {**{n: ("R", "S(0)") for n in COLUMN}, **{n: ("R", "S(1)") for n in ROW}}
    assert plan.node_shardings["input:idx"].outputs[0] == ("S(0)", "R")
    assert plan.optimizer_sharding and comp[0]["opt_class"][0] == "ZeroAdamW"
    q = plan.optimizer_sharding["blocks.0.attn.q_proj.weight"]
    assert q[0].startswith("S(") and q[1] == "S(0)", q   # states split over dp too, kept split over tp


# ----------------------------------------------------------------------------------------- 8 ranks

@pytest.mark.slow
def test_tensor_parallel_2p5d_and_3d_on_8(dist8):
    cases = [{"steps": [("tp", "2.5D", None)]}, {"steps": [("tp", "3D", None)]}]
    tess, cube = zip(*dist8.run(check_cases, cases, timeout=600))
    for res in (*tess, *cube):
        _ok(res)
    # 2.5D (Tesseract, 2 x 2 x depth 2): the 2D layout in each depth layer, batch split over depth too,
    # weights replicated over depth (their gradients all-reduced over it)
    plan = autopar.Plan.from_json(tess[0]["plan"])
    assert plan.mesh.shape == (2, 2, 2) and plan.mesh.dim_names == ("tp_dep", "tp_row", "tp_col")
    assert set(_placements(plan).values()) == {("R", "S(1)", "S(0)")}
    assert plan.node_shardings["blocks.*/add#0"].outputs[0] == ("S(0)", "S(0)", "S(2)")
    _outer(plan, norm=("R", "R", "S(0)"), embed=("R", "R", "S(1)"), head=("R", "R", "S(0)"))
    assert _norm_stats(plan) == {("fwd", "tp_col"): 2 * N_LAYER + 1, ("bwd", "tp_col"): 2 * N_LAYER + 1}
    per = _per_layer(plan)
    assert per[("fwd", "all_gather", "tp_row", "weight")] == 7, per
    assert per[("bwd", "reduce_scatter", "tp_row", "weight")] == 7, per
    assert per[("bwd", "all_reduce", "tp_dep", "weight")] == 7, per
    assert not [k for k in per if k[0] == "fwd" and k[2] == "tp_dep"], per   # depth: no forward traffic
    _same_as_runtime(plan, tess[0])
    # 3D (2 x 2 x 2): column and row weights with the contraction / output roles of tp_x and tp_y turned,
    # each further split over tp_z. Per linear: its input all-gathered over the gather dim, its weight over tp_z
    # (the weight gradient reduce-scattered back, never all-reduced), its output reduce-scattered over the
    # contraction dim into the next layer's layout -- except q/k/v, whose partial sums attention needs over the
    # whole sequence (all-reduced over tp_y)
    plan = autopar.Plan.from_json(cube[0]["plan"])
    assert plan.mesh.shape == (2, 2, 2) and plan.mesh.dim_names == ("tp_x", "tp_y", "tp_z")
    assert _placements(plan) == {**{n: ("S(0)", "S(1)", "S(0)") for n in COLUMN},
                                 **{n: ("S(1)", "S(0)", "S(0)") for n in ROW}}
    assert plan.node_shardings["blocks.*/add#0"].outputs[0] == ("S(1)", "S(2)", "S(0)")
    assert plan.node_shardings["blocks.*/attn.q_proj/linear#0"].outputs[0] == ("S(2)", "P(sum)", "S(0)")
    assert plan.node_shardings["blocks.*/attn.o_proj/linear#0"].outputs[0] == ("P(sum)", "S(2)", "S(0)")
    assert plan.node_shardings["blocks.*/mlp/mul#0"].outputs[0] == ("S(2)", "S(1)", "S(0)")
    _outer(plan, norm=("R", "S(0)", "R"), embed=("R", "S(1)", "R"), head=("S(0)", "S(0)", "R"))
    assert plan.node_shardings["lm_head/linear#0"].outputs[0] == ("S(2)", "S(2)", "S(0)")
    assert _norm_stats(plan) == {("fwd", "tp_y"): 2 * N_LAYER + 1, ("bwd", "tp_y"): 2 * N_LAYER + 1}
    per = _per_layer(plan)
    assert per[("fwd", "all_gather", "tp_z", "weight")] == 7 == per[("bwd", "reduce_scatter", "tp_z", "weight")]
    assert not [k for k in per if k[3] == "weight" and k[1] == "all_reduce"], per
    assert per[("fwd", "all_gather", "tp_x", "act")] == 2, per         # the norms' outputs into q/k/v, gate/up
    assert per[("fwd", "all_gather", "tp_y", "act")] == 1, per         # the MLP activation into down_proj
    assert per[("fwd", "reduce_scatter", "tp_x", "act")] == 2, per     # o_proj, down_proj
    assert per[("fwd", "reduce_scatter", "tp_y", "act")] == 2, per     # gate_proj, up_proj
    assert per[("fwd", "all_reduce", "tp_y", "act")] == 3 + 2, per     # q, k, v; the two norms' statistics
    _same_as_runtime(plan, cube[0])


# ------------------------------------------------------------------------------------- bad input

def test_bad_device_counts_sizes_and_conflicts():
    inputs = tiny_llama()[1]
    with pytest.raises(E.ExplicitParallelError, match="square"):
        E.TensorParallel(tiny_llama()[0], "2D", size=8)
    with pytest.raises(E.ExplicitParallelError, match="cube"):
        E.TensorParallel(tiny_llama()[0], "3D").mesh_layout(4)
    with pytest.raises(E.ExplicitParallelError, match="parallel_mode"):
        E.TensorParallel(tiny_llama()[0], "4D")
    with pytest.raises(E.ExplicitParallelError, match="heads"):   # 2 KV heads do not split over 4
        E.TensorParallel(tiny_llama(n_kv_head=2)[0], "1D").plan_options(tiny_llama()[1], 4)
    with pytest.raises(E.ExplicitParallelError, match="not divisible by 3"):   # 2D on 3 x 3: hidden 32
        E.TensorParallel(tiny_llama(batch=6)[0], "2D").plan_options(tiny_llama(batch=6)[1], 9)
    with pytest.raises(E.ExplicitParallelError, match="twice"):
        E.TensorParallel(E.TensorParallel(tiny_llama()[0], "1D"), "2D")
    with pytest.raises(E.ExplicitParallelError, match="twice"):
        E.DataParallel(E.DataParallel(tiny_llama()[0]))
    with pytest.raises(E.ExplicitParallelError, match="size="):   # both take the rest of the devices
        E.DataParallel(E.TensorParallel(tiny_llama()[0], "1D")).mesh_layout(4)
    with pytest.raises(E.ExplicitParallelError, match="conflict"):   # pipeline stages take no ZeRO yet
        m = E.PipelineParallel(tiny_llama()[0], 2)
        E.ZeroOptimizer(__import__("torch").optim.AdamW(m.parameters()), m)
        m.plan_options(inputs, 2)
    with pytest.raises(E.ExplicitParallelError, match="conflicts with stage"):
        m = E.DataParallel(tiny_llama()[0])
        opt = __import__("torch").optim.AdamW(m.parameters())
        E.ZeroOptimizer(opt, m, stage=1)
        E.ZeroOptimizer(opt, m, stage=2)
    with pytest.raises(E.ExplicitParallelError, match="pin tensors"):   # a user fix= on a key a front end pins
        E.TensorParallel(tiny_llama()[0], "1D").plan_options(inputs, 2, fix={"blocks.*.attn.q_proj.weight": ["R"]})
    with pytest.raises(E.ExplicitParallelError, match="not supported yet"):
        E.PipelineParallel(E.TensorParallel(tiny_llama()[0], "1D", size=2), 2).plan_options(inputs, 4)
    with pytest.raises(E.ExplicitParallelError, match="alone"):
        E.convert_to_amp(tiny_llama()[0])[0].mesh_layout(2)
    assert issubclass(E.ExplicitParallelError, autopar.AutoparError)


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_layouts_are_constraints_the_free_ilp_also_has():
    """Each mode only pins placements the strategy space holds: the free ILP given the same mesh could choose
    them (collect_keys keeps a strategy for every pinned key) and a mode's plan is never cheaper than what the
    free solver finds on the same mesh."""
    model, inputs = tiny_llama()
    for mode, n in (("1D", 4), ("2D", 4)):
        m = E.mode_constraints(model, mode, n)
        shape, names, opts = m.plan_options(inputs, n)
        pinned = autopar.plan(model, inputs, mesh_shape=shape, mesh_dim_names=names, cluster="cpu-gloo", options=opts)
        free = autopar.plan(model, inputs, mesh_shape=shape, mesh_dim_names=names, cluster="cpu-gloo")
        assert free.solver.objective <= pinned.solver.objective * (1 + 1e-6), (mode, free.solver, pinned.solver)


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_cli_plan_and_show_compare_list_every_mode_beside_the_free_plan(tmp_path, capsys):
    from autopar.tools.cli import main

    rc = main(["plan", "--model", "llama-tiny", "--batch", "8", "--seq", "32", "--mesh", "4", "--cluster", "cpu-gloo",
               "--out", str(tmp_path / "p.json"), "--compare"])
    out = capsys.readouterr().out
    assert rc == 0
    table = out.split("explicit modes beside the solver's plan", 1)[1]
    rows = {line.split()[0]: line for line in table.splitlines()[3:] if line.strip()}
    for mode in ("DP", "2D", "2.5D", "free"):
        assert re.search(r"\d+\.\d+x$", rows[mode]), rows[mode]
    assert rows["free"].endswith("1.00x") and "tp_row=2xtp_col=2" in rows["2D"]
    assert rows["1D"].split()[-1] == "n/a" and rows["3D"].split()[-1] == "n/a"
    assert "1D: TensorParallel 1D on 4 devices splits attention heads" in table   # llama-tiny has 2 KV heads
    assert "3D: 3D tensor parallelism needs a cube" in table
    # the same table from the saved plan: autopar show PLAN --compare --model SPEC (the solver is deterministic)
    rc = main(["show", str(tmp_path / "p.json"), "--compare", "--model", "llama-tiny"])
    shown = capsys.readouterr().out
    assert rc == 0 and shown.split("explicit modes beside the solver's plan", 1)[1] == table
    assert main(["show", str(tmp_path / "p.json"), "--compare"]) == 1 and "give --model" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "p.json"), "--compare", "--model", "gpt-tiny"]) == 1
    assert "not the model the plan was made for" in capsys.readouterr().err


def test_column_and_row_linears_are_read_from_the_graph():
    """GPT (fused QKV, GELU MLP) and LLaMA (separate q/k/v, SwiGLU): column linears feed another linear, row
    linears return to the residual stream; the stream is what the norms read."""
    from autopar.frontend.planning import capture_exact
    from autopar.models import build_model

    for spec, column, row, stream in (
            ("gpt-tiny", {"attn.qkv", "mlp.fc"}, {"attn.proj", "mlp.proj"}, {"drop/dropout#0", "blocks.*/add#0",
                                                                             "blocks.*/add#1"}),
            ("llama-tiny", {"attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"},
             {"attn.o_proj", "mlp.down_proj"}, {"embed/embedding#0", "blocks.*/add#0", "blocks.*/add#1"})):
        model, inputs = build_model(spec, batch=2, seq=8, device="meta")
        roles = E.block_roles(index_graph(capture_exact(model, inputs)))
        name = lambda key: key.split("/")[1]
        assert {name(k) for k in roles.column} == column and {name(k) for k in roles.row} == row, spec
        assert roles.stream == stream, (spec, roles.stream)
