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


def folded_plan_applies_to_full_model(rank: int, world: int) -> dict:
    """A plan made on a folded capture (2 of 4 identical blocks) applies to the full model, numerically exact."""
    from autopar.models import load_example_module
    gpt = load_example_module("gpt")
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=256, max_seq_len=32, n_layer=4, n_head=4, d_model=32))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (4, 16), generator=g)
    inputs = {"idx": idx, "labels": torch.roll(idx, -1, 1)}
    plan = autopar.plan(model, inputs, mesh_shape=(world,), cluster="cpu-gloo",
                        fix={"input:*": ["S(0)"], "param:*": ["R"]}, prefer={"*": ["S(0)"]})
    pm = autopar.apply(model, plan, init_device_mesh("cpu", (world,)))
    loss, ref_loss = pm(**inputs), ref(**inputs)
    loss.backward()
    ref_loss.backward()
    refp = dict(ref.named_parameters())
    return {"folded": dict(plan.model.folded_layers), "n_params": len(plan.param_placements),
            "loss_diff": float((loss - ref_loss).abs()),
            "grad_diff": max(float((p.grad.full_tensor() - refp[n].grad).abs().max()) for n, p in pm.named_parameters())}


def float_input_gradient_is_full(rank: int, world: int) -> dict:
    """A float input that requires grad gets its full gradient on every rank, as on one device."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    ref = copy.deepcopy(model)
    x = torch.randn(6, 8)
    pm = autopar.parallelize(model, init_device_mesh("cpu", (world,)), (x,),
                             fix={"input:*": ["S(0)"], "param:*": ["R"]}, prefer={"*": ["S(0)"]})
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (pm(xa) ** 2).sum().backward()
    (ref(xb) ** 2).sum().backward()
    return {"input_grad_diff": float((xa.grad - xb.grad).abs().max()), "batch_split": pm.plan.node_shardings[
        "input:input"].outputs[0]}


class _MadeConstants(torch.nn.Module):
    """Its forward makes tensors from Python values (``torch.tensor``), which torch.export lifts into
    constant inputs of the graph (as HF Mistral and Qwen2 do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 4)

    def forward(self, x, y):
        scale = torch.tensor([0.5, 2.0, 1.0, 1.5])
        h = torch.relu(self.fc1(x)) * torch.tensor(1.25)
        return torch.nn.functional.cross_entropy(self.fc2(h) * scale, y)


def lifted_constants(rank: int, world: int) -> dict:
    """Constant tensors made in forward reach the rewritten graph (data parallel, one device's numbers)."""
    torch.manual_seed(0)
    model = _MadeConstants()
    inputs = {"x": torch.randn(8, 16), "y": torch.randint(0, 4, (8,))}
    ref = copy.deepcopy(model)
    pm = autopar.parallelize(model, init_device_mesh("cpu", (world,)), inputs,
                             fix={"input:*": ["S(0)"], "param:*": ["R"]}, prefer={"*": ["S(0)"]})
    loss = pm(**inputs)
    loss.backward()
    rl = ref(**inputs)
    rl.backward()
    refp = dict(ref.named_parameters())
    return {"constants": len(pm._constants), "loss_err": abs(float(loss) - float(rl)),
            "grad_err": max(float((p.grad.full_tensor() - refp[n].grad).abs().max()) for n, p in pm.named_parameters()),
            "split": pm.plan.node_shardings["input:x"].outputs[0]}
