"""The zoo check run on gloo ranks (module level: the pools import it by name): a plan applied to a zoo
model matches one device -- the loss, every parameter gradient, and the parameters after one AdamW step
driven by an LR scheduler (LambdaLR), with the optimizer the plan needs (``autopar.make_optimizer``); with
``measure_memory`` the peak of a second step measured by ``autopar.memory`` (torch's MemTracker)."""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh

import autopar
from zoo.models import build

RTOL, ATOL = 1e-4, 1e-5


def _excess(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float(((a - b).abs() - (ATOL + RTOL * b.abs())).max()) if a.numel() else -1.0


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def check_zoo_step(rank: int, world: int, name: str, kind: str, mesh_shape: tuple[int, ...], plan_json: str,
                   measure_memory: bool = False) -> dict:
    model, inputs = build(name, kind)
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "tp")[: len(mesh_shape)])
    pm = autopar.parallelize(model, mesh, inputs, plan=autopar.Plan.from_json(plan_json))
    loss, ref_loss = _loss(pm(**inputs)), _loss(ref(**inputs))
    errors = {"loss": _excess(loss, ref_loss)}
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    missing = []
    for n, p in pm.named_parameters():
        r = ref_params[n].grad
        if r is None:
            continue
        if p.grad is None:
            missing.append(n)
        else:
            errors[f"grad:{n}"] = _excess(_full(p.grad), r)
    # eps 1e-6: Adam's first step divides by |g| + eps, which magnifies rounding in tiny gradients (see
    # parallel_check.check_hf_training_step)
    opt = autopar.make_optimizer(pm, torch.optim.AdamW, lr=1e-3, eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: 0.5)
    opt.step()
    sched.step()
    ref_opt.step()
    ref_sched.step()
    for n, p in pm.named_parameters():
        errors[f"param:{n}"] = _excess(_full(p.detach()), ref_params[n].detach())
    bad = {k: v for k, v in errors.items() if v > 0}
    out = {"missing_grads": missing, "bad": dict(sorted(bad.items(), key=lambda kv: -kv[1])[:5]),
           "checked": len(errors), "optimizer": type(opt).__name__}
    if measure_memory:   # a second, steady-state step (optimizer states live) under torch's MemTracker
        opt.zero_grad(set_to_none=True)
        with autopar.memory.track(pm, opt) as t:
            _loss(pm(**inputs)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out["measured_peak_bytes"] = t.peak_bytes
        out["measured_breakdown"] = t.breakdown
    return out
