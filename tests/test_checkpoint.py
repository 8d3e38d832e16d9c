"""autopar.save / autopar.load: resharding across plans and world sizes, resume after a kill, safety.

Worker functions are in tests/checkpoint_check.py. gpt-tiny, batch 4 x 16, AdamW.
"""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from torch import nn

import autopar
from autopar.core.errors import ConfigError, PlanMismatchError
from autopar.models import build_model
from checkpoint_check import load_state, resume, save_state, train
from dist_utils import WorkerError, run_distributed
from fuzz_check import make_case


def _plan(mesh, names=None, **fix):
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="meta")
    return autopar.plan(model, inputs, mesh_shape=mesh, mesh_dim_names=names, cluster="cpu-gloo", fix=fix or None)


def _assert_same_state(saved: dict, loaded: dict) -> None:
    assert set(saved["params"]) == set(loaded["params"])
    for name in saved["params"]:
        assert torch.equal(saved["params"][name], loaded["params"][name]), f"parameter {name} changed"
        assert torch.equal(saved["exp_avg"][name], loaded["exp_avg"][name]), f"AdamW exp_avg of {name} changed"
    assert loaded["loss"] == pytest.approx(saved["loss"], rel=1e-4, abs=1e-5)
    assert loaded["extra"] == {"step": 2}


def test_dpxtp_on_4_ranks_loads_into_tp_on_2_ranks(dist4, dist2, tmp_path):
    dpxtp = _plan((2, 2), ("dp", "tp"), **{"input:*": ["S(0)", "R"], "param:*qkv.weight": ["R", "S(0)"]})
    tp = _plan((2,), ("tp",), **{"input:*": ["R"], "param:*qkv.weight": ["S(0)"], "param:*mlp.fc.weight": ["S(0)"]})
    path = str(tmp_path / "ckpt")
    saved = dist4.run(save_state, dpxtp.to_json(), path)
    loaded = dist2.run(load_state, tp.to_json(), path)
    for r in loaded:
        _assert_same_state(saved[0], r)
        assert r["saved_plan_mesh"] == [2, 2]
    name = "blocks.0.attn.qkv.weight"
    assert saved[0]["placements"][name] != loaded[0]["placements"][name]  # really resharded
    meta = json.loads((tmp_path / "ckpt" / "autopar.json").read_text())
    assert meta["world_size"] == 4 and meta["plan"]["mesh"]["dim_names"] == ["dp", "tp"]


def test_another_sharding_on_the_same_ranks(dist2, tmp_path):
    a, b = make_case(0)[1], make_case(4)[1]     # two random gpt-tiny plans on (2,)
    assert json.loads(a)["param_placements"] != json.loads(b)["param_placements"]
    path = str(tmp_path / "ckpt")
    saved = dist2.run(save_state, a, path)
    loaded = dist2.run(load_state, b, path)
    _assert_same_state(saved[0], loaded[0])
    assert saved[0]["placements"] != loaded[0]["placements"]


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_resume_after_a_kill_repeats_the_losses(dist2, tmp_path):
    """Train 4 steps; separately train, save after step 2, die (SIGKILL) mid-step 3, resume in fresh
    processes: steps 3-4 give the same losses (data come from the restored RNG)."""
    plan = make_case(0)[1]
    path = str(tmp_path / "ckpt")
    ref = dist2.run(train, plan, 4)[0]
    with pytest.raises(WorkerError, match="exited with code -9"):
        run_distributed(train, 2, plan, 4, path, 2, True, timeout=300)
    out = dist2.run(resume, plan, 4, path)
    for r in out:
        assert r["extra"] == {"step": 2, "note": "between steps"}
        assert r["losses"] == ref[2:], f"resumed {r['losses']} vs uninterrupted {ref[2:]}"
    assert len(set(ref)) == 4  # the check can fail: every step's loss differs


# ------------------------------------------------------------------------ in one process, no ranks

@pytest.fixture()
def plain_ckpt(tmp_path):
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    autopar.save(tmp_path / "c", m, opt, step=1, tag="x")
    return tmp_path / "c", m, opt


def test_plain_module_round_trip(plain_ckpt):
    path, m, opt = plain_ckpt
    m2 = nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(m2.parameters())
    assert autopar.load(path, m2, opt2) == {"step": 1, "tag": "x"}
    assert torch.equal(m.weight, m2.weight)
    assert torch.equal(opt.state[m.weight]["exp_avg"], opt2.state[m2.weight]["exp_avg"])
    assert json.loads((path / "autopar.json").read_text())["plan"] is None


def test_checkpoint_loading_never_runs_code(plain_ckpt, tmp_path):
    """DCP's .metadata is a pickle: one that names anything but DCP's metadata classes is refused."""
    path, m, _ = plain_ckpt
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ConfigError, match="refers to posix.mkdir.*refusing to load"):
        autopar.load(path, m)
    assert not marker.exists()


def test_extras_must_be_json(tmp_path):
    with pytest.raises(ConfigError, match="extras must be JSON data"):
        autopar.save(tmp_path / "c", nn.Linear(2, 2), step=torch.tensor(1))


def test_checkpoint_of_another_model(plain_ckpt):
    with pytest.raises(PlanMismatchError, match=r"'weight' has shape \[3, 4\] there but \[5, 4\]"):
        autopar.load(plain_ckpt[0], nn.Linear(4, 5))


def test_asynchronous_save_writes_the_state_of_the_moment_it_was_called(tmp_path):
    """autopar.save(asynchronous=True) copies the state before returning: a step taken while the background
    writer runs does not reach the checkpoint; before wait() the checkpoint is not complete (load refuses it)."""
    torch.manual_seed(0)
    m = nn.Linear(8, 8)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 8)).sum().backward()
    opt.step()
    want = {k: v.clone() for k, v in m.state_dict().items()}
    pending = autopar.save(tmp_path / "ck", m, opt, asynchronous=True, step=7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(100.0)                       # the next step, while the state is written
    assert pending is not None and not (tmp_path / "ck" / "autopar.json").exists()
    pending.wait()
    m2 = nn.Linear(8, 8)
    opt2 = torch.optim.AdamW(m2.parameters())
    assert autopar.load(tmp_path / "ck", m2, opt2) == {"step": 7}
    assert all(torch.equal(want[k], v) for k, v in m2.state_dict().items())
    assert opt2.state_dict()["state"][0]["step"] == 1
