"""autopar.runtime.host_optimizer: optimizer states, fp32 masters and the step on the host (ZeRO-Offload style).

On this CPU-only machine the host is the device, so these check semantics and accounting: the
parameters after AdamW steps equal those of a device AdamW, the states live in host tensors apart
from the parameters, and autopar.memory counts them as host, not optimizer (device) bytes.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import autopar
from autopar.runtime import memory
from autopar.core.errors import ConfigError
from autopar.runtime.host_optimizer import HostOptimizer, make_optimizer
from offload_optimizer_check import check_host_optimizer, tight_plan


def _mlp() -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return m, (8 * 16 + 16 + 16 * 4 + 4) * 4


def test_steps_match_a_device_optimizer_and_states_are_host_bytes():
    m, nbytes = _mlp()
    ref = copy.deepcopy(m)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = HostOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    x = torch.randn(5, 8)
    for step in range(3):
        ref(x).square().sum().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        with memory.track(m, opt) as t:
            m(x).square().sum().backward()
            opt.step()
        opt.zero_grad()
        for (n, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=f"step {step} {n}")
    final = t.report.final
    n_params = len(list(m.parameters()))
    assert final["optimizer"] == 0 and final["params"] == nbytes
    # host: fp32 masters, their gradient copies, exp_avg and exp_avg_sq, one fp32 step counter each
    assert final["host"] == 4 * nbytes + 4 * n_params
    assert t.peak_bytes < 4 * nbytes   # device: params + grads + activations, never the states
    states = [v for st in opt.state.values() for v in st.values()]
    assert len(states) == 3 * n_params and all(v.device.type == "cpu" for v in states)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    assert not any(h.untyped_storage().data_ptr() in params for h in opt.host_tensors())


def test_state_dict_round_trips_into_a_device_optimizer():
    m, _ = _mlp()
    opt = HostOptimizer(m.parameters(), torch.optim.AdamW, lr=1e-2)
    m(torch.randn(2, 8)).sum().backward()
    opt.step()
    dev = torch.optim.AdamW(copy.deepcopy(m).parameters(), lr=1e-2)
    dev.load_state_dict(opt.state_dict())
    assert dev.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert opt.param_groups[0]["lr"] == 1e-2


def test_make_optimizer_follows_the_plan():
    m, _ = _mlp()
    assert type(make_optimizer(m, torch.optim.SGD, lr=0.1)) is torch.optim.SGD
    m.plan = dataclasses.make_dataclass("P", [("optimizer_offload", bool)])(True)
    opt = make_optimizer(m, torch.optim.SGD, lr=0.1)
    assert isinstance(opt, HostOptimizer) and isinstance(opt.optimizer, torch.optim.SGD)


def test_bad_inputs_say_what_to_do():
    m, _ = _mlp()
    with pytest.raises(ConfigError, match="torch.optim.Optimizer class"):
        HostOptimizer(m.parameters(), "adamw")
    with pytest.raises(ConfigError, match="empty parameter list"):
        HostOptimizer([], torch.optim.AdamW)
    with pytest.raises(ConfigError, match="closure"):
        HostOptimizer(m.parameters()).step(lambda: 0.0)


def test_ilp_chosen_offload_runs_on_two_ranks(dist2):
    """End to end: the ILP's offload decisions (h100-sxm, tightest budget) applied on 2 gloo ranks."""
    plan_json = tight_plan("gpt-tiny", (2,), 8, 32)
    results = dist2.run(check_host_optimizer, "gpt-tiny", plan_json, 8, 32)
    for rank, r in enumerate(results):
        assert r["is_host_optimizer"] and r["offload"], r["offload"]
        assert any(n.startswith("offload") for n in r["regions"]), r["regions"]
        bad = {n: e for n, e in r["errors"].items() if e > 0}
        assert not bad, f"rank {rank}: parameters after one step differ from one device: {bad}"
        assert r["state_devices"] == ["cpu"] and r["num_states"] == 3 * r["num_params"]
        assert not r["states_share_param_storage"]
        mem = r["memory"]
        assert mem["final"]["optimizer"] == 0
        # host: masters + gradient copies + two AdamW states (this rank's shards) + step counters
        assert mem["final"]["host"] == 4 * r["local_param_bytes"] + 4 * r["num_params"]


def test_checkpoint_refuses_a_host_optimizer_with_the_fix(tmp_path):
    m, _ = _mlp()
    with pytest.raises(ConfigError, match="optimizer=None and keep optimizer.state_dict"):
        autopar.save(tmp_path / "ckpt", m, HostOptimizer(m.parameters()))


def test_host_optimizer_is_a_torch_optimizer_schedulers_drive():
    """LR schedulers refuse anything that is not a torch.optim.Optimizer; the host optimizer is one, and the
    scheduler's learning rate reaches the inner (host) optimizer's step."""
    m, _ = _mlp()
    opt = HostOptimizer(m.parameters(), torch.optim.SGD, lr=1.0)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.25)
    assert opt.optimizer.param_groups[0]["lr"] == 0.25
    p = next(m.parameters())
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    torch.testing.assert_close(p.detach(), before - 0.25)
