"""Tensor-parallel decoding: a HF LLaMA-style decoder run on a 1-D device mesh with the placements an autopar
inference :class:`~autopar.core.plan.Plan` chose, so the engine's KV cache holds only this rank's kv heads.

The plan is autopar's inference plan (``autopar.plan(model, decode_inputs(batch), mesh_shape=(n,),
**decode_plan_options(kv_cache_bytes=...))``: the forward alone priced, with the KV cache the engine will hold
charged by the attention's head split, so where memory binds the planner shards the cache by kv heads); a
training plan is refused. This module executes it with torch's own tensor-parallel styles
(``parallelize_module``). Where the plan's attention op (``scaled_dot_product_attention``) splits the heads of
q, k and v, the attention runs on local heads and the cache holds ``kv_heads / n`` heads per rank; where the
plan's ``down_proj`` reads its input split on the intermediate features, the MLP keeps its product local. Each
projection then runs its weight's placement: ``S(0)`` (output features) column-parallel, ``S(1)`` (input
features) row-parallel, ``R`` replicated, with its input gathered or its output sliced or reduced to what the
local attention / MLP reads. Embedding and LM head may be sharded either way (outputs gathered). Anything else
(a sharded norm, heads split for some of q, k, v only, kv heads that do not divide the mesh, a 2-D mesh,
fused-qkv GPT-2 attention) is refused with what is wrong named, rather than run differently from the plan.

Every rank runs the same scheduler on the same requests and gets replicated logits, so ranks decide and
sample identically (seeded sampling uses the same generator on every rank).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from autopar.core.errors import ConfigError, MeshError
from autopar.core.options import PlanOptions
from autopar.core.plan import Plan

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_HEADS = ("S(1)", "S(-3)")      # the heads dim of an attention input [batch, heads, seq, head_dim]
_FEATURES = ("S(2)", "S(-1)")   # the feature dim of a projection's input [batch, seq, features]


@dataclass(frozen=True)
class DecodeSharding:
    """What the engine needs to know: kv heads held per rank, and the styles applied (module FQN -> name)."""
    kv_heads: int
    world: int
    styles: dict[str, str]


def decode_inputs(batch: int, tokens: int = 1) -> dict[str, torch.Tensor]:
    """Example inputs of a decode step (``tokens=1``) or a prefill chunk for planning: ``batch`` sequences."""
    return {"input_ids": torch.zeros(batch, tokens, dtype=torch.long)}


def decode_plan_options(*, kv_cache_bytes: int | str | None = None, **options) -> PlanOptions:
    """The plan options of tensor-parallel decoding: an inference plan (``training=False``) with the KV cache the
    engine will hold (bytes as one device would hold it), plus any other ``autopar.plan`` option."""
    return PlanOptions.from_kwargs(training=False, kv_cache_bytes=kv_cache_bytes, **options)


def _placement(plan: Plan, fqn: str) -> str:
    p = plan.param_placements.get(fqn)
    if p is None:
        raise ConfigError(f"the plan has no placement for parameter {fqn!r}: plan this model (autopar.plan)")
    return p[0]


def _op_sharding(plan: Plan, module: str, op: str):
    """(graph key, NodeSharding) of the first ``op`` the plan places inside module FQN ``module`` (a folded
    block's key, ``model.layers.*/self_attn/...``, stands for every block), or (None, None)."""
    for key, ns in plan.node_shardings.items():
        where, _, name = key.rpartition("/")
        if where and name.split("#")[0] == op and fnmatch.fnmatchcase(module, where.replace("/", ".")):
            return key, ns
    return None, None


def _attention_local(plan: Plan, path: str, heads: int, kv: int, world: int) -> bool:
    """Does the plan run this attention on local heads (its q, k and v split by heads)?"""
    key, ns = _op_sharding(plan, path, "scaled_dot_product_attention")
    if ns is None:
        raise ConfigError(f"the plan has no attention op (scaled_dot_product_attention) under {path}: plan the "
                          "model with its SDPA attention (attn_implementation='sdpa')")
    split = [ns.inputs[i] is not None and ns.inputs[i][0] in _HEADS for i in range(3)]
    if any(split) and not all(split):
        raise ConfigError(f"the plan splits the heads of only some of q, k, v at {key} ({ns.inputs[:3]}); "
                          "tensor-parallel decoding runs attention on local heads for all three or none")
    if all(split) and (heads % world or kv % world):
        raise ConfigError(f"the plan splits the heads at {key} {world} ways, but {heads} heads / {kv} kv heads do "
                          f"not divide by {world}: the KV cache cannot be sharded by kv heads; plan with "
                          f"fix={{'{key}': ['R']}} or on a mesh whose size divides the kv heads")
    return all(split)


def _mlp_local(plan: Plan, path: str) -> bool:
    """Does the plan's down_proj read its input split on the intermediate features (the product kept local)?"""
    _, ns = _op_sharding(plan, f"{path}.down_proj", "linear")
    return ns is not None and ns.inputs[0] is not None and ns.inputs[0][0] in _FEATURES


def _linear_style(place: str, fqn: str, *, local_in: bool, local_out: bool):
    """The torch style that runs this placement; ``local_in``: the input arrives as this rank's feature shard,
    ``local_out``: the consumer takes this rank's output shard (else the output is gathered)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
        PrepareModuleOutput,
        RowwiseParallel,
    )
    src = Shard(-1) if local_in else Replicate()
    dst = Shard(-1) if local_out else Replicate()
    if place == "S(0)":
        return "colwise", ColwiseParallel(input_layouts=src, output_layouts=dst)
    if place == "S(1)":
        return "rowwise", RowwiseParallel(input_layouts=src, output_layouts=dst)
    if place == "R":   # the whole weight on every rank: gather a local input, slice a local output
        if local_in and local_out:
            return "gather-input-slice-output", PrepareModuleInputOutput(
                input_layouts=(Shard(-1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                output_layouts=(Replicate(),), desired_output_layouts=(Shard(-1),), use_local_output=True)
        if local_in:
            return "gather-input", PrepareModuleInput(input_layouts=(Shard(-1),), desired_input_layouts=(Replicate(),),
                                                      use_local_output=True)
        if local_out:
            return "slice-output", PrepareModuleOutput(output_layouts=(Replicate(),),
                                                       desired_output_layouts=(Shard(-1),), use_local_output=True)
        return "replicate", None
    raise ConfigError(f"the plan places {fqn} as {place}, which tensor-parallel decoding cannot run "
                      "(S(0), S(1) or R on a 1-D mesh)")


def decode_styles(model: nn.Module, plan: Plan, world: int) -> tuple[dict[str, object], dict[str, str], int]:
    """(module FQN -> torch style, FQN -> style name, kv heads per rank) for ``plan`` on ``world`` ranks."""
    if plan.training:
        raise ConfigError("tensor-parallel decoding runs an inference plan; this plan was solved for a training "
                          "step (it prices backward and optimizer memory decoding never has): plan with "
                          "autopar.plan(..., options=decode_plan_options(kv_cache_bytes=...))")
    if len(plan.mesh.shape) != 1 or plan.mesh.shape[0] != world:
        raise MeshError(f"tensor-parallel decoding runs on a 1-D mesh of the world size ({world},); the plan is "
                        f"for a mesh {tuple(plan.mesh.shape)}")
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    styles, names, covered = {}, {}, set()
    local_kv = kv

    def put(fqn, name_style):
        name, style = name_style
        names[fqn] = name
        if style is not None:
            styles[fqn] = style

    for path, mod in model.named_modules():
        if all(hasattr(mod, n) for n in _ATTN):
            local = _attention_local(plan, path, heads, kv, world)
            pl = {n: _placement(plan, f"{path}.{n}.weight") for n in _ATTN}
            for n in _ATTN[:3]:
                put(f"{path}.{n}", _linear_style(pl[n], f"{path}.{n}.weight", local_in=False, local_out=local))
            put(f"{path}.o_proj", _linear_style(pl["o_proj"], f"{path}.o_proj.weight", local_in=local, local_out=False))
            local_kv = kv // world if local else kv
            covered.update(f"{path}.{n}" for n in _ATTN)
        elif all(hasattr(mod, n) for n in _MLP):
            local = _mlp_local(plan, path)
            pl = {n: _placement(plan, f"{path}.{n}.weight") for n in _MLP}
            for n in _MLP[:2]:
                put(f"{path}.{n}", _linear_style(pl[n], f"{path}.{n}.weight", local_in=False, local_out=local))
            put(f"{path}.down_proj", _linear_style(pl["down_proj"], f"{path}.down_proj.weight", local_in=local,
                                                   local_out=False))
            covered.update(f"{path}.{n}" for n in _MLP)
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    for path, mod in model.named_modules():
        if path in covered or not isinstance(mod, (nn.Embedding, nn.Linear)):
            continue
        place = _placement(plan, f"{path}.weight")
        if place == "S(0)":      # Embedding: vocab rows (masked lookup + all-reduce); Linear: output features
            style = (RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
                     if isinstance(mod, nn.Embedding) else ColwiseParallel(output_layouts=Replicate()))
            put(path, ("vocab" if isinstance(mod, nn.Embedding) else "colwise", style))
        elif place == "S(1)":
            style = (ColwiseParallel(output_layouts=Replicate()) if isinstance(mod, nn.Embedding)
                     else RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
            put(path, ("colwise" if isinstance(mod, nn.Embedding) else "rowwise", style))
        elif place != "R":
            raise ConfigError(f"the plan places {path}.weight as {place}: tensor-parallel decoding cannot run it")
        covered.add(path)
    for fqn, place in plan.param_placements.items():
        owner = fqn.rsplit(".", 1)[0]
        if owner not in covered and any(p != "R" for p in place):
            raise ConfigError(f"the plan shards {fqn} as {place[0]}; tensor-parallel decoding runs only linear "
                              "and embedding weights sharded (pin it replicated: fix={'" + fqn + "': ['R']})")
    return styles, names, local_kv


def shard_for_decoding(model: nn.Module, plan: Plan, mesh) -> DecodeSharding:
    """Shard ``model`` in place for ``plan`` on ``mesh`` (a 1-D torch DeviceMesh; collective on every rank)."""
    from torch.distributed.tensor.parallel import parallelize_module
    if mesh.ndim != 1:
        raise MeshError(f"tensor-parallel decoding runs on a 1-D mesh; got {mesh.ndim} dims")
    styles, names, kv = decode_styles(model, plan, mesh.size())
    if styles:
        parallelize_module(model, mesh, styles)
    return DecodeSharding(kv_heads=kv, world=mesh.size(), styles=names)
