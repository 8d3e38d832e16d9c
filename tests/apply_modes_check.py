"""Workers for tests/test_apply_modes.py: a meta-device model and the local-shard input mode."""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.models import build_model

DPTP = {"fix": {"input:*": ["S(0)", "R"], "param:*attn.qkv.weight": ["R", "S(0)"],
                "param:*mlp.fc.weight": ["R", "S(0)"], "param:*mlp.proj.weight": ["R", "S(1)"],
                "param:wte.weight": ["R", "S(0)"]}}


def meta_model_materializes_shards(rank: int, world: int) -> dict:
    """A model built on meta: each rank allocates only its shards and fills them with the model's init."""
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="meta")
    g = torch.Generator().manual_seed(0)  # the same global inputs on every rank
    real = {k: torch.randint(0, 256, v.shape, generator=g) for k, v in inputs.items()}
    pm = autopar.parallelize(model, init_device_mesh("cpu", (2, 2)), real, **DPTP)
    out = {"local_numel": sum(p.to_local().numel() for p in pm.parameters()),
           "global_numel": sum(p.numel() for p in pm.parameters()), "stats": {}}
    for name, p in pm.named_parameters():
        loc = p.to_local()
        assert not loc.is_meta and torch.isfinite(loc).all(), name
        out["stats"][name] = (float(loc.float().std()) if loc.numel() > 1 else 0.0, float(loc.float().mean()),
                              tuple(loc.shape), [str(x) for x in p.placements])
    loss = pm(**real)
    loss.backward()
    out["loss"] = float(loss.detach())
    out["grads_finite"] = all(torch.isfinite(p.grad.to_local()).all() for p in pm.parameters())
    return out


def local_input_mode(rank: int, world: int) -> dict:
    """input_mode="local": each rank passes only its batch shard; the result equals the global mode."""
    torch.manual_seed(0)
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="cpu")
    other = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (2, 2))
    glob = autopar.parallelize(model, mesh, inputs, **DPTP)
    loc = autopar.apply(other, glob.plan, mesh, input_mode="local")
    dp = mesh.get_local_rank(0)
    shard = {k: v.chunk(2)[dp] for k, v in inputs.items()}
    a, b = glob(**inputs), loc(**shard)
    a.backward()
    b.backward()
    gdiff = max(float((p.grad.full_tensor() - q.grad.full_tensor()).abs().max())
                for p, q in zip(glob.parameters(), loc.parameters()))
    try:
        loc(**inputs)
        wrong_shape = None
    except autopar.PlanMismatchError as e:
        wrong_shape = str(e)
    return {"loss_diff": float((a - b).abs()), "grad_diff": gdiff, "wrong_shape": wrong_shape}
