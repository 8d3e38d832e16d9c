"""HuggingFace models as users write them, checked on gloo ranks (module level: the pools import it by name).

``build_hf(kind)`` builds a 4-layer LlamaForCausalLM from its default config (``use_cache`` left as it
comes: True) either bare (returning its ModelOutput with a DynamicCache) or wrapped in a module whose
``forward(**kwargs)`` returns the loss."""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh
from zoo.models import build

import autopar

RTOL, ATOL = 1e-4, 1e-5


def build_hf(kind: str):
    """The zoo's 4-layer HF LLaMA (default config, ``use_cache`` as it comes), bare or in the **kwargs wrapper."""
    return build("llama", kind)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a.detach(), b.detach(), rtol=RTOL, atol=ATOL))


def check_hf_as_written(rank: int, world: int, kind: str, mesh_shape: tuple[int, ...], plan_json: str) -> dict:
    """Apply a plan to the model, run forward + backward, compare with one device: loss, every gradient,
    and for the bare model the returned structure (ModelOutput with the cache) and its tensors."""
    model, inputs = build_hf(kind)
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", mesh_shape)
    pm = autopar.parallelize(model, mesh, inputs, plan=autopar.Plan.from_json(plan_json))
    out, ref_out = pm(**inputs), ref(**inputs)
    res: dict = {"output_type": type(out).__name__}
    loss, ref_loss = (out, ref_out) if kind == "kwargs" else (out.loss, ref_out.loss)
    res["loss_ok"] = _close(loss, ref_loss)
    if kind == "bare":
        res["logits_ok"] = _close(out.logits, ref_out.logits)
        res["cache_type"] = type(out.past_key_values).__name__
        mine, theirs = out.past_key_values, ref_out.past_key_values
        res["cache_layers"] = (len(mine.layers), len(theirs.layers))
        res["cache_ok"] = all(_close(a.keys, b.keys) and _close(a.values, b.values)
                              for a, b in zip(mine.layers, theirs.layers))
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    res["missing_grads"] = [n for n, p in pm.named_parameters() if ref_params[n].grad is not None and p.grad is None]
    res["bad_grads"] = [n for n, p in pm.named_parameters() if p.grad is not None and
                        not _close(p.grad.full_tensor(), ref_params[n].grad)]
    res["num_params"] = len(ref_params)
    try:   # a non-tensor input that differs from the captured one is refused, not silently ignored
        pm(**inputs, use_cache=False) if kind == "bare" else pm(**inputs, output_attentions=True)
        res["changed_flag_error"] = None
    except autopar.PlanMismatchError as e:
        res["changed_flag_error"] = str(e)
    return res
