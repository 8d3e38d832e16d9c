"""Worker functions (module level, run in the gloo pools) for checkpoint / offload / precision checks.

``check_memory_variants`` plans a model once (rank 0, shared as JSON), then for each variant
(checkpoint and offload entries) applies ``dataclasses.replace(plan, ...)`` to a fresh copy and runs
two steps against the single-device model: a measured step (``autopar.memory``: live bytes right
after forward and the step's peak) and a counted one (``FlopCounterMode`` over forward and over
backward, per module); numerics (loss, every gradient, one AdamW step) come from the measured step.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.flop_counter import FlopCounterMode

import autopar
from autopar.runtime import memory, precision
from autopar.models import build_model
from autopar.core.plan import Plan

RTOL, ATOL = 1e-4, 1e-5


def _err(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> float:
    """Excess over the tolerance: <= 0 means allclose(rtol, atol) holds."""
    a, b = a.detach().float(), b.detach().float()
    return float(((a - b).abs() - (atol + rtol * b.abs())).max())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shared_plan(model, inputs, mesh_shape: tuple[int, ...], **options) -> Plan:
    """Solve on rank 0 and share the JSON (every rank applies the same plan)."""
    text = [None]
    if dist.get_rank() == 0:
        text = [autopar.plan(model, inputs, mesh_shape=mesh_shape, cluster="cpu-gloo", **options).to_json()]
    dist.broadcast_object_list(text, src=0)
    return Plan.from_json(text[0])


def _local_bytes(plan: Plan, fqns: list[str]) -> int:
    """fp32 bytes of this rank's shards of ``fqns``, from the plan's shapes and placements alone."""
    total = 0
    for fqn in fqns:
        numel = 1
        for n in plan.model.param_shapes[fqn]:
            numel *= n
        for placement, size in zip(plan.param_placements[fqn], plan.mesh.shape):
            if placement.startswith("S("):
                numel //= size
        total += 4 * numel
    return total


def _region_flops(fc: FlopCounterMode, name: str) -> int:
    """FLOPs FlopCounterMode attributed to the module whose tracked name ends with ``name``."""
    counts = fc.get_flop_counts()
    keys = [k for k in counts if k.endswith(name)]
    return sum(sum(counts[k].values()) for k in keys[:1])


def _count_flops(pm, inputs: dict, regions: list[str]) -> tuple[dict[str, int], int]:
    """Forward FLOPs per region and backward FLOPs of one step. Checkpoint early stopping is off, so a full
    recompute redoes the whole region (with it on, backward stops once it has every tensor it needs)."""
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        with FlopCounterMode(display=False) as fwd:
            loss = pm(**inputs)
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    return {sub: _region_flops(fwd, sub) for sub in regions}, bwd.get_total_flops()


def check_memory_variants(rank: int, world: int, spec: str, mesh_shape: tuple[int, ...],
                          variants: dict[str, dict], fix: dict | None = None, batch: int = 4, seq: int = 16) -> dict:
    torch.manual_seed(0)
    model, inputs = build_model(spec, batch=batch, seq=seq, device="cpu")
    mesh = init_device_mesh("cpu", mesh_shape)
    plan = shared_plan(model, inputs, mesh_shape, fix=fix)
    ref = copy.deepcopy(model)
    ref_loss = ref(**inputs)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    torch.optim.AdamW(ref.parameters(), lr=1e-3).step()
    ref_params = dict(ref.named_parameters())
    out = {}
    for vname, v in variants.items():
        vplan = dataclasses.replace(plan, checkpoint=tuple(v.get("checkpoint", ())),
                                    offload=tuple(v.get("offload", ())))
        pm = autopar.apply(copy.deepcopy(model), vplan, mesh)
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
        r = {"errors": {}, "submodules": [n for n, _ in pm.graph_module.named_children()]}
        with memory.track(pm, opt) as t:
            loss = pm(**inputs)
            r["after_forward"] = t.snapshot()
            loss.backward()
            opt.step()
        r["memory"] = t.report.to_dict()
        r["analytic_param_bytes"] = _local_bytes(vplan, [n for n, _ in pm.named_parameters()])
        r["num_params"] = len(list(pm.parameters()))
        r["errors"]["loss"] = _err(loss, ref_loss)
        for name, p in pm.named_parameters():
            r["errors"][f"grad:{name}"] = _err(_full(p.grad), ref_grads[name])
            r["errors"][f"param:{name}"] = _err(_full(p.detach()), ref_params[name])
        opt.zero_grad(set_to_none=True)
        r["region_forward_flops"], r["backward_flops"] = _count_flops(pm, inputs, r["submodules"])
        r["region_code"] = {n: m.body.code for n, m in pm.graph_module.named_children()}
        out[vname] = r
    return out


# ---------------------------------------------------------------------------------- mixed precision


def check_mixed_precision(rank: int, world: int, spec: str, mesh_shape: tuple[int, ...], batch: int = 4,
                          seq: int = 16) -> dict:
    """One plan, two precisions: bfloat16 compute against the single-device model under the same autocast,
    and float16 with the plan's dynamic loss scaling (step 1 has an inf gradient on rank 1 only: every rank
    must skip it and halve the scale; step 2 is finite: every rank steps)."""
    torch.manual_seed(0)
    model, inputs = build_model(spec, batch=batch, seq=seq, device="cpu")
    mesh = init_device_mesh("cpu", mesh_shape)
    plan = shared_plan(model, inputs, mesh_shape, fix={"input:*": ["S(0)"]})   # data parallel
    bf16 = dataclasses.replace(plan, precision={"param_dtype": "float32", "compute_dtype": "bfloat16"})
    fp16 = dataclasses.replace(plan, precision={"param_dtype": "float32", "compute_dtype": "float16",
                                                "loss_scaling": "dynamic"})
    return {"bf16": _bf16_step(bf16, copy.deepcopy(model), inputs, mesh),
            "fp16": _fp16_steps(fp16, model, inputs, mesh, rank)}


def _bf16_step(plan: Plan, model, inputs: dict, mesh) -> dict:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        fp32_loss = copy.deepcopy(model)(**inputs)
    pm = autopar.apply(model, plan, mesh)
    loss = pm(**inputs)   # the parallel module runs under the plan's autocast by itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = ref(**inputs)
    loss.backward()
    ref_loss.backward()
    refp = dict(ref.named_parameters())
    out = {"loss": float(loss), "ref_loss": float(ref_loss), "fp32_loss": float(fp32_loss),
           "param_dtypes": sorted({str(p.dtype) for p in pm.parameters()}),
           "grad_dtypes": sorted({str(p.grad.dtype) for p in pm.parameters()}), "grad_rel": {},
           }
    for n, p in pm.named_parameters():
        g, rg = _full(p.grad).float(), refp[n].grad.float()
        out["grad_rel"][n] = float((g - rg).norm() / rg.norm().clamp_min(1e-12))
    out["matmul_dtypes"] = _matmul_dtypes(pm, inputs)
    return out


def _matmul_dtypes(pm, inputs: dict) -> list[str]:
    """Dtypes of the mm/addmm outputs in one forward (a dispatch mode that only looks)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Look(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                seen.add(str(out.dtype))
            return out

    with torch.no_grad(), Look():
        pm(**inputs)
    return sorted(seen)


def _fp16_steps(plan: Plan, model, inputs: dict, mesh, rank: int) -> dict:
    pm = autopar.apply(model, plan, mesh)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    scaler = precision.grad_scaler(plan, "cpu", init_scale=2.0 ** 8)
    snap = lambda: {n: p.detach().to_local().clone() for n, p in pm.named_parameters()}  # noqa: E731
    out = {"scales": [scaler.get_scale()], "changed": [], "finite": []}
    for step in range(2):
        before = snap()
        loss = pm(**inputs)
        scaler.scale(loss).backward()
        if step == 0 and rank == 1:
            next(iter(pm.parameters())).grad.to_local().view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        after = snap()
        out["scales"].append(scaler.get_scale())
        out["changed"].append(sum(not torch.equal(before[n], after[n]) for n in after))
        out["finite"].append(all(bool(torch.isfinite(t).all()) for t in after.values()))
    out["num_params"] = len(before)
    out["matmul_dtypes"] = _matmul_dtypes(pm, inputs)
    return out


# ------------------------------------------------------------------ one process, no plan: the passes alone


def local_graph(spec: str, checkpoint: tuple[str, ...] = (), offload: tuple[str, ...] = (), *, batch: int = 2,
                seq: int = 8):
    """The captured graph of ``spec`` after the two memory passes (ctx: just the plan's lists), the model,
    and the graph's flat inputs (parameters, buffers, user inputs)."""
    import types

    from autopar.core.capture import capture
    from autopar.codegen.checkpoint_regions import checkpoint_regions
    from autopar.codegen.context import copy_graph_module
    from autopar.codegen.offload_activations import offload_activations

    torch.manual_seed(0)
    model, inputs = build_model(spec, batch=batch, seq=seq, device="cpu")
    ep = capture(model, inputs, fold_layers=False).program
    ctx = types.SimpleNamespace(plan=types.SimpleNamespace(checkpoint=tuple(checkpoint), offload=tuple(offload)))
    gm = offload_activations(checkpoint_regions(copy_graph_module(ep.graph_module), ctx), ctx)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    flat = [state[s.target] if s.target is not None else inputs[s.arg.name] for s in ep.graph_signature.input_specs]
    return gm, model, flat


def local_step(spec: str, checkpoint: tuple[str, ...] = (), offload: tuple[str, ...] = ()) -> dict:
    """Loss, gradients, forward FLOPs per region, backward FLOPs and live bytes after forward."""
    gm, model, flat = local_graph(spec, checkpoint, offload)
    with memory.track(model) as t:
        loss = gm(*flat)[0]
        after_forward = t.snapshot()
        loss.backward()
    subs = [n for n, _ in gm.named_children()]
    out = {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
           "submodules": subs, "after_forward": after_forward, "memory": t.report, "code": gm.code}
    model.zero_grad(set_to_none=True)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        with FlopCounterMode(display=False) as fwd:
            loss = gm(*flat)[0]
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    out["region_forward_flops"] = {s: _region_flops(fwd, s) for s in subs}
    out["backward_flops"] = bwd.get_total_flops()
    return out


def check_budget_fraction(rank: int, world: int, spec: str, mesh_shape: tuple[int, ...], fraction: float,
                          batch: int = 8, seq: int = 32, n_layer: int | None = None) -> dict:
    """Plan data-parallel without recompute or ZeRO (parameters replicated) for its predicted peak, then let
    the solver plan under ``fraction`` of it (recompute, ZeRO and placements free, the batch split); run
    one measured step of that plan (``autopar.memory``, optimizer states of a first step already live)
    and a step of the single-device model: loss, every gradient, every parameter after AdamW."""
    from autopar import zero as Z

    torch.manual_seed(0)
    model, inputs = build_model(spec, batch=batch, seq=seq, device="cpu", n_layer=n_layer)
    ref = copy.deepcopy(model)
    replicated = {"input:*": ["S(0)"] * len(mesh_shape), "param:*": ["R"] * len(mesh_shape)}
    base = shared_plan(model, inputs, mesh_shape, fix=replicated, recompute="none", zero=0)
    budget = int(fraction * base.predicted.peak_memory_bytes)
    plan = shared_plan(model, inputs, mesh_shape, fix={"input:*": replicated["input:*"]}, memory_budget=budget)
    mesh = init_device_mesh("cpu", mesh_shape)
    pm = autopar.apply(model, plan, mesh)
    opt = Z.optimizer(pm, torch.optim.AdamW, lr=1e-3, eps=1e-6)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6)
    out = {"budget": budget, "base_peak": base.predicted.peak_memory_bytes,
           "predicted_peak": plan.predicted.peak_memory_bytes, "checkpoint": list(plan.checkpoint),
           "zero": len(plan.optimizer_sharding), "errors": {}}
    for step in range(2):   # step 0: every gradient checked; step 1 measured (optimizer states exist)
        ref_params = dict(ref.named_parameters())
        tracker = memory.track(pm, getattr(opt, "optimizer", opt)) if step else contextlib.nullcontext()
        with tracker:
            loss = pm(**inputs)
            loss.backward()
            grads = {} if step else {n: _full(g) for n, g in Z.full_grads(pm)}
            opt.step()
            opt.zero_grad(set_to_none=True)
        ref_loss = ref(**inputs)
        ref_loss.backward()
        out["errors"][f"loss{step}"] = _err(loss, ref_loss)
        for n, g in grads.items():
            out["errors"][f"grad:{n}"] = _err(g, ref_params[n].grad)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        for n, p in pm.named_parameters():
            out["errors"][f"param{step}:{n}"] = _err(_full(p.detach()), ref_params[n].detach())
    out["measured_peak"] = tracker.peak_bytes
    out["breakdown"] = tracker.breakdown
    return out
