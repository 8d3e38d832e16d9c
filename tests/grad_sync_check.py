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
