"""Workers for tests/test_grad_sync.py (module level so the gloo pools can import them)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.models import build_model

DP = {"fix": {"input:*": ["S(0)"], "param:*": ["R"]}, "prefer": {"*": ["S(0)"]}}


def accumulate_two_microbatches(rank: int, world: int) -> dict:
    """Two backward calls before one step: gradients and the step equal single-device accumulation."""
    torch.manual_seed(0)
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="cpu")
    ref = copy.deepcopy(model)
    second = {"idx": torch.roll(inputs["idx"], 1, dims=1), "labels": torch.roll(inputs["labels"], 1, dims=1)}
    pm = autopar.parallelize(model, init_device_mesh("cpu", (world,)), inputs, **DP)
    calls = []
    orig = dist.all_reduce

    def counting(t, *a, **k):
        calls.append(t.numel())
        return orig(t, *a, **k)

    dist.all_reduce = counting
    try:
        for batch in (inputs, second):
            pm(**batch).backward()
    finally:
        dist.all_reduce = orig
    for batch in (inputs, second):
        ref(**batch).backward()
    refp = dict(ref.named_parameters())
    errs = {n: float((p.grad.full_tensor() - refp[n].grad).abs().max()) for n, p in pm.named_parameters()}
    for m in (pm, ref):
        torch.optim.AdamW(m.parameters(), lr=1e-3).step()
    perrs = {n: float((p.detach().full_tensor() - refp[n].detach()).abs().max()) for n, p in pm.named_parameters()}
    reducer = pm.grad_reducer
    return {"grad_err": max(errs.values()), "param_err": max(perrs.values()),
            "buckets": len(reducer.buckets), "deferred": sum(len(b) for b in reducer.buckets),
            "n_params": len(list(pm.parameters())), "all_reduce_calls": len(calls)}


def small_buckets(rank: int, world: int, accumulate: bool) -> dict:
    """The reducer rebuilt with 16 KiB buckets (several per step): gradients equal one device's (with and
    without accumulation over two backward calls), every gradient of a bucket of several parameters is a
    view of its bucket, and the gradients kept after backward take their bytes once (no flat copy stays
    alive beside them)."""
    from autopar.runtime.grad_sync import GradReducer
    torch.manual_seed(0)
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="cpu")
    ref = copy.deepcopy(model)
    pm = autopar.parallelize(model, init_device_mesh("cpu", (world,)), inputs, **DP)
    old = pm.grad_reducer
    params = [(p, old.dims[b], old._publish[id(p)]) for b, ps in enumerate(old.buckets) for p in ps]
    old.remove()
    reducer = pm.__dict__["grad_reducer"] = GradReducer(params, pm.mesh, bucket_bytes=16 * 2**10,
                                                        first_bucket_bytes=4 * 2**10)
    second = {"idx": torch.roll(inputs["idx"], 1, dims=1), "labels": torch.roll(inputs["labels"], 1, dims=1)}
    batches = (inputs, second) if accumulate else (inputs,)
    out = {}
    for step in range(2):                      # the second step reuses the reducer after zero_grad
        for m in (pm, ref):
            for p in m.parameters():
                p.grad = None
        for batch in batches:
            pm(**batch).backward()
            ref(**batch).backward()
        refp = dict(ref.named_parameters())
        out[f"grad_err_{step}"] = max(float((p.grad.full_tensor() - refp[n].grad).abs().max())
                                      for n, p in pm.named_parameters())
    shared = [p for b in reducer.buckets if len(b) > 1 for p in b]   # a bucket of one is reduced in place
    bases = {id(p.grad._base) for p in shared if p.grad._base is not None}
    storages = {}
    for p in pm.parameters():
        st = p.grad._local_tensor.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    grad_bytes = sum(p.grad._local_tensor.numel() * p.grad._local_tensor.element_size() for p in pm.parameters())
    return {**out, "buckets": len(reducer.buckets), "shared_buckets": sum(len(b) > 1 for b in reducer.buckets),
            "views": sum(p.grad._base is not None for p in shared), "in_shared": len(shared),
            "bucket_buffers": len(bases),
            "grad_storage_bytes": sum(storages.values()), "grad_bytes": grad_bytes}


def replaced_parameter(rank: int, world: int) -> dict:
    """A data-parallel parameter assigned anew after parallelize (a new DTensor Parameter) is reduced like
    the one it replaced: its gradient equals one device's."""
    from torch.distributed.tensor import DTensor
    torch.manual_seed(0)
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="cpu")
    ref = copy.deepcopy(model)
    pm = autopar.parallelize(model, init_device_mesh("cpu", (world,)), inputs, **DP)
    old = pm.blocks[0].mlp.fc.weight
    new_local = old.to_local().detach().clone() * 0.5
    pm.blocks[0].mlp.fc.weight = torch.nn.Parameter(DTensor.from_local(new_local, old.device_mesh, old.placements))
    with torch.no_grad():
        ref.blocks[0].mlp.fc.weight.mul_(0.5)
    pm(**inputs).backward()
    ref(**inputs).backward()
    refp = dict(ref.named_parameters())
    errs = {n: float((p.grad.full_tensor() - refp[n].grad).abs().max()) for n, p in pm.named_parameters()}
    return {"err": errs["blocks.0.mlp.fc.weight"], "max_err": max(errs.values()),
            "reduced": any(q is pm.blocks[0].mlp.fc.weight._local_tensor for b in pm.grad_reducer.buckets for q in b)}
