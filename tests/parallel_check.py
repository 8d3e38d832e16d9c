"""Worker functions (module level, run in the gloo pools) that check a parallel plan against one device.

``check_training_step`` builds a model on every rank with the same seed, keeps a single-device
copy, applies a plan (solved, or forced with ``fix``), then compares forward output, loss, every
parameter gradient (``full_tensor()``) and the parameters after one AdamW step.
"""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.models import build_model

RTOL, ATOL = 1e-4, 1e-5


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Excess over the fp32 tolerance: <= 0 means allclose(rtol=1e-4, atol=1e-5) holds."""
    a, b = a.detach(), b.detach()
    return float(((a - b).abs() - (ATOL + RTOL * b.abs())).max())


def check_training_step(rank: int, world: int, spec: str, mesh_shape: tuple[int, ...], fix: dict | None = None,
                        batch: int = 4, seq: int = 16, options: dict | None = None, check_logits: bool = True,
                        prefer: dict | None = None) -> dict:
    torch.manual_seed(0)
    model, inputs = build_model(spec, batch=batch, seq=seq, device="cpu")
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", mesh_shape)
    out = {"errors": {}}
    if check_logits:  # the model without labels is another graph: plan and apply it on a copy
        logits_kw = {k: v for k, v in inputs.items() if k != "labels"}
        pm_fwd = autopar.parallelize(copy.deepcopy(model), mesh, logits_kw, fix=fix, prefer=prefer, **(options or {}))
        out["errors"]["forward"] = _err(pm_fwd(**logits_kw), ref(**logits_kw))
    pm = autopar.parallelize(model, mesh, inputs, fix=fix, prefer=prefer, **(options or {}))
    out["plan"] = pm.plan.to_dict()["param_placements"]
    out["deferred_grads"] = len(pm.graph_module.meta.get("autopar_deferred_grads", {}))
    out["reshards"] = pm.code().count("autopar_parallel_ops_reshard(")
    loss, ref_loss = pm(**inputs), ref(**inputs)
    out["errors"]["loss"] = _err(loss, ref_loss)
    out["loss"] = float(loss.detach())
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in pm.named_parameters():
        out["errors"][f"grad:{name}"] = _err(p.grad.full_tensor(), ref_params[name].grad)
    # lr 1e-3: some gradients are analytically zero (the key bias: softmax is shift invariant) and hold only
    # rounding noise (~1e-11); Adam's first step normalizes them to ~lr*noise/eps, so a large lr would compare noise.
    for m in (pm, ref):
        torch.optim.AdamW(m.parameters(), lr=1e-3).step()
    for name, p in pm.named_parameters():
        out["errors"][f"param:{name}"] = _err(p.detach().full_tensor(), ref_params[name].detach())
    out["placements_are_dtensors"] = all(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
                                         for p in pm.parameters())
    out.update(_structure(pm, ref))
    return out


def _structure(pm: torch.nn.Module, ref: torch.nn.Module) -> dict:
    """FQNs (with tied duplicates) of the parallel and the original module, each parameter's DTensor
    placements as printed in plans (None for a parameter that is not a DTensor), and tied-weight groups."""
    from autopar.placement import format_sharding

    def groups(m):
        by_id: dict[int, list[str]] = {}
        for n, p in m.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(n)
        return sorted(sorted(g) for g in by_id.values() if len(g) > 1)

    return {
        "fqns": [n for n, _ in pm.named_parameters(remove_duplicate=False)],
        "ref_fqns": [n for n, _ in ref.named_parameters(remove_duplicate=False)],
        "placements": {n: (format_sharding(p.placements) if hasattr(p, "placements") else None)
                       for n, p in pm.named_parameters(remove_duplicate=False)},
        "plan_placements": {k: list(v) for k, v in pm.plan.param_placements.items()},
        "tied": groups(pm),
        "ref_tied": groups(ref),
    }
