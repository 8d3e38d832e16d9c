"""Worker functions (module level, run in gloo processes) for the checkpoint tests.

Training draws each step's batch from torch's global RNG, so a resumed run repeats the uninterrupted
one's losses only if the model, the optimizer state, the step and the RNG state all come back.
"""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.models import build_model

SPEC, BATCH, SEQ, VOCAB = "gpt-tiny", 4, 16, 256
_MESHES: dict = {}


def _mesh(shape):
    shape = tuple(shape)
    if shape not in _MESHES:
        _MESHES[shape] = init_device_mesh("cpu", shape)
    return _MESHES[shape]


def _applied(plan_json: str, seed: int):
    torch.manual_seed(seed)
    model, _ = build_model(SPEC, batch=BATCH, seq=SEQ, device="cpu")
    plan = autopar.Plan.from_json(plan_json)
    pm = autopar.apply(model, plan, _mesh(plan.mesh.shape))
    return pm, torch.optim.AdamW(pm.parameters(), lr=1e-2)


def _batch() -> dict:
    idx = torch.randint(0, VOCAB, (BATCH, SEQ))
    return {"idx": idx, "labels": torch.roll(idx, -1, dims=1)}


def _step(pm, opt) -> float:
    loss = pm(**_batch())
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def train(rank: int, world: int, plan_json: str, steps: int, path: str | None = None, save_at: int | None = None,
          die_after_save: bool = False) -> list[float]:
    """Train ``steps`` steps from seed 0; with ``save_at`` save after that many steps. ``die_after_save``:
    every rank is killed (SIGKILL) halfway through the next step, after its forward and backward."""
    pm, opt = _applied(plan_json, seed=0)
    losses = []
    for step in range(steps):
        if step == save_at:
            autopar.save(path, pm, opt, step=step, note="between steps")
            if die_after_save:
                pm(**_batch()).backward()   # the next step is under way ...
                dist.barrier()
                os.kill(os.getpid(), signal.SIGKILL)   # ... when the job dies
        losses.append(_step(pm, opt))
    return losses


def resume(rank: int, world: int, plan_json: str, steps: int, path: str) -> dict:
    """A fresh process state (another seed), then load the checkpoint and train up to ``steps``."""
    pm, opt = _applied(plan_json, seed=123)
    extra = autopar.load(path, pm, opt)
    return {"extra": extra, "losses": [_step(pm, opt) for _ in range(extra["step"], steps)]}


def _full(t):
    return t.detach().full_tensor() if hasattr(t, "full_tensor") else t.detach()


def _snapshot(pm, opt) -> dict:
    """Full values of every parameter and AdamW moment, the placements, and the loss on a fixed batch."""
    out = {"params": {n: _full(p) for n, p in pm.named_parameters()},
           "exp_avg": {n: _full(opt.state[p]["exp_avg"]) for n, p in pm.named_parameters()},
           "placements": {n: str(getattr(p, "placements", None)) for n, p in pm.named_parameters()}}
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    with torch.no_grad():
        out["loss"] = float(pm(idx=idx, labels=torch.roll(idx, -1, dims=1)))
    return out


def save_state(rank: int, world: int, plan_json: str, path: str) -> dict:
    """Two training steps under one plan, save (step=2), and return the saved state in full."""
    pm, opt = _applied(plan_json, seed=0)
    for _ in range(2):
        _step(pm, opt)
    autopar.save(path, pm, opt, step=2)
    return _snapshot(pm, opt)


def load_state(rank: int, world: int, plan_json: str, path: str) -> dict:
    """Another init (seed 1) under another plan, load the checkpoint, return the state in full."""
    pm, opt = _applied(plan_json, seed=1)
    extra = autopar.load(path, pm, opt)
    return {**_snapshot(pm, opt), "extra": extra, "saved_plan_mesh": list(autopar.runtime.checkpoint.read_plan(path).mesh.shape)}
