"""Tensor-parallel decoding: a HF LLaMA-style decoder run on a 1-D device mesh with the parameter placements
an autopar :class:`~autopar.core.plan.Plan` chose, so the engine's KV cache holds only this rank's kv heads.

The plan is autopar's (``autopar.plan`` on the model's forward over a decode-sized batch); this module executes
its parameter placements with torch's own tensor-parallel styles (``parallelize_module``), per linear layer:
``S(0)`` (output features) runs column-parallel, ``S(1)`` (input features) row-parallel with an all-reduce,
``R`` replicated. When q, k and v are all ``S(0)`` (and both head counts divide the mesh) the attention runs on
local heads and the cache is sharded by kv heads; an ``R`` or ``S(0)`` ``o_proj`` after them gathers its input
first. The MLP is handled the same way (``gate``/``up`` ``S(0)`` keep the product local). Embedding and LM head
may be sharded either way (outputs gathered). Anything else (a sharded norm, a 2-D mesh, fused-qkv GPT-2
attention) is refused with the parameter named, rather than run differently from the plan.

Every rank runs the same scheduler on the same requests and gets replicated logits, so ranks decide and
sample identically (seeded sampling uses the same generator on every rank).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from autopar.core.errors import ConfigError, MeshError
from autopar.core.plan import Plan

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecodeSharding:
    """What the engine needs to know: kv heads held per rank, and the styles applied (module FQN -> name)."""
    kv_heads: int
    world: int
    styles: dict[str, str]


def _placement(plan: Plan, fqn: str) -> str:
    p = plan.param_placements.get(fqn)
    if p is None:
        raise ConfigError(f"the plan has no placement for parameter {fqn!r}: plan this model (autopar.plan)")
    return p[0]


def _linear_style(place: str, fqn: str, *, local_in: bool, local_out: bool):
    """The torch style that runs this placement; ``local_in``: the input arrives as this rank's feature shard,
    ``local_out``: the consumer takes this rank's output shard (else the output is gathered)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel
    src = Shard(-1) if local_in else Replicate()
    if place == "S(0)":
        return "colwise", ColwiseParallel(input_layouts=src, output_layouts=Shard(-1) if local_out else Replicate())
    if place == "S(1)":
        return "rowwise", RowwiseParallel(input_layouts=src, output_layouts=Replicate())
    if place == "R":
        if local_in:
            return "gather-input", PrepareModuleInput(input_layouts=(Shard(-1),), desired_input_layouts=(Replicate(),),
                                                      use_local_output=True)
        return "replicate", None
    raise ConfigError(f"the plan places {fqn} as {place}, which tensor-parallel decoding cannot run "
                      "(S(0), S(1) or R on a 1-D mesh)")


def decode_styles(model: nn.Module, plan: Plan, world: int) -> tuple[dict[str, object], dict[str, str], int]:
    """(module FQN -> torch style, FQN -> style name, kv heads per rank) for ``plan`` on ``world`` ranks."""
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
            pl = {n: _placement(plan, f"{path}.{n}.weight") for n in _ATTN}
            local = all(pl[n] == "S(0)" for n in _ATTN[:3]) and heads % world == 0 and kv % world == 0
            for n in _ATTN[:3]:
                put(f"{path}.{n}", _linear_style(pl[n], f"{path}.{n}.weight", local_in=False, local_out=local))
            put(f"{path}.o_proj", _linear_style(pl["o_proj"], f"{path}.o_proj.weight", local_in=local, local_out=False))
            local_kv = kv // world if local else kv
            covered.update(f"{path}.{n}" for n in _ATTN)
        elif all(hasattr(mod, n) for n in _MLP):
            pl = {n: _placement(plan, f"{path}.{n}.weight") for n in _MLP}
            local = pl["gate_proj"] == pl["up_proj"] == "S(0)"
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
