"""Worker functions (module level, run in the gloo pools) that check given plan JSONs against one device.

``check_plans`` is ``parallel_check.check_training_step`` for plans made elsewhere (the random plans
of ``autopar.solver.random_plan``): per plan it builds the model with the same seed on every rank,
keeps a single-device copy, applies the plan with ``autopar.apply`` and compares the loss, every
parameter gradient and the parameters after one AdamW step (fp32: rtol 1e-4, atol 1e-5). A plan
that fails to apply or run is reported with its error instead of stopping the batch (every rank
raises the same error in apply, so the process group stays in step).
"""
from __future__ import annotations

import copy
import time

import torch
from parallel_check import _err
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.models import build_model

_MESHES: dict = {}


def _mesh(shape: tuple[int, ...]):
    if shape not in _MESHES:  # one DeviceMesh per shape per worker (a pool runs many batches)
        _MESHES[shape] = init_device_mesh("cpu", shape)
    return _MESHES[shape]


def build_inputs_for(spec: str, batch: int, seq: int):
    """A built-in model spec, or ``zoo:<name>:<kind>`` for a HuggingFace model of tests/zoo (its own shapes)."""
    if spec.startswith("zoo:"):
        from zoo.models import build
        _, name, kind = spec.split(":")
        return build(name, kind)
    torch.manual_seed(0)
    return build_model(spec, batch=batch, seq=seq, device="cpu")


def _loss(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def check_one(spec: str, plan_json: str, batch: int, seq: int) -> dict[str, float]:
    """name -> excess error over the tolerance (<= 0 passes) for one plan on this rank."""
    model, inputs = build_inputs_for(spec, batch, seq)
    ref = copy.deepcopy(model)
    plan = autopar.Plan.from_json(plan_json)
    pm = autopar.apply(model, plan, _mesh(tuple(plan.mesh.shape)))
    errors = {}
    loss, ref_loss = _loss(pm(**inputs)), _loss(ref(**inputs))
    errors["loss"] = _err(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in pm.named_parameters():
        if ref_params[name].grad is None:      # a parameter this loss does not reach (e.g. BERT's pooler)
            continue
        errors[f"grad:{name}"] = (_err(p.grad.full_tensor(), ref_params[name].grad) if p.grad is not None
                                  else float("inf"))
    # lr 1e-3 (see parallel_check.check_training_step) and eps 1e-6 (as the HF check): Adam's first step
    # moves a weight by lr * g / (|g| + eps), whose slope in g is up to lr / eps. Random plans meet
    # gradient elements at rounding-noise size: seed 1025 (llama-tiny, k_proj) has g = -9.43e-10 on one
    # device and -8.16e-10 in parallel (1.3e-10 apart, within the gradient tolerance by 5 orders), which
    # eps 1e-8 turns into a 1.08e-5 weight difference; eps 1e-6 keeps the step a test of the gradients.
    for m in (pm, ref):
        torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6).step()
    for name, p in pm.named_parameters():
        errors[f"param:{name}"] = _err(p.detach().full_tensor(), ref_params[name].detach())
    return errors


def check_plans(rank: int, world: int, cases: list[tuple[str, str, int]], batch: int = 4, seq: int = 16) -> list[dict]:
    """``cases``: (model spec, plan JSON, seed). Per case: seed, spec, mesh, ok, the worst error and its
    name, or the exception ``error`` text when the plan did not apply or run; and seconds taken."""
    out = []
    for spec, plan_json, seed in cases:
        t0 = time.perf_counter()
        row = {"seed": seed, "spec": spec, "mesh": autopar.Plan.from_json(plan_json).mesh.shape}
        try:
            errors = check_one(spec, plan_json, batch, seq)
            worst = max(errors, key=errors.get)
            row.update(ok=all(v <= 0 for v in errors.values()), worst=worst, worst_excess=errors[worst],
                       failing=sorted(k for k, v in errors.items() if not v <= 0))
        except Exception as e:  # noqa: BLE001 - reported per plan, checked in the parent
            row.update(ok=False, error=f"{type(e).__name__}: {e}")
        row["seconds"] = time.perf_counter() - t0
        out.append(row)
    return out


# ------------------------------------------------------------------------- plans, made in the parent

SPECS = ("gpt-tiny", "llama-tiny")
MESHES = ((2,), (2, 2))
_CAPTURES: dict = {}


def case_for(seed: int) -> tuple[str, tuple[int, ...]]:
    """The model spec and mesh a seed fuzzes: seeds cycle through every (spec, mesh) pair."""
    return SPECS[seed % len(SPECS)], MESHES[(seed // len(SPECS)) % len(MESHES)]


def make_case(seed: int, batch: int = 4, seq: int = 16) -> tuple[str, str, int]:
    """(spec, random plan JSON, seed) for ``check_plans``; captures are cached per spec."""
    spec, mesh = case_for(seed)
    return make_case_for(spec, mesh, seed, batch, seq)


def make_case_for(spec: str, mesh: tuple[int, ...], seed: int, batch: int = 4, seq: int = 16
                  ) -> tuple[str, str, int]:
    """``make_case`` for a given spec (a built-in or ``zoo:<name>:<kind>``) and mesh."""
    from autopar.cluster.profile import load_cluster
    from autopar.core.mesh import MeshSpec
    from autopar.frontend.planning import capture_exact
    from autopar.solver.random_plan import random_plan

    if (spec, batch, seq) not in _CAPTURES:
        if spec.startswith("zoo:"):
            model, inputs = build_inputs_for(spec, batch, seq)
        else:
            model, inputs = build_model(spec, batch=batch, seq=seq, device="meta")
        _CAPTURES[(spec, batch, seq)] = capture_exact(model, inputs)
    plan = random_plan(_CAPTURES[(spec, batch, seq)], MeshSpec.make(mesh, None), load_cluster("cpu-gloo"), seed)
    return spec, plan.to_json(), seed
