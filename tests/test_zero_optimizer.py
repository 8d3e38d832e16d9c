"""ZeRO with a user's ordinary training code: param.grad, clip_grad_norm_, LR schedulers, MemTracker, checkpoints.

One run of ``zero_optimizer_check.check_zero_optimizer`` per plan in the shared 2-rank pool (gpt-tiny,
batch 4 x 16, data parallel on (2,) with ZeRO-2: every parameter replicated, its gradient and optimizer
state sharded; the plan is forced with ``fix`` and solved here, not on rank 0); each test reads its part.
Every value is compared with the single-device model at fp32 rtol 1e-4 / atol 1e-5.
"""
from __future__ import annotations

import pytest
from zero_optimizer_check import check_zero_optimizer

import autopar
from autopar.core.placement import parse_sharding
from autopar.models import build_model

DP = {"input:*": ["S(0)"], "param:*": ["R"]}


def _bad(errors: dict) -> dict:
    return {k: v for k, v in errors.items() if not v <= 0}


def _part(r: dict, name: str) -> dict:
    assert "exception" not in r[name], r[name]["exception"]
    return r[name]


@pytest.fixture(scope="module")
def zero2(dist2, tmp_path_factory):
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="meta")
    plan = autopar.plan(model, inputs, mesh_shape=(2,), fix=DP, cluster="cpu-gloo", zero=2)
    assert plan.gradient_sharding, "the fixture needs a ZeRO-2 plan"
    path = str(tmp_path_factory.mktemp("zero2") / "ckpt")
    return dist2.run(check_zero_optimizer, "gpt-tiny", plan.to_json(), path, timeout=600)


def test_every_parameter_has_its_gradient_after_two_accumulated_backwards(zero2):
    for rank, r in enumerate(zero2):
        g = _part(r, "grads_and_clip")["grads"]
        assert g["missing"] == {0: [], 1: []}, f"rank {rank}: parameters without param.grad: {g['missing']}"
        assert not _bad(g["errors"]), f"rank {rank}: param.grad differs from one device: {_bad(g['errors'])}"
        assert len(g["errors"]) == 2 * len(g["layout"])
        for name, sharding in r["gradient_sharding"].items():   # ZeRO-2 keeps only this rank's shard
            lay = g["layout"].get(name)
            if lay is None:          # a tied name: named_parameters lists the parameter once
                continue
            assert lay["type"] == "DTensor" and lay["placements"] == [str(q) for q in parse_sharding(sharding)], \
                (name, lay)
            assert lay["shape"] == lay["param_shape"], (name, lay)
            assert lay["local_numel"] * 2 == lay["param_local_numel"], (name, lay)


def test_clip_grad_norm_over_module_parameters_matches_one_device(zero2):
    for rank, r in enumerate(zero2):
        c = _part(r, "grads_and_clip")["clip"]
        assert c["norm"] > 0.5, "the check must clip"
        assert not _bad(c["errors"]), f"rank {rank}: {_bad(c['errors'])} (norm {c['norm']} vs {c['ref_norm']})"


def test_the_optimizer_is_a_torch_optimizer_that_lr_schedulers_drive(zero2):
    for rank, r in enumerate(zero2):
        s = _part(r, "sched")
        assert s["is_optimizer"] and s["is_adamw"], s["type"]
        assert s["lrs"][0] == pytest.approx(1e-2) and s["lrs"][1] == pytest.approx(5e-3), s["lrs"]
        assert s["lrs"][2] != s["lrs"][1] and s["lr_after"] != s["lrs"][2], s["lrs"]
        assert not _bad(s["errors"]), f"rank {rank}: {_bad(s['errors'])}"


def test_memtracker_tracks_the_optimizer_and_its_sharded_states(zero2):
    for rank, r in enumerate(zero2):
        m = _part(r, "memtracker")
        assert m["accepted"], m["error"]
        assert m["state_placements"] == ["(Shard(dim=0),)"], m["state_placements"]
        assert m["opt_bytes"] == m["local_state_bytes"] > 0, m


def test_save_then_load_resumes_like_an_uninterrupted_run(zero2):
    for rank, r in enumerate(zero2):
        c = _part(r, "ckpt")
        assert c["extra"] == {"step": 1}
        assert c["state_steps"] == [2.0], c["state_steps"]
        assert not _bad(c["errors"]), f"rank {rank}: {_bad(c['errors'])}"


def test_a_plain_optimizer_over_zero_parameters_is_right_but_warned_about(zero2):
    for rank, r in enumerate(zero2):
        p = _part(r, "plain")
        assert any("autopar.zero.optimizer(module, AdamW" in w for w in p["warnings"]), p["warnings"]
        assert not _bad(p["errors"]), f"rank {rank}: {_bad(p['errors'])}"
