"""Tensor-parallel decoding: a HF LLaMA-style decoder (or autopar's built-in Llama) run on a 1-D device mesh with the placements an autopar
inference :class:`~autopar.core.plan.Plan` chose, so the engine's KV cache holds only this rank's kv heads.

The plan is autopar's inference plan (``autopar.plan(model, decode_inputs(batch), mesh_shape=(n,),
**decode_plan_options(kv_cache_bytes=...))``: the forward alone priced, with the KV cache the engine will hold
charged by the attention's head split, so where memory binds the planner shards the cache by kv heads); a
training plan is refused. This module decides, once, how each module runs the plan (:func:`decode_layouts`); two
executors apply the decision: by default the codegen pass :func:`autopar.codegen.shard_step.shard_step_graph` on the
captured step graph (``autopar.inference.step_graph``: this rank's weight slices and the plan's collectives in the
graph), and, for ``runner_path="interface"``/``"modules"`` or a model that cannot be captured, torch's own
tensor-parallel styles (``parallelize_module``, :func:`shard_for_decoding`). Where the plan's attention op (``scaled_dot_product_attention``) splits the heads of
q, k and v, the attention runs on local heads and the cache holds ``kv_heads / n`` heads per rank; where the
plan's ``down_proj`` reads its input split on the intermediate features, the MLP keeps its product local. Each
projection then runs its weight's placement: ``S(0)`` (output features) column-parallel, ``S(1)`` (input
features) row-parallel, ``R`` replicated, with its input gathered or its output sliced or reduced to what the
local attention / MLP reads. Embedding and LM head may be sharded either way (outputs gathered). Anything else
(a sharded norm, heads split for some of q, k, v only, kv heads that do not divide the mesh, a 2-D mesh,
fused-qkv GPT-2 attention, autopar's built-in GPT for the same reason) is refused with what is wrong named, rather than run differently from the plan.

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
from autopar.inference.builtin import builtin_dims, is_builtin
from autopar.models.gpt import GPT

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


def decode_inputs(batch: int, tokens: int = 1, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Example inputs of a decode step (``tokens=1``) or a prefill chunk for planning: ``batch`` sequences
    (``model``: name the input as its forward does: ``idx`` for autopar's built-in models, else ``input_ids``)."""
    return {"idx" if is_builtin(model) else "input_ids": torch.zeros(batch, tokens, dtype=torch.long)}


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
    d = decode_layouts(model, plan, world)
    return d.styles, d.names, d.kv_heads


@dataclass
class DecodeLayouts:
    """How ``plan`` runs each sharded module, decided once: torch styles (``styles``, ``names``) for the module
    path, and ``layouts`` (FQN -> (weight placement, input local, output local)) with the attention modules on
    local heads for the graph pass :func:`autopar.codegen.shard_step.shard_step_graph`."""
    styles: dict[str, object]
    names: dict[str, str]
    kv_heads: int
    layouts: dict[str, tuple[str, bool, bool]]
    local_heads: set[str]


def decode_layouts(model: nn.Module, plan: Plan, world: int) -> DecodeLayouts:
    """The decisions of :func:`decode_styles` with the layouts the graph pass reads (refusals the same)."""
    if plan.training:
        raise ConfigError("tensor-parallel decoding runs an inference plan; this plan was solved for a training "
                          "step (it prices backward and optimizer memory decoding never has): plan with "
                          "autopar.plan(..., options=decode_plan_options(kv_cache_bytes=...))")
    if len(plan.mesh.shape) != 1 or plan.mesh.shape[0] != world:
        raise MeshError(f"tensor-parallel decoding runs on a 1-D mesh of the world size ({world},); the plan is "
                        f"for a mesh {tuple(plan.mesh.shape)}")
    if isinstance(model, GPT):
        raise ConfigError("tensor-parallel decoding of autopar's built-in GPT is not supported: its attention is one "
                          "fused qkv projection, whose output-feature shards would mix q, k and v heads; serve it "
                          "on one device, or use the built-in Llama (separate q/k/v projections)")
    dims = builtin_dims(model)
    if dims is not None:
        heads, kv = dims["heads"], dims["kv_heads"]
    else:
        cfg = model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
    styles, names, covered, layouts, local_heads = {}, {}, set(), {}, set()
    local_kv = kv

    def put(fqn, name_style, place=None, local_in=False, local_out=False):
        name, style = name_style
        names[fqn] = name
        if style is not None:
            styles[fqn] = style
        if place is not None and (place != "R" or local_in or local_out):
            layouts[fqn] = (place, local_in, local_out)

    def lin(fqn, place, *, local_in, local_out):
        put(fqn, _linear_style(place, f"{fqn}.weight", local_in=local_in, local_out=local_out), place, local_in,
            local_out)

    for path, mod in model.named_modules():
        if all(hasattr(mod, n) for n in _ATTN):
            local = _attention_local(plan, path, heads, kv, world)
            pl = {n: _placement(plan, f"{path}.{n}.weight") for n in _ATTN}
            for n in _ATTN[:3]:
                lin(f"{path}.{n}", pl[n], local_in=False, local_out=local)
            lin(f"{path}.o_proj", pl["o_proj"], local_in=local, local_out=False)
            local_kv = kv // world if local else kv
            if local:
                local_heads.add(path)
            covered.update(f"{path}.{n}" for n in _ATTN)
        elif all(hasattr(mod, n) for n in _MLP):
            local = _mlp_local(plan, path)
            pl = {n: _placement(plan, f"{path}.{n}.weight") for n in _MLP}
            for n in _MLP[:2]:
                lin(f"{path}.{n}", pl[n], local_in=False, local_out=local)
            lin(f"{path}.down_proj", pl["down_proj"], local_in=local, local_out=False)
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
            put(path, ("vocab" if isinstance(mod, nn.Embedding) else "colwise", style), place)
        elif place == "S(1)":
            style = (ColwiseParallel(output_layouts=Replicate()) if isinstance(mod, nn.Embedding)
                     else RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
            put(path, ("colwise" if isinstance(mod, nn.Embedding) else "rowwise", style), place)
        elif place != "R":
            raise ConfigError(f"the plan places {path}.weight as {place}: tensor-parallel decoding cannot run it")
        covered.add(path)
    for fqn, place in plan.param_placements.items():
        owner = fqn.rsplit(".", 1)[0]
        if owner not in covered and any(p != "R" for p in place):
            raise ConfigError(f"the plan shards {fqn} as {place[0]}; tensor-parallel decoding runs only linear "
                              "and embedding weights sharded (pin it replicated: fix={'" + fqn + "': ['R']})")
    return DecodeLayouts(styles, names, local_kv, layouts, local_heads)


def shard_for_decoding(model: nn.Module, plan: Plan, mesh) -> DecodeSharding:
    """Shard ``model`` in place for ``plan`` on ``mesh`` (a 1-D torch DeviceMesh; collective on every rank)."""
    from torch.distributed.tensor.parallel import parallelize_module
    if mesh.ndim != 1:
        raise MeshError(f"tensor-parallel decoding runs on a 1-D mesh; got {mesh.ndim} dims")
    styles, names, kv = decode_styles(model, plan, mesh.size())
    if styles:
        parallelize_module(model, mesh, styles)
    return DecodeSharding(kv_heads=kv, world=mesh.size(), styles=names)
