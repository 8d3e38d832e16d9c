"""Worker (module level, run in the gloo pools): a flat (non-pipelined) plan solved with ``precision="bf16"`` on
``cpu-gloo``, applied and run under the plan's autocast, against one device under ``torch.autocast("cpu",
torch.bfloat16)`` with the same float32 parameters (loss, every gradient, the parameters after one AdamW step),
then a second step measured with ``autopar.memory`` (optimizer states live, as in steady state) for the peak the
plan predicted."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.core.plan import Plan
from autopar.models import build_model
from autopar.runtime import memory


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().float(), b.detach().float()
    d = (a - b).abs()
    return float(d.max()), float((d / (b.abs() + 1e-3)).max())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_bf16_plan(rank: int, world: int, spec: str, n_layer: int = 4, batch: int = 16, seq: int = 64) -> dict:
    torch.manual_seed(0)
    model, inputs = build_model(spec, batch=batch, seq=seq, device="cpu", n_layer=n_layer)
    text = [None]
    if rank == 0:
        text = [autopar.plan(model, inputs, mesh_shape=(world,), cluster="cpu-gloo", precision="bf16",
                             fix={"input:*": ["S(0)"]}, recompute="none", zero=0).to_json()]
    dist.broadcast_object_list(text, src=0)
    plan = Plan.from_json(text[0])
    ref = copy.deepcopy(model)
    pm = autopar.apply(copy.deepcopy(model), plan, init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    out: dict = {"diffs": {}, "precision": plan.precision,
                 "fp32_state": all(p.dtype == torch.float32 for p in pm.parameters())}
    loss = pm(**inputs)    # the parallel module runs under the plan's autocast by itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = ref(**inputs)
    with torch.no_grad():
        out["fp32_loss"] = float(copy.deepcopy(model)(**inputs))
    loss.backward()
    ref_loss.backward()
    out["loss"] = (float(loss), float(ref_loss))
    out["diffs"]["loss"] = _diff(loss, ref_loss)
    refp = dict(ref.named_parameters())
    for name, p in pm.named_parameters():
        out["diffs"][f"grad:{name}"] = _diff(_full(p.grad), refp[name].grad)
        out["fp32_state"] = out["fp32_state"] and p.grad.dtype == torch.float32
    opt.step()
    ref_opt.step()
    moved = total = 0
    for name, p in pm.named_parameters():
        a, b = _full(p.detach()), refp[name].detach()
        moved += int(((a - b).abs() > 1e-4).sum())
        total += a.numel()
    out["frac"] = moved / total
    out["num_params"] = len(refp)
    opt.zero_grad(set_to_none=True)
    with memory.track(pm, opt) as t:      # a steady-state step: AdamW's states exist
        pm(**inputs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["measured_peak"] = t.report.to_dict()["peak_bytes"]
    out["predicted_peak"] = plan.predicted.peak_memory_bytes
    return out
