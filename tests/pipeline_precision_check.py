"""Worker (module level, run in the gloo pools): a pipelined plan with ``precision="bf16"`` against one device
under ``torch.autocast("cpu", torch.bfloat16)`` with the same float32 parameters: loss, every gradient of this
rank's stages and the parameters after one AdamW step. Returns the largest absolute and relative differences
(the test holds them to autocast tolerances)."""
from __future__ import annotations

import copy

import torch
from pipeline_check import _full, build
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.cluster.profile import load_cluster
from autopar.core.mesh import MeshSpec
from autopar.frontend.pipeline import plan_pipeline

BF16 = {"param_dtype": "float32", "compute_dtype": "bfloat16", "loss_scaling": "none"}


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.detach().float(), b.detach().float()
    d = (a - b).abs()
    return float(d.max()), float((d / (b.abs() + 1e-3)).max())


def check_bf16_pipeline(rank: int, world: int, spec: str, pipeline: dict, batch: int = 4, seq: int = 8) -> dict:
    torch.manual_seed(0)
    model, inputs = build(spec, batch, seq)
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    # the pipeline planner with precision= (autopar.plan's PlanOptions still refuses it for pipelines: see the report)
    profile = load_cluster("cpu-gloo")
    plan = plan_pipeline(model, inputs, MeshSpec.make((world,), ("pp",)), profile, profile.device.memory_capacity,
                         pipeline, precision=dict(BF16))
    assert plan.precision == BF16
    pm = autopar.parallelize(model, mesh, inputs, plan=plan)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    out: dict = {"diffs": {}, "fp32_params": all(p.dtype == torch.float32 for p in pm.parameters())}
    loss = autopar.forward_backward(pm, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = ref(**inputs)
    ref_loss.backward()
    out["diffs"]["loss"] = _diff(loss, ref_loss)
    out["loss"] = (float(loss), float(ref_loss))
    # without autocast the one-device loss differs by more than the pipeline does: autocast really ran
    with torch.no_grad():
        out["fp32_loss"] = float(copy.deepcopy(ref)(**inputs))
    for name, p in pm.named_parameters():
        out["diffs"][f"grad:{name}"] = _diff(_full(p.grad), ref_params[name].grad)
        out["grad_dtype_fp32"] = out.get("grad_dtype_fp32", True) and p.grad.dtype == torch.float32
    opt.step()
    ref_opt.step()
    moved = total = 0
    for name, p in pm.named_parameters():
        a, b = _full(p.detach()), ref_params[name].detach()
        out["diffs"][f"param:{name}"] = _diff(a, b)
        moved += int(((a - b).abs() > 1e-4).sum())
        total += a.numel()
    out["frac"] = moved / total
    out["fqns"] = [n for n, _ in pm.named_parameters()]
    return out
