"""Worker function (module level, run in the gloo pools) for tests/test_zero_optimizer.py.

``check_zero_optimizer`` applies a ZeRO plan (solved by the caller) to a seeded model, keeps a
single-device copy, and runs what a user's ordinary training code does with both, comparing every
value against the single device (fp32 rtol 1e-4, atol 1e-5; an error <= 0 is within tolerance):

- ``grads``: two backward calls accumulated: after each, every parameter's ``param.grad`` (present where
  the single device has one; its ``full_tensor()`` equal), and what a ZeRO-2 ``param.grad`` holds per
  rank (placements, global shape, local shape);
- ``clip``: ``clip_grad_norm_(module.parameters())``: the total norm, the clipped gradients, the
  parameters after an SGD-with-momentum step (SGD, not Adam, so the clipping changes the update);
- ``sched``: the optimizer is a ``torch.optim.Optimizer``; ``LambdaLR`` then ``CosineAnnealingLR`` drive
  it (AdamW) over three steps, the parameters after each equal one device's under the same schedules;
- ``memtracker``: ``MemTracker().track_external(module, optimizer)`` accepts it and measures one step's
  optimizer states: this rank's shards (a ZeRO state is a DTensor with the ZeRO placements);
- ``ckpt``: ``autopar.save`` after one AdamW step, ``autopar.load`` into a freshly built module and
  optimizer (another seed) under the same plan, one more step: the parameters equal those of the run
  that was never interrupted (and the single device's);
- ``plain``: a plain ``torch.optim.AdamW(module.parameters())`` over the ZeRO parameters warns (whole
  states per rank, more memory than the plan budgeted) and steps them correctly.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.models import build_model

RTOL, ATOL = 1e-4, 1e-5
_MESHES: dict = {}


def _mesh(shape):
    shape = tuple(shape)
    if shape not in _MESHES:
        _MESHES[shape] = init_device_mesh("cpu", shape)
    return _MESHES[shape]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().full_tensor() if hasattr(a, "full_tensor") else a.detach()
    b = b.detach()
    return float(((a - b).abs() - (ATOL + RTOL * b.abs())).max())


def _batches(inputs: dict, n: int) -> list[dict]:
    """``n`` different batches shaped like ``inputs`` (the first is ``inputs``), the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    out = [inputs]
    for _ in range(n - 1):
        out.append({k: torch.randint(0, 64, v.shape, generator=g) if not v.is_floating_point()
                    else torch.randn(v.shape, generator=g) for k, v in inputs.items()})
    return out


def _setup(spec: str, plan_json: str, seed: int = 0):
    torch.manual_seed(seed)
    model, inputs = build_model(spec, batch=4, seq=16, device="cpu")
    ref = copy.deepcopy(model)
    plan = autopar.Plan.from_json(plan_json)
    pm = autopar.apply(model, plan, _mesh(plan.mesh.shape))
    return pm, ref, inputs


def _params_err(pm, ref) -> dict[str, float]:
    rp = dict(ref.named_parameters())
    return {n: _err(p, rp[n]) for n, p in pm.named_parameters()}


def _grads(pm, ref, batches) -> dict:
    out: dict = {"errors": {}, "missing": {}, "layout": {}}
    rp = dict(ref.named_parameters())
    for k, batch in enumerate(batches):          # accumulated: no zero_grad between the two
        pm(**batch).backward()
        ref(**batch).backward()
        out["missing"][k] = [n for n, p in pm.named_parameters() if rp[n].grad is not None and p.grad is None]
        for n, p in pm.named_parameters():
            if p.grad is not None and rp[n].grad is not None:
                out["errors"][f"grad{k}:{n}"] = _err(p.grad, rp[n].grad)
    for n, p in pm.named_parameters():
        g = p.grad
        out["layout"][n] = None if g is None else {
            "type": type(g).__name__, "placements": [str(q) for q in getattr(g, "placements", ())],
            "shape": list(g.shape), "param_shape": list(p.shape),
            "local_numel": getattr(g, "_local_tensor", g).numel(),
            "param_local_numel": getattr(p, "_local_tensor", p).numel()}
    return out


def _section(out: dict, name: str, fn, *args) -> None:
    """``out[name] = fn(*args)``, or the exception's text there (every rank fails alike: the others go on)."""
    try:
        out[name] = fn(*args)
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        out[name] = {"exception": f"{type(e).__name__}: {e}"}


def check_zero_optimizer(rank: int, world: int, spec: str, plan_json: str, path: str) -> dict:
    plan = autopar.Plan.from_json(plan_json)
    out: dict = {"gradient_sharding": {k: list(v) for k, v in plan.gradient_sharding.items()},
                 "optimizer_sharding": {k: list(v) for k, v in plan.optimizer_sharding.items()}}
    _, _, inputs = _setup(spec, plan_json)
    batches = _batches(inputs, 3)
    _section(out, "grads_and_clip", _grads_and_clip, spec, plan_json, batches)
    _section(out, "sched", _sched, spec, plan_json, batches)
    _section(out, "memtracker", _memtracker, spec, plan_json, batches)
    _section(out, "ckpt", _ckpt, spec, plan_json, batches, path)
    _section(out, "plain", _plain, spec, plan_json, batches)
    return out


def _grads_and_clip(spec, plan_json, batches) -> dict:
    """(1) param.grad after two accumulated backward calls; (2) clip_grad_norm_ over module.parameters(),
    then a step that the clipping changes."""
    pm, ref, _ = _setup(spec, plan_json)
    out = {"grads": _grads(pm, ref, batches[:2])}
    opt = autopar.make_optimizer(pm, torch.optim.SGD, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    norm = torch.nn.utils.clip_grad_norm_(pm.parameters(), 0.5)
    rp = dict(ref.named_parameters())
    clip = {"norm": float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm),
            "ref_norm": float(ref_norm), "errors": {}}
    clip["errors"]["norm"] = _err(norm, ref_norm)
    for n, p in pm.named_parameters():
        if rp[n].grad is not None:
            clip["errors"][f"clipped:{n}"] = _err(p.grad, rp[n].grad) if p.grad is not None else float("inf")
    opt.step()
    ref_opt.step()
    clip["errors"].update({f"param:{n}": e for n, e in _params_err(pm, ref).items()})
    out["clip"] = clip
    return out


def _sched(spec, plan_json, batches) -> dict:
    """(3) the optimizer is a torch optimizer; LR schedulers drive it as on one device."""
    pm, ref, _ = _setup(spec, plan_json)
    opt = autopar.make_optimizer(pm, torch.optim.AdamW, lr=1e-2, eps=1e-6)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-6)
    sched = {"is_optimizer": isinstance(opt, torch.optim.Optimizer), "type": type(opt).__name__,
             "is_adamw": isinstance(opt, torch.optim.AdamW), "lrs": [], "errors": {}}
    lam = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s) for o in (opt, ref_opt)]
    for step, batch in enumerate(batches):
        if step == 2:   # a second scheduler takes over (schedulers compose on param_groups)
            lam = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4) for o in (opt, ref_opt)]
        sched["lrs"].append(opt.param_groups[0]["lr"])
        for m, o in ((pm, opt), (ref, ref_opt)):
            m(**batch).backward()
            o.step()
            o.zero_grad(set_to_none=True)
        for s in lam:
            s.step()
        sched["errors"].update({f"step{step}:{n}": e for n, e in _params_err(pm, ref).items()})
    sched["lr_after"] = opt.param_groups[0]["lr"]
    return sched


def _memtracker(spec, plan_json, batches) -> dict:
    """(4) MemTracker.track_external accepts it; the states it measures are this rank's shards."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    pm, _, _ = _setup(spec, plan_json)
    opt = autopar.make_optimizer(pm, torch.optim.AdamW, lr=1e-2, eps=1e-6)
    pm(**batches[0]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    mt = MemTracker()
    mem = {"accepted": True, "error": None}
    try:
        mt.track_external(pm, opt)
    except TypeError as e:
        mem.update(accepted=False, error=str(e))
    if mem["accepted"]:
        with mt:
            pm(**batches[1]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        snap = mt.get_tracker_snapshot("current")
        mem["opt_bytes"] = sum(v.get(_MemRefType.OPT, 0) for v in snap.values())
    local_states = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                local_states += getattr(v, "_local_tensor", v).nbytes
    mem["local_state_bytes"] = local_states
    mem["state_placements"] = sorted({str(getattr(st["exp_avg"], "placements", None)) for st in opt.state.values()})
    return mem


def _ckpt(spec, plan_json, batches, path) -> dict:
    """(5) autopar.save / autopar.load on the same plan: the next step equals the uninterrupted run's."""
    pm, ref, _ = _setup(spec, plan_json)
    opt = autopar.make_optimizer(pm, torch.optim.AdamW, lr=1e-2, eps=1e-6)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-6)
    for m, o in ((pm, opt), (ref, ref_opt)):
        m(**batches[0]).backward()
        o.step()
        o.zero_grad(set_to_none=True)
    autopar.save(path, pm, opt, step=1)
    for m, o in ((pm, opt), (ref, ref_opt)):       # the uninterrupted run goes on
        m(**batches[1]).backward()
        o.step()
    pm2, _, _ = _setup(spec, plan_json, seed=1)      # a fresh job: other weights, an empty optimizer
    opt2 = autopar.make_optimizer(pm2, torch.optim.AdamW, lr=1e-2, eps=1e-6)
    ckpt = {"extra": autopar.load(path, pm2, opt2), "errors": {}}
    pm2(**batches[1]).backward()
    opt2.step()
    p1 = dict(pm.named_parameters())
    for n, p in pm2.named_parameters():
        ckpt["errors"][f"resumed:{n}"] = _err(p, p1[n].detach().full_tensor())
    ckpt["errors"].update({f"ref:{n}": e for n, e in _params_err(pm2, ref).items()})
    ckpt["state_steps"] = sorted({float(st["step"]) for st in opt2.state.values()})
    return ckpt


def _plain(spec, plan_json, batches) -> dict:
    """A plain torch optimizer over ZeRO parameters: warned about (memory), numerically right."""
    pm, ref, _ = _setup(spec, plan_json)
    pm(**batches[0]).backward()
    ref(**batches[0]).backward()
    plain = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain.step()
    torch.optim.AdamW(ref.parameters(), lr=1e-3).step()
    return {"warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)],
            "errors": _params_err(pm, ref)}
