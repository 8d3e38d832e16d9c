"""Worker functions (run in the gloo pools) for stage boundaries sent per rank (tests/test_pipeline_boundaries.py).

``check_sharded_boundary`` plans the tiny GPT with a pp dim on a cluster whose network is fast (the stage plans
split the batch, so a stage's output is batch-sharded over the other mesh dim), optionally rewrites the plan's
send placements (``send=``: the runtime must follow what the plan says, also where the next stage's plan reads
the value in other placements), applies it, records every tensor torch's pipeline stages hand to ``isend``, and
compares the loss, every gradient and the parameters after one AdamW step with the single-device model.
"""
from __future__ import annotations

import copy
import json

import torch
import torch.distributed as dist
from pipeline_check import _err, _full, build, fast_net_profile
from torch.distributed.device_mesh import init_device_mesh

import autopar


def check_sharded_boundary(rank: int, world: int, mesh_shape: tuple[int, ...], names: tuple[str, ...],
                           pipeline: dict, batch: int = 8, seq: int = 8, send: list[list[str]] | None = None,
                           spec: str = "gpt-tiny") -> dict:
    torch.manual_seed(0)
    model, inputs = build(spec, batch, seq)
    ref = copy.deepcopy(model)
    text = [None]
    if rank == 0:   # planned once, shared (apply checks that every rank holds the same plan)
        text = [autopar.plan(model, inputs, mesh_shape=mesh_shape, mesh_dim_names=names, pipeline=pipeline,
                             cluster=fast_net_profile()).to_json()]
    dist.broadcast_object_list(text, src=0)
    d = json.loads(text[0])
    if send is not None:
        d["pipeline"]["stages"][0]["send_placements"] = send
    plan = autopar.Plan.from_dict(d)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    pm = autopar.apply(model, plan, mesh)
    rows = plan.pipeline["stages"]
    sent: list[tuple[list[int], int]] = []
    real = dist.P2POp

    def spy(op, tensor, *args, **kwargs):
        if op is dist.isend:
            sent.append((list(tensor.shape), tensor.numel() * tensor.element_size()))
        return real(op, tensor, *args, **kwargs)

    out = {"errors": {}, "stages": sorted(pm.stage_modules), "rows": [{k: r.get(k) for k in
           ("inputs", "outputs", "send_placements")} for r in rows],
           "input_placements": [{k: v["outputs"][0] for k, v in r["plan"]["node_shardings"].items()
                                 if k.startswith("input:")} for r in rows],
           }
    mb = plan.pipeline["microbatches"]
    # eps 1e-6, not 1e-8: AdamW's first step moves an element by lr g / (|g| + eps), so with eps 1e-8 a gradient at
    # fp32 noise level (~1e-9, whose sign the summation order over dp decides) moves by up to ~lr: measured 1.2e-5
    # in one element on the interleaved case. With eps 1e-6 that noise moves it by < 1e-6, so atol 1e-5 holds
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3, eps=1e-6)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6)
    dist.P2POp = spy
    try:
        loss = autopar.forward_backward(pm, inputs)
    finally:
        dist.P2POp = real
    ref_loss = ref(**inputs)
    ref_loss.backward()
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    out["errors"]["loss"] = _err(loss, ref_loss)
    for name, p in pm.named_parameters():
        out["errors"][f"grad:{name}"] = _err(_full(p.grad), ref_params[name].grad)
    opt.step()
    ref_opt.step()
    for name, p in pm.named_parameters():
        out["errors"][f"param:{name}"] = _err(_full(p.detach()), ref_params[name].detach())
    out["fqns"] = [n for n, _ in pm.named_parameters()]
    out["sent"] = sent
    out["microbatches"] = mb
    out["stage_io"] = {s: [[list(sh) for sh, _ in io[0]], [list(sh) for sh, _ in io[1]]]
                       for s, io in pm.stage_io.items()}
    out["hidden_whole"] = [batch // mb, seq, ref.wte.weight.shape[1]]   # one micro-batch's residual stream
    return out
