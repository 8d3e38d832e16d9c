"""Worker functions (module level, run in the gloo pools) for the explicit front ends (autopar.frontend.explicit).

``check_cases`` runs several cases per launch. A case wraps a tiny LLaMA (4 query and 4 KV heads, so 1D on 4
ranks splits whole heads) with front ends given as a list of steps, e.g. ``[("tp", "1D", 2), ("dp", None),
("zero", 1)]``, builds AdamW *before* the first forward (so the rebinding of optimizers made before the plan
is exercised), runs one step and compares with one device: loss, every gradient (``full_tensor()``) and
every parameter after one AdamW step. It also records every collective of the step (runtime_model_check's
recorder) and returns the plan, so the parent can check the layout.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch

import autopar
from autopar.models.llama import Llama, LlamaConfig

RTOL, ATOL = 1e-4, 1e-5


def tiny_llama(seed: int = 0, batch: int = 4, seq: int = 8, n_kv_head: int = 4, d_model: int = 32,
               vocab: int = 64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, max_seq_len=16, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=d_model,
                      d_ff=2 * d_model)
    model = Llama(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = {"idx": torch.randint(0, vocab, (batch, seq), generator=gen),
              "labels": torch.randint(0, vocab, (batch, seq), generator=gen)}
    return model, inputs


def _err(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> float:
    """Excess over the tolerance: <= 0 means allclose holds."""
    a, b = a.detach().float(), b.detach().float()
    return float(((a - b).abs() - (atol + rtol * b.abs())).max())


def wrap(model, steps, optimizer):
    from autopar.frontend import explicit as E

    criterion = None
    for step in steps:
        kind = step[0]
        if kind == "tp":
            model = E.TensorParallel(model, step[1], size=step[2])
        elif kind == "dp":
            model = E.DataParallel(model, size=step[1])
        elif kind == "pp":
            model = E.PipelineParallel(model, num_stages=step[1])
        elif kind == "amp":
            model, optimizer, criterion = E.convert_to_amp(model, optimizer, criterion)
        elif kind == "zero":
            optimizer = E.ZeroOptimizer(optimizer, model, stage=step[1])
    return model, optimizer


def run_case(steps, *, amp: bool = False, record: bool = True, seed: int = 0, batch: int = 4) -> dict:
    from runtime_model_check import recording

    model, inputs = tiny_llama(seed, batch=batch)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    pmodel, opt = wrap(model, steps, opt)
    out: dict = {"errors": {}}
    pipelined = any(s[0] == "pp" for s in steps)
    pm = pmodel.materialize(inputs)
    out["plan"] = pm.plan.to_json()
    out["opt_class"] = [c.__name__ for c in type(opt).__mro__[:3]]
    mesh = pm.mesh if hasattr(pm, "mesh") else None
    if pipelined:
        loss = pmodel.forward_backward(inputs)
        calls = []
    elif record:
        with recording(mesh) as rec:
            rec.phase = "fwd"
            loss = pmodel(**inputs)
            rec.phase = "bwd"
            loss.backward()
        calls = rec.calls
    else:
        loss = pmodel(**inputs)
        loss.backward()
        calls = []
    out["calls"] = sorted(Counter(calls).items())
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with ctx:
        ref_loss = ref(**inputs)
    ref_loss.backward()
    tol = {"rtol": 2e-2, "atol": 2e-3} if amp else {}
    out["errors"]["loss"] = _err(loss, ref_loss, **tol)
    out["loss"], out["ref_loss"] = float(loss.detach()), float(ref_loss.detach())
    refp = dict(ref.named_parameters())
    seen = 0
    for name, p in pmodel.named_parameters():
        g = p.grad
        if g is None:
            out["errors"][f"grad:{name}"] = float("inf")
            continue
        out["errors"][f"grad:{name}"] = _err(g.full_tensor() if hasattr(g, "full_tensor") else g, refp[name].grad,
                                             **tol)
        seen += 1
        out.setdefault("checked_names", []).append(name)
    out["params_checked"] = seen
    out["param_dtypes"] = sorted({str(p.dtype) for p in pmodel.parameters()})
    opt.step()
    torch.optim.AdamW(ref.parameters(), lr=1e-3, eps=1e-6).step()
    for name, p in pmodel.named_parameters():
        full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
        out["errors"][f"param:{name}"] = _err(full, refp[name].detach(), **tol)
    if amp:   # the bf16 path really ran: its loss differs from fp32's
        out["amp_vs_fp32"] = abs(float(ref_loss.detach()) - float(_fp32_loss(seed, batch)))
    return out


def _fp32_loss(seed: int, batch: int) -> torch.Tensor:
    model, inputs = tiny_llama(seed, batch=batch)
    return model(**inputs).detach()


def check_cases(rank: int, world: int, cases: list[dict]) -> list[dict]:
    out = []
    for case in cases:
        try:
            out.append(run_case(**case))
        except autopar.AutoparError as e:
            out.append({"error": f"{type(e).__name__}: {e}"})
    return out
