"""Built-in model specs for the CLI and demos: a name (or ``module:callable``) -> model + example inputs.

The built-ins are the plain-torch models of this package (``autopar.models.gpt``, ``autopar.models.llama``)
at published sizes (GPT-2, Llama 3) and two tiny ones for demos and tests; they ship with the package,
so every CLI command works after ``pip install .``. On ``device="meta"`` nothing is allocated:
llama3-70b builds in a few seconds with no parameter memory. This module imports only autopar's
errors and must not capture, plan or run anything.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from autopar.core.errors import ConfigError

__all__ = ["BUILTIN_MODELS", "ExampleInputs", "ModelSpec", "build_model", "builtin_names", "load_example_module"]

_FAMILIES = ("gpt", "llama")

ExampleInputs = dict | tuple | torch.Tensor


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A built-in model: which example file and config class, and the config's fields."""

    example: str                 # module in autopar.models: "gpt" or "llama"
    config_class: str
    model_class: str
    config: dict[str, object]
    tie_embeddings: bool = False  # tie lm_head to the token embedding after construction
    description: str = ""

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def max_seq_len(self) -> int:
        return int(self.config["max_seq_len"])


def _gpt(n_layer: int, d_model: int, n_head: int, desc: str, *, vocab: int = 50257, seq: int = 1024) -> ModelSpec:
    return ModelSpec(example="gpt", config_class="GPTConfig", model_class="GPT", description=desc,
                     config=dict(n_layer=n_layer, d_model=d_model, n_head=n_head, vocab_size=vocab, max_seq_len=seq))


def _llama(n_layer: int, d_model: int, n_head: int, n_kv_head: int, d_ff: int, desc: str, *, vocab: int = 128256,
           seq: int = 8192, rope_theta: float = 500000.0, tie: bool = False) -> ModelSpec:
    return ModelSpec(example="llama", config_class="LlamaConfig", model_class="Llama", description=desc,
                     tie_embeddings=tie,
                     config=dict(n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head, d_ff=d_ff,
                                 vocab_size=vocab, max_seq_len=seq, rope_theta=rope_theta))


# Published shapes: GPT-2 (Radford et al. 2019, Table 2; HF gpt2* configs), Llama 3.2 1B and Llama 3 8B/70B
# (Meta's model cards / HF configs). Llama 3.2 1B ties its LM head to the embedding (tie_word_embeddings).
BUILTIN_MODELS: dict[str, ModelSpec] = {
    "gpt2-small": _gpt(12, 768, 12, "GPT-2 124M"),
    "gpt2-medium": _gpt(24, 1024, 16, "GPT-2 350M"),
    "gpt2-large": _gpt(36, 1280, 20, "GPT-2 774M"),
    "gpt2-xl": _gpt(48, 1600, 25, "GPT-2 1.5B"),
    "llama3-1b": _llama(16, 2048, 32, 8, 8192, "Llama 3.2 1B (tied embeddings)", tie=True),
    "llama3-8b": _llama(32, 4096, 32, 8, 14336, "Llama 3 8B"),
    "llama3-70b": _llama(80, 8192, 64, 8, 28672, "Llama 3 70B"),
    "gpt-tiny": _gpt(2, 64, 4, "2-layer GPT for demos and tests", vocab=256, seq=64),
    "llama-tiny": _llama(2, 64, 4, 2, 128, "2-layer Llama for demos and tests", vocab=256, seq=64,
                         rope_theta=10000.0),
}


def builtin_names() -> list[str]:
    return list(BUILTIN_MODELS)


def load_example_module(name: str) -> ModuleType:
    """The module of a built-in model family: ``autopar.models.<name>`` (``gpt`` or ``llama``)."""
    if name not in _FAMILIES:
        raise ConfigError(f"no built-in model family {name!r}; the families are {sorted(_FAMILIES)}")
    return importlib.import_module(f"autopar.models.{name}")


def build_model(spec: str, *, batch: int, seq: int, device: str | torch.device = "meta", n_layer: int | None = None
                ) -> tuple[nn.Module, ExampleInputs]:
    """A model and its example inputs for ``spec``: a built-in name or ``module:callable``.
    ``n_layer``: a built-in with that many blocks instead of its own (e.g. a deeper tiny model, where
    activations outweigh parameters as in real training).

    Built-ins return ``{"idx": LongTensor[batch, seq], "labels": LongTensor[batch, seq]}``: meta
    tensors on ``device="meta"``, otherwise random tokens from a fixed seed. A ``module:callable``
    is imported and called with ``batch=``/``seq=`` (and ``device=`` when it takes one), or with no
    arguments if it takes none, under the ``device`` context; it must return ``(model, inputs)``.
    """
    if not (isinstance(batch, int) and isinstance(seq, int)) or batch < 1 or seq < 1:
        raise ConfigError(f"batch and seq must be positive integers, got batch={batch!r}, seq={seq!r}")
    dev = torch.device(device)
    if n_layer is not None and (spec not in BUILTIN_MODELS or not isinstance(n_layer, int) or n_layer < 1):
        raise ConfigError(f"n_layer={n_layer!r}: give a positive int, for a built-in model "
                          f"({', '.join(BUILTIN_MODELS)})")
    if spec in BUILTIN_MODELS:
        ms = BUILTIN_MODELS[spec]
        if n_layer is not None:
            ms = dataclasses.replace(ms, config={**ms.config, "n_layer": n_layer})
        return _build_builtin(spec, ms, batch=batch, seq=seq, device=dev)
    if ":" in spec:
        return _build_callable(spec, batch=batch, seq=seq, device=dev)
    raise ConfigError(f"unknown model {spec!r}; use one of {', '.join(BUILTIN_MODELS)} "
                      f"or 'module:callable' returning (model, example_inputs)")


def _build_builtin(name: str, ms: ModelSpec, *, batch: int, seq: int, device: torch.device
                   ) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    if seq > ms.max_seq_len:
        raise ConfigError(f"{name} takes sequences of at most {ms.max_seq_len} tokens, got --seq {seq}")
    module = load_example_module(ms.example)
    cfg = getattr(module, ms.config_class)(**ms.config)
    with torch.device(device):
        model = getattr(module, ms.model_class)(cfg)
    if ms.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model, _token_inputs(ms.vocab_size, batch=batch, seq=seq, device=device)


def _token_inputs(vocab: int, *, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "meta":
        return {k: torch.empty(batch, seq, dtype=torch.long, device=device) for k in ("idx", "labels")}
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"idx": idx.to(device), "labels": labels.to(device)}


def _resolve_callable(spec: str) -> Callable[..., object]:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"model spec {spec!r} must be a built-in name or 'module:callable', e.g. "
                          f"'mypkg.models:build'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"model spec {spec!r}: cannot import module {mod_name!r} ({e}); put it on PYTHONPATH "
                          f"or use one of {', '.join(BUILTIN_MODELS)}") from e
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model spec {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def _call_kwargs(fn: Callable[..., object], spec: str, **offered: object) -> dict[str, object]:
    """The keyword arguments ``fn`` accepts among ``offered`` (all when it takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {k: offered[k] for k in ("batch", "seq")}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    kwargs = {k: v for k, v in offered.items() if k in params}
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if missing:
        raise ConfigError(f"model spec {spec!r}: the callable needs arguments {missing}; it may take "
                          f"batch=, seq= and device= or nothing")
    return kwargs


def _build_callable(spec: str, *, batch: int, seq: int, device: torch.device) -> tuple[nn.Module, ExampleInputs]:
    fn = _resolve_callable(spec)
    kwargs = _call_kwargs(fn, spec, batch=batch, seq=seq, device=device)
    with torch.device(device):
        result = fn(**kwargs)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ConfigError(f"model spec {spec!r} returned {type(result).__name__}; it must return "
                          f"(nn.Module, example_inputs)")
    model, inputs = result
    if not isinstance(inputs, (dict, tuple, list, torch.Tensor)):
        raise ConfigError(f"model spec {spec!r}: example_inputs must be a dict, tuple or tensor, "
                          f"got {type(inputs).__name__}")
    return model, inputs
