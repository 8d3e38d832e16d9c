"""Helpers for tests/codegen/test_fuse_kernels.py (module level: kernel_checks also runs
``graph_numerics`` in its TRITON_INTERPRET=1 subprocess).

``graph_numerics`` runs a captured model's graph as captured and after ``fuse_kernels`` on the same
parameters and inputs, and reports the loss and every parameter gradient's excess over the fp32
tolerance (rtol 1e-4, atol 1e-5; <= 0: within it) and the fusions applied.
"""
from __future__ import annotations

import torch

RTOL, ATOL = 1e-4, 1e-5


def _excess(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(((a - b).abs() - (ATOL + RTOL * b.abs())).max())


def run_graph(gm, cap, model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of ``gm`` (a graph with the captured placeholders)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    leaves = {fqns[0]: params[fqns[0]].detach().clone().requires_grad_() for fqns in cap.param_fqns.values()}
    args = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        if n.name in cap.param_fqns:
            args.append(leaves[cap.param_fqns[n.name][0]])
        elif n.name in cap.buffer_fqns:
            args.append(buffers[cap.buffer_fqns[n.name]])
        else:
            spec = next(i for i in cap.user_inputs if i.name == n.name)
            args.append(inputs[spec.arg or spec.name])
    loss = gm(*args)[0]
    loss.backward()
    return loss, {k: v.grad for k, v in leaves.items()}


def graph_numerics(spec: str, batch: int = 2, seq: int = 8, device: str = "cpu") -> dict:
    from autopar.core.capture import capture
    from autopar.codegen.context import copy_graph_module
    from autopar.codegen.drop_asserts import drop_asserts
    from autopar.codegen.fuse_kernels import fuse_kernels
    from autopar.models import build_model

    torch.manual_seed(0)
    model, inputs = build_model(spec, batch=batch, seq=seq, device=device)
    cap = capture(model, inputs, fold_layers=False)
    plain = drop_asserts(copy_graph_module(cap.program.graph_module), None)
    fused = fuse_kernels(drop_asserts(copy_graph_module(cap.program.graph_module), None), None)
    loss, grads = run_graph(plain, cap, model, inputs)
    floss, fgrads = run_graph(fused, cap, model, inputs)
    from autopar.runtime_kernels import _triton

    return {"fusions": fused.meta["autopar_fusions"], "loss": _excess(floss, loss),
            "grads": {k: _excess(fgrads[k], grads[k]) for k in grads},
            "kernels": _triton.use_triton(loss), "code": fused.code}


# a GPT plan on 2 ranks whose logits are split over the vocabulary (the loss runs the sharded form)
VOCAB_PARALLEL = {"fix": {"input:*": ["R"], "param:wte.weight": ["S(0)"]},
                  "prefer": {"*linear#*": ["S(2)"], "*flatten#0": ["S(1)"]}}
