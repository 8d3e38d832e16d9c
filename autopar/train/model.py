"""The job's model and how a batch of samples is fed to it.

``build_model(cfg)`` returns the module ``[model] source`` names (built on CPU from ``init_seed``, the same
weights on every rank) and an :class:`Adapter`: ``inputs(batch)`` turns the loader's batch into the
forward's keyword arguments, ``loss(output)`` finds the loss in what the forward returns (a tensor, a
``.loss`` attribute, a ``"loss"`` key or the first element), ``vocab_size`` bounds synthetic token ids.
Token batches (``{"tokens": [b, seq_len + 1]}``) become ``idx`` / ``labels`` (next tokens) for autopar's
built-in models and a ``module:callable`` model, and ``input_ids`` / ``labels`` (the model shifts them) for
HF models. An HF model whose weights are loaded from its directory is built with its parameters on the meta
device (:func:`parameters_on_meta`: no storage, no random initialization; buffers real); ``load_hf_weights``
allocates and fills them. A parallel run still allocates the whole model (uninitialized) before planning
(``autopar.train.loop``: graphs captured from meta parameters are not run on CPU yet). Must not: plan, shard or
train.
"""
from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from autopar.core.errors import ConfigError
from autopar.models import BUILTIN_MODELS
from autopar.models import build_model as build_builtin

__all__ = ["Adapter", "build_model", "loss_of", "parameters_on_meta", "to_device"]


def loss_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "loss", None) is not None:
        return out.loss
    if isinstance(out, dict) and "loss" in out:
        return out["loss"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"the model's forward returned {type(out).__name__}, with no loss in it: return the loss "
                      f"(a tensor), or an object with .loss, or a dict with 'loss'")


@dataclass
class Adapter:
    kind: str
    """``builtin`` (idx/labels), ``hf`` (input_ids/labels) or ``passthrough`` (the batch as keywords)."""
    vocab_size: int = 0
    hf_dir: Path | None = None
    """An HF model directory whose weights ``autopar.train.hf_io.load_hf_weights`` reads after sharding."""
    hf_config: object = None

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "tokens" not in batch or self.kind == "passthrough":
            return batch
        t = batch["tokens"]
        if self.kind == "hf":
            return {"input_ids": t[:, :-1], "labels": t[:, :-1]}
        return {"idx": t[:, :-1], "labels": t[:, 1:]}

    @staticmethod
    def loss(out) -> torch.Tensor:
        return loss_of(out)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside keep their parameters on the meta device: each is moved there as it is registered
    (one parameter's storage exists for a moment, never the model's), while buffers stay real. torch's own meta
    flow (``with torch.device("meta")`` then ``to_empty``) would leave buffers computed at construction (HF's
    rotary ``inv_freq``, which no checkpoint holds) uninitialized. A Parameter registered twice under two names
    before it is first registered would become two; HF ties weights after registration, so they stay one."""
    real = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        real(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = real


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)``, leaving parameters on the meta device there (they are allocated when sharded or
    loaded)."""
    if not any(p.is_meta for p in model.parameters()):
        return model.to(device)
    for mod in model.modules():
        for name, b in mod._buffers.items():
            if b is not None and not b.is_meta:
                mod._buffers[name] = b.to(device)
        for name, p in mod._parameters.items():
            if p is not None and not p.is_meta and p.device != device:
                raise ConfigError(f"parameter {name!r} of {type(mod).__name__} is on {p.device} while others are on "
                                  f"the meta device; build the model with all parameters on one device")
    return model


def _hf_model(cfg_path: Path, model_dir: Path | None) -> tuple[nn.Module, Adapter]:
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.source is an HF model: pip install transformers safetensors") from None
    config = transformers.AutoConfig.from_pretrained(str(cfg_path.parent if cfg_path.name == "config.json"
                                                         else cfg_path))
    config.use_cache = False                       # training: no KV cache in the outputs
    has_weights = model_dir is not None and any((model_dir / f).is_file() for f in (
        "model.safetensors", "model.safetensors.index.json"))
    with parameters_on_meta() if has_weights else contextlib.nullcontext():   # the weights come from the files
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model, Adapter("hf", vocab_size=int(config.vocab_size), hf_dir=model_dir if has_weights else None,
                          hf_config=config)


def build_model(cfg) -> tuple[nn.Module, Adapter]:
    """The job's model (``cfg`` a TrainConfig), initialized from ``model.init_seed`` on CPU."""
    src = cfg.model.source
    torch.manual_seed(cfg.model.init_seed)
    if src in BUILTIN_MODELS:
        model, _ = build_builtin(src, batch=1, seq=cfg.data.seq_len, device="cpu")
        adapter = Adapter("builtin", vocab_size=BUILTIN_MODELS[src].vocab_size)
    elif ":" in src and not cfg.path(src).exists():
        mod_name, _, fn_name = src.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"model.source {src!r}: cannot import {fn_name!r} from {mod_name!r}: {e}") from None
        made = fn()
        model = made[0] if isinstance(made, tuple) else made
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.source {src!r} returned {type(model).__name__}, not an nn.Module")
        adapter = Adapter("builtin", vocab_size=int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0))
    else:
        p = cfg.path(src)
        if p.is_dir() and (p / "config.json").is_file():
            model, adapter = _hf_model(p / "config.json", p)
        elif p.is_file() and p.suffix == ".json":
            if "model_type" not in json.loads(p.read_text()):
                raise ConfigError(f"model.source {src!r}: not an HF config.json (no model_type)")
            model, adapter = _hf_model(p, None)
        else:
            raise ConfigError(f"model.source {src!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), an "
                              f"HF model directory with config.json, an HF config.json, nor module:callable")
    dtype = getattr(torch, cfg.model.dtype)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, adapter
