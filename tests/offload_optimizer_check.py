"""Worker function (module level, run in the gloo pools) for the offload check.

``tight_plan`` plans a model for the h100-sxm preset at just above (0.1 %) its smallest feasible
budget, where the ILP moves activations and the optimizer to the host (on cpu-gloo, where the host is
the device, it never offers that); the test process solves it (not rank 0, whose peer would spin in
gloo meanwhile) and ``check_host_optimizer`` applies the JSON on the CPU ranks, takes the optimizer the
plan asks for (``autopar.runtime.host_optimizer.make_optimizer``) and runs one measured AdamW step against
the single-device model.
"""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.runtime import memory
from autopar.models import build_model
from autopar.runtime.host_optimizer import HostOptimizer, make_optimizer
from autopar.core.plan import Plan
from memory_check import _err, _full


def tight_plan(spec: str, mesh_shape: tuple[int, ...], batch: int, seq: int) -> str:
    model, inputs = build_model(spec, batch=batch, seq=seq, device="meta")

    def at(budget):
        return autopar.plan(model, inputs, mesh_shape=mesh_shape, cluster="h100-sxm", memory_budget=budget)
    try:
        at(1)
    except autopar.InfeasiblePlanError as e:
        return at(int(e.min_feasible_bytes * 1.001) + 1).to_json()
    raise AssertionError("a 1-byte budget cannot be feasible")


def check_host_optimizer(rank: int, world: int, spec: str, plan_json: str, batch: int, seq: int) -> dict:
    torch.manual_seed(0)
    model, inputs = build_model(spec, batch=batch, seq=seq, device="cpu")
    plan = Plan.from_json(plan_json)
    mesh = init_device_mesh("cpu", plan.mesh.shape)
    ref = copy.deepcopy(model)
    ref(**inputs).backward()
    torch.optim.AdamW(ref.parameters(), lr=1e-3).step()
    ref_params = dict(ref.named_parameters())
    pm = autopar.apply(copy.deepcopy(model), plan, mesh)
    opt = make_optimizer(pm, torch.optim.AdamW, lr=1e-3)
    with memory.track(pm, opt) as t:
        pm(**inputs).backward()
        opt.step()
    locals_ = {id(getattr(p, "_local_tensor", p).untyped_storage()) for p in pm.parameters()}
    states = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return {"is_host_optimizer": isinstance(opt, HostOptimizer), "offload": plan.offload,
            "checkpoint": plan.checkpoint, "regions": [n for n, _ in pm.graph_module.named_children()],
            "errors": {n: _err(_full(p.detach()), ref_params[n]) for n, p in pm.named_parameters()},
            "state_devices": sorted({str(v.device) for v in states}),
            "num_states": len(states),
            "states_share_param_storage": any(id(v.untyped_storage()) in locals_ for v in states),
            "memory": t.report.to_dict(),
            "local_param_bytes": sum(getattr(p, "_local_tensor", p).nbytes for p in pm.parameters()),
            "num_params": len(list(pm.parameters()))}
