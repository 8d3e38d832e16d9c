"""Norms over a split hidden dim (solver.strategies.norm, parallel_ops.sharded_norm): the strategy the
multi-dimensional tensor-parallel layouts put their norms in, which the free ILP may choose too.

On gloo against one device: loss, every gradient and every parameter after one AdamW step, for layer_norm
with bias (GPT) on (2,) and rms_norm (LLaMA) on (2, 2) with the hidden split over one mesh dim and over both
(nested); the collectives the runtime ran are exactly the plan's (statistics all-reduced once forward and once
backward per hidden-splitting mesh dim, each of this rank's rows' statistics).
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from explicit_check import _err
from fuzz_check import _mesh, build_inputs_for
from runtime_model_check import recording

import autopar
from autopar.core.capture import capture
from autopar.core.graph import index_graph
from autopar.solver.runtime_model import collective_counts, planned_collectives

BATCH, SEQ = 4, 8


def _plan(spec: str, mesh_shape: tuple[int, ...], norm: list[str]) -> autopar.Plan:
    model, inputs = build_inputs_for(spec, BATCH, SEQ)
    fix = {"*layer_norm#0" if spec.startswith("gpt") else "*rms_norm#0": norm}
    return autopar.plan(model, inputs, mesh_shape=mesh_shape, cluster="cpu-gloo", fix=fix, fold_layers=False)


def norm_worker(rank: int, world: int, cases: list[tuple[str, str]]) -> list[dict]:
    out = []
    for spec, plan_json in cases:
        model, inputs = build_inputs_for(spec, BATCH, SEQ)
        ref = copy.deepcopy(model)
        plan = autopar.Plan.from_json(plan_json)
        mesh = _mesh(tuple(plan.mesh.shape))
        pm = autopar.apply(model, plan, mesh)
        with recording(mesh) as rec:
            rec.phase = "fwd"
            loss = pm(**inputs)
            rec.phase = "bwd"
            loss.backward()
        ref_loss = ref(**inputs)
        ref_loss.backward()
        errors = {"loss": _err(loss, ref_loss)}
        refp = dict(ref.named_parameters())
        for name, p in pm.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            errors[f"grad:{name}"] = _err(g, refp[name].grad)
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-3, eps=1e-6)
        opt.step()
        torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6).step()
        for name, p in pm.named_parameters():
            full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
            errors[f"param:{name}"] = _err(full, refp[name].detach())
        out.append({"errors": errors, "calls": sorted(Counter(rec.calls).items()), "n_params": len(refp)})
    return out


def _check(plan: autopar.Plan, spec: str, res: dict) -> None:
    bad = {k: v for k, v in res["errors"].items() if v > 0}
    assert not bad, f"{spec}: differs from one device beyond tolerance: {sorted(bad.items())[:6]}"
    assert sum(k.startswith("grad:") for k in res["errors"]) == res["n_params"]
    model, inputs = build_inputs_for(spec, BATCH, SEQ)
    cols = planned_collectives(plan, index_graph(capture(model, inputs, fold_layers=False)))
    want = sorted(collective_counts(cols).items())
    got = [(tuple(k), n) for k, n in res["calls"]]
    assert got == want, f"{spec}: runtime ran other collectives than planned: {sorted(set(got) ^ set(want))}"
    return cols


def _stats(cols) -> Counter:
    return Counter((c.phase, c.mesh_dim) for c in cols if c.what.startswith("norm statistics"))


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_layer_norm_hidden_split_on_2(dist2):
    plan = _plan("gpt-tiny", (2,), ["S(2)"])
    ln = [k for k in plan.node_shardings if k.endswith("layer_norm#0")]
    assert len(ln) == 3 and all(plan.node_shardings[k].inputs[0] == ("S(2)",) for k in ln), ln   # 2 per block, final
    assert plan.param_placements["blocks.0.ln_1.bias"] == ("S(0)",) == plan.param_placements["ln_f.weight"]
    (res,) = dist2.run(norm_worker, [("gpt-tiny", plan.to_json())])[0]
    cols = _check(plan, "gpt-tiny", res)
    assert _stats(cols) == {("fwd", 0): 5, ("bwd", 0): 5}   # 2 norms per block x 2 blocks + the final norm


@pytest.mark.slow
def test_rms_norm_hidden_split_over_one_and_two_mesh_dims_on_2x2(dist4):
    one = _plan("llama-tiny", (2, 2), ["S(0)", "S(2)"])
    both = _plan("llama-tiny", (2, 2), ["S(2)", "S(2)"])
    assert one.param_placements["norm.weight"] == ("R", "S(0)") and both.param_placements["norm.weight"] == (
        "S(0)", "S(0)")
    res1, res2 = dist4.run(norm_worker, [("llama-tiny", one.to_json()), ("llama-tiny", both.to_json())])[0]
    assert _stats(_check(one, "llama-tiny", res1)) == {("fwd", 1): 5, ("bwd", 1): 5}
    assert _stats(_check(both, "llama-tiny", res2)) == {("fwd", 0): 5, ("bwd", 0): 5, ("fwd", 1): 5, ("bwd", 1): 5}


def test_the_free_ilp_has_the_hidden_split_norm_priced_with_its_statistics():
    """On 1-D / 2-D meshes the strategy is in the space of every norm (not only where a mode pins it), and its
    statistics' all-reduces are priced into the op (compute plus one all-reduce of the rows' sums per direction);
    on 3-D meshes only where pinned."""
    from autopar.cluster.profile import load_cluster
    from autopar.core.mesh import MeshSpec
    from autopar.core.placement import Replicate, Shard
    from autopar.frontend.planning import capture_exact
    from autopar.solver import cost as C
    from autopar.solver.keys import collect_keys

    model, inputs = build_inputs_for("llama-tiny", BATCH, SEQ)
    gi = index_graph(capture_exact(model, inputs))
    mesh, profile = MeshSpec.make((4,), ("tp",)), load_cluster("cpu-gloo")
    keys = collect_keys(gi, mesh, profile)
    info = keys["norm/rms_norm#0"]
    split = [i for i, s in enumerate(info.strategies) if s.inputs[0][0] == s.outputs[0][0] == Shard(2)]
    assert len(split) == 1 and info.strategies[split[0]].inputs[1][0] == Shard(0)
    bare = C.compute_cost(info.node, info.strategies[split[0]], info.in_metas, profile, (4,))
    priced = info.compute[split[0]]
    link = profile.dim_links(mesh)[0]
    rows = BATCH * SEQ
    want = C.collective_time("all_reduce", rows * 4, 4, link)
    assert priced.fwd_s == pytest.approx(bare.fwd_s + want) and priced.bwd_s == pytest.approx(bare.bwd_s + want)
    R = Replicate()
    # on a 3-D mesh the free ILP does not get it (its size), a layout that pins the norm does
    cube = MeshSpec.make((2, 2, 2), ("x", "y", "z"))
    hidden = lambda info: [s for s in info.strategies if Shard(2) in s.inputs[0]]
    assert not hidden(collect_keys(gi, cube, profile)["norm/rms_norm#0"])
    pinned = collect_keys(gi, cube, profile, fix={"norm/rms_norm#0": ["R", "S(2)", "R"]})["norm/rms_norm#0"]
    assert hidden(pinned) and all(s.outputs[0] == (R, Shard(2), R) for s in pinned.strategies)
