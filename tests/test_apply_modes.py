"""Applying a plan to a meta-device model, and the local-shard input mode."""
from apply_modes_check import local_input_mode, meta_model_materializes_shards


def test_meta_model_allocates_only_shards_and_runs_its_init(dist4):
    results = dist4.run(meta_model_materializes_shards)
    r = results[0]
    assert r["local_numel"] < r["global_numel"], "sharded parameters hold only their blocks"
    st = r["stats"]
    # the model's own initialization ran on the shards: normal(0, 0.02) weights, ones/zeros for norms
    assert abs(st["blocks.0.attn.qkv.weight"][0] - 0.02) < 0.005
    assert st["blocks.0.ln_1.weight"][1] == 1.0 and st["blocks.0.ln_1.bias"][1] == 0.0
    assert st["blocks.0.attn.qkv.weight"][2] == (96, 64)  # (3*64) / 2 rows on tp
    assert st["blocks.0.attn.qkv.weight"][3] == ["R", "S(0)"]
    assert all(x["grads_finite"] for x in results)
    assert len({round(x["loss"], 6) for x in results}) == 1, "every rank computes the same loss"
    # replicated parameters are identical on every rank; blocks of sharded ones are independent draws
    assert len({x["stats"]["wpe.weight"][:2] for x in results}) == 1
    qkv = {x["stats"]["blocks.0.attn.qkv.weight"][:2] for x in results}
    assert len(qkv) == 2, "the two tp blocks of the QKV weight differ; dp replicas agree"


def test_local_input_mode_matches_global(dist4):
    for r in dist4.run(local_input_mode):
        assert r["loss_diff"] < 1e-6 and r["grad_diff"] < 1e-6
        assert r["wrong_shape"] and "local shape" in r["wrong_shape"]


def test_plan_from_folded_capture_applies_to_every_block(dist2):
    from apply_modes_check import folded_plan_applies_to_full_model
    r = dist2.run(folded_plan_applies_to_full_model)[0]
    assert r["folded"] == {"blocks": 4}
    assert r["n_params"] == 2 + 4 * 12 + 2 + 1  # wte/wpe, 4 blocks x 12, ln_f, tied lm_head
    assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5


def test_float_input_gets_full_gradient(dist2):
    from apply_modes_check import float_input_gradient_is_full
    for r in dist2.run(float_input_gradient_is_full):
        assert r["batch_split"] == ("S(0)",)
        assert r["input_grad_diff"] < 1e-6


def test_constants_made_in_forward_are_graph_inputs(dist2):
    from apply_modes_check import lifted_constants
    r = dist2.run(lifted_constants)[0]
    assert r["constants"] == 2 and r["split"] == ("S(0)",), r
    assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, r
