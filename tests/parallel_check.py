"""Worker functions (module level, run in the gloo pools) that check a parallel plan against one device.

``check_training_step`` builds a model on every rank with the same seed, keeps a single-device
copy, applies a plan (solved, or forced with ``fix``), then compares forward output, loss, every
parameter gradient (``full_tensor()``) and the parameters after one AdamW step.
"""
from __future__ import annotations

import copy
import fnmatch

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
                        prefer: dict | None = None, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    opts = {**(options or {}), **({"prefer": prefer} if prefer else {})}
    plans = opts.pop("plans", None)   # {"forward": json, "train": json}: solved by the caller, applied here
    if plans:
        from autopar.core.plan import Plan
        opts = {}
    model, inputs = build_model(spec, batch=batch, seq=seq, device=device)
    ref = copy.deepcopy(model)
    mesh = init_device_mesh(device, mesh_shape)
    out = {"errors": {}}
    if check_logits:  # the model without labels is another graph: plan and apply it on a copy
        logits_kw = {k: v for k, v in inputs.items() if k != "labels"}
        pm_fwd = autopar.parallelize(copy.deepcopy(model), mesh, logits_kw, fix=fix, **opts) if not plans else \
            autopar.parallelize(copy.deepcopy(model), mesh, logits_kw, plan=Plan.from_json(plans["forward"]))
        out["errors"]["forward"] = _err(pm_fwd(**logits_kw), ref(**logits_kw))
    pm = autopar.parallelize(model, mesh, inputs, fix=fix, **opts) if not plans else \
        autopar.parallelize(model, mesh, inputs, plan=Plan.from_json(plans["train"]))
    out["plan"] = pm.plan.to_dict()["param_placements"]
    out["deferred_grads"] = len(pm.graph_module.meta.get("autopar_deferred_grads", {}))
    out["reshards"] = pm.code().count("autopar_ops_parallel_ops_reshard(")
    loss, ref_loss = pm(**inputs), ref(**inputs)
    out["errors"]["loss"] = _err(loss, ref_loss)
    out["loss"] = float(loss.detach())
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, g in autopar.zero.full_grads(pm):   # param.grad, or the ZeRO-2 shard's where the plan has one
        out["errors"][f"grad:{name}"] = _err(g.full_tensor(), ref_params[name].grad)
    # lr 1e-3: some gradients are analytically zero (the key bias: softmax is shift invariant) and hold only
    # rounding noise (~1e-11); Adam's first step normalizes them to ~lr*noise/eps, so a large lr would compare noise.
    autopar.zero.optimizer(pm, torch.optim.AdamW, lr=1e-3).step()   # AdamW itself when the plan has no ZeRO
    torch.optim.AdamW(ref.parameters(), lr=1e-3).step()
    for name, p in pm.named_parameters():
        out["errors"][f"param:{name}"] = _err(p.detach().full_tensor(), ref_params[name].detach())
    out["placements_are_dtensors"] = all(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor"
                                         for p in pm.parameters())
    out.update(_structure(pm, ref))
    return out


def _structure(pm: torch.nn.Module, ref: torch.nn.Module) -> dict:
    """FQNs (with tied duplicates) of the parallel and the original module, each parameter's DTensor
    placements as printed in plans (None for a parameter that is not a DTensor), and tied-weight groups."""
    from autopar.core.placement import format_sharding

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


# ----------------------------------------------------------------------------------- HuggingFace models

HF_ARCHS = ("gpt2", "llama")


def build_hf_model(arch: str, *, batch: int = 4, seq: int = 16, seed: int = 0):
    """A small HF ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` (seeded) and ``{"input_ids", "labels"}``.

    No dropout (GPT-2's defaults are 0.1: two runs would draw different masks) and ``use_cache=False``
    (a DynamicCache in the output is not a pytree type torch.export knows)."""
    import transformers

    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                       max_position_embeddings=64, use_cache=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise ValueError(f"unknown HF arch {arch!r}; one of {HF_ARCHS}")
    model.train()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 128, (batch, seq), generator=gen)
    labels = torch.randint(0, 128, (batch, seq), generator=gen)
    return model, {"input_ids": ids, "labels": labels}


def check_hf_training_step(rank: int, world: int, arch: str, mesh_shape: tuple[int, ...], fix: dict | None = None,
                           options: dict | None = None, batch: int = 4, seq: int = 16, adam_eps: float = 1e-6,
                           plan: str | None = None) -> dict:
    """Like ``check_training_step`` for an HF causal LM: one forward with labels gives loss and logits
    (compared both), then every gradient and the parameters after one AdamW step (lr 1e-3).

    ``adam_eps`` 1e-6, not AdamW's 1e-8: Adam's first step moves each weight by lr * g / (|g| + eps), whose
    slope in g is up to lr / eps. HF GPT-2's gradients here are ~1e-3 with a few elements below 1e-7, where
    a 1e-9 rounding difference in g (any change of summation order: fp32 single-device vs float64 differs as
    much as the parallel result does) moves the weight by ~1e-4, far beyond atol 1e-5. With eps 1e-6 the
    slope is 100x smaller and the step still checks every sharded parameter's update."""
    model, inputs = build_hf_model(arch, batch=batch, seq=seq)
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", mesh_shape)
    if plan is not None:   # solved by the caller (the ILP on rank 0 would share the cores with spinning ranks)
        pm = autopar.parallelize(model, mesh, inputs, plan=autopar.Plan.from_json(plan))
    else:
        pm = autopar.parallelize(model, mesh, inputs, fix=fix, **(options or {}))
    out = {"errors": {}, "plan": {k: list(v) for k, v in pm.plan.param_placements.items()}}
    res, ref_res = pm(**inputs), ref(**inputs)
    out["output_type"] = type(res).__name__
    out["errors"]["loss"] = _err(res["loss"], ref_res["loss"])
    out["errors"]["logits"] = _err(res["logits"], ref_res["logits"])
    out["loss"] = float(res["loss"].detach())
    res["loss"].backward()
    ref_res["loss"].backward()
    ref_params = dict(ref.named_parameters())
    for name, g in autopar.zero.full_grads(pm):
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        out["errors"][f"grad:{name}"] = _err(g, ref_params[name].grad)
    autopar.zero.optimizer(pm, torch.optim.AdamW, lr=1e-3, eps=adam_eps).step()
    torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=adam_eps).step()
    for name, p in pm.named_parameters():
        full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
        out["errors"][f"param:{name}"] = _err(full, ref_params[name].detach())
    out.update(_structure(pm, ref))
    return out


# ------------------------------------------------------------------------- checks in the parent


def _forced(fix: dict, fqn: str) -> list[str] | None:
    """The placement ``fix`` pins for parameter ``fqn`` (first matching pattern, as the solver reads it)."""
    for pat, sh in fix.items():
        if pat.startswith("param:") and fnmatch.fnmatchcase(f"param:{fqn}", pat):
            return list(sh)
    return None


def assert_step_result(results: list[dict], fix: dict | None, *, case: str) -> None:
    """Numerics, FQNs, tied weights and DTensor placements of every rank's result."""
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["errors"].items() if not v <= 0}
        assert not bad, f"{case} rank {rank}: beyond rtol=1e-4/atol=1e-5 by {bad}; plan {r['plan_placements']}"
        assert r["fqns"] == r["ref_fqns"], f"{case}: parameter FQNs changed"
        assert r["tied"] == r["ref_tied"], f"{case}: tied parameters {r['ref_tied']} became {r['tied']}"
        assert set(r["plan_placements"]) == set(r["fqns"]), f"{case}: plan and module name different parameters"
        wrong = {n: (pl, r["plan_placements"][n]) for n, pl in r["placements"].items()
                 if pl != r["plan_placements"][n]}
        assert not wrong, f"{case}: DTensor placements differ from the plan's (have, plan): {wrong}"
        if fix is not None:
            ignored = {n: (pl, _forced(fix, n)) for n, pl in r["plan_placements"].items() if pl != _forced(fix, n)}
            assert not ignored, f"{case}: the plan ignores the fix (plan, fix): {ignored}"


# ----------------------------------------------------------------------------------- ZeRO-1 / ZeRO-2


def zero_plans(spec: str, mesh_shape: tuple[int, ...], zero: int, fix: dict | None = None, batch: int = 4,
               seq: int = 16) -> dict[str, str]:
    """The plans ``check_zero_step`` applies (with ZeRO ``zero`` and without), solved in the calling process:
    on rank 0 of a pool the ILP shares the cores with ranks spinning in the plan's broadcast."""
    model, inputs = build_model(spec, batch=batch, seq=seq, device="meta")
    return {name: autopar.plan(model, inputs, mesh_shape=mesh_shape, fix=fix, cluster="cpu-gloo", zero=z).to_json()
            for name, z in (("zero", zero), ("base", 0))}


def check_zero_step(rank: int, world: int, spec: str, mesh_shape: tuple[int, ...], zero: int,
                    fix: dict | None = None, batch: int = 4, seq: int = 16, plans: dict | None = None) -> dict:
    """One step under a plan with ZeRO ``zero`` (1: optimizer states sharded, 2: gradients too) against one
    device: loss, every ``param.grad`` (``full_tensor()``; under ZeRO-2 a DTensor holding this rank's shard), every parameter after one AdamW
    step through ``autopar.zero.optimizer``; and per rank the measured bytes (``autopar.memory``) of the
    optimizer states and gradients at the end of a second step, next to those of the same plan without ZeRO."""
    from autopar import memory, zero as Z

    torch.manual_seed(0)
    model, inputs = build_model(spec, batch=batch, seq=seq, device="cpu")
    ref = copy.deepcopy(model)
    base = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", mesh_shape)
    # plans: {"zero": JSON, "base": JSON} solved by the caller (``zero_plans``), else solved here on rank 0
    given = {k: autopar.Plan.from_json(v) for k, v in (plans or {}).items()}
    pm = autopar.parallelize(model, mesh, inputs, plan=given["zero"]) if "zero" in given else \
        autopar.parallelize(model, mesh, inputs, fix=fix, cluster="cpu-gloo", zero=zero)
    out = {"errors": {}, "optimizer_sharding": dict(pm.plan.optimizer_sharding),
           "gradient_sharding": dict(pm.plan.gradient_sharding)}
    loss, ref_loss = pm(**inputs), ref(**inputs)
    out["errors"]["loss"] = _err(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in pm.named_parameters():         # param.grad under ZeRO-2 too (this rank's shard as a DTensor)
        out["errors"][f"grad:{name}"] = _err(p.grad.full_tensor(), ref_params[name].grad)
    opt = Z.optimizer(pm, torch.optim.AdamW, lr=1e-3)
    out["optimizer_type"] = type(opt).__name__
    opt.step()
    torch.optim.AdamW(ref.parameters(), lr=1e-3).step()
    for name, p in pm.named_parameters():
        out["errors"][f"param:{name}"] = _err(p.detach().full_tensor(), ref_params[name].detach())
    out.update(_structure(pm, ref))
    out["is_torch_optimizer"] = isinstance(opt, torch.optim.AdamW)
    # a plain torch optimizer keeps whole states per rank (more memory than the plan budgeted): warned about
    # (it steps correctly: param.grad holds every gradient, tests/test_zero_optimizer.py); lr=0, nothing moves
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.optim.AdamW(pm.parameters(), lr=0.0, weight_decay=0.0).step()
    out["plain_optimizer_warning"] = next((str(w.message) for w in caught if "ZeRO" in str(w.message)), None)
    # what the plan says each rank holds: AdamW's two states (plus a 4-byte step counter) and, for ZeRO-2,
    # the gradient, of each parameter's local tensor divided by its ZeRO ways
    from autopar.core.placement import zero_sharding
    out["zero_able"], out["expected"] = [], {"optimizer": 0, "grads": 0}
    for name, p in pm.named_parameters():
        if zero_sharding(p.shape, tuple(p.placements), mesh_shape) is not None:
            out["zero_able"].append(name)
        ways = 1
        for q, zq, n in zip(p.placements, pm.plan.optimizer_sharding.get(name, p.placements), mesh_shape):
            ways *= n if str(q) != str(zq) else 1
        nbytes = p._local_tensor.numel() * 4
        out["expected"]["optimizer"] += 2 * nbytes // ways + 4
        out["expected"]["grads"] += nbytes // (ways if name in pm.plan.gradient_sharding else 1)
    # memory of a steady-state step (states exist), with and without ZeRO
    pb = autopar.parallelize(base, mesh, inputs, plan=given["base"]) if "base" in given else \
        autopar.parallelize(base, mesh, inputs, fix=fix, cluster="cpu-gloo", zero=0)
    ob = torch.optim.AdamW(pb.parameters(), lr=1e-3)
    pb(**inputs).backward()
    ob.step()
    out["memory"] = {}
    for name, m, o, inner in (("zero", pm, opt, getattr(opt, "optimizer", opt)), ("base", pb, ob, ob)):
        o.zero_grad(set_to_none=True)
        with memory.track(m, inner) as t:
            m(**inputs).backward()
            o.step()
        out["memory"][name] = t.report.to_dict()
    return out
