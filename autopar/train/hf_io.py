"""HF weights in and out: a local safetensors checkpoint into a (parallel) module, and back out.

``load_hf_weights`` reads, for every parameter and persistent buffer, only the block this rank holds:
a DTensor parameter's local shape and global offset come from its placements
(``compute_local_shape_and_global_offset``) and the block is read with safetensors'
``safe_open(...).get_slice(name)[...]``, so no rank ever reads the whole model. Sharded checkpoints
(``model.safetensors.index.json``) and single files (``model.safetensors``) are both read. A parameter tied
to another (``lm_head.weight`` with ``tie_word_embeddings``) is one parameter and is read once.

``export_hf`` gathers each parameter (``DTensor.full_tensor()``, a collective every rank joins) and rank 0
writes ``model.safetensors`` and ``config.json`` (``config.save_pretrained``), so plain ``transformers``
loads the directory with ``from_pretrained``. Must not: plan, build process groups or train.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from autopar.core.errors import ConfigError, PlanMismatchError

__all__ = ["export_hf", "hf_weight_files", "load_hf_weights"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt")


def hf_weight_files(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConfigError(f"{index}: not a safetensors index (no weight_map): {e}") from None
        return {name: d / f for name, f in weight_map.items()}
    single = d / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"{str(d)!r} has neither model.safetensors nor model.safetensors.index.json; save the "
                          f"model with save_pretrained(dir, safe_serialization=True)")
    from safetensors import safe_open
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable


def _block(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's block of ``t`` (the whole tensor when not a DTensor)."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(shape), tuple(offset)
    return tuple(t.shape), (0,) * t.dim()


def load_hf_weights(module: nn.Module, directory: str | Path, *, strict: bool = True) -> list[str]:
    """Copy the checkpoint's tensors into ``module``'s parameters and persistent buffers, each rank reading
    only its blocks; returns the names read. Missing or mis-shaped tensors are a PlanMismatchError."""
    from safetensors import safe_open

    files = hf_weight_files(directory)
    targets: dict[str, torch.Tensor] = dict(module.named_parameters())
    non_persistent = {f"{m}.{b}".lstrip(".") for m, mod in module.named_modules()
                      for b in getattr(mod, "_non_persistent_buffers_set", ())}
    targets.update({n: b for n, b in module.named_buffers() if n not in non_persistent})
    missing = sorted(n for n in targets if n not in files)
    if missing and strict:
        raise PlanMismatchError(f"{str(directory)!r} has no tensor {missing[0]!r} (and {len(missing) - 1} more "
                                f"missing); is it a checkpoint of this model architecture?")
    by_file: dict[Path, list[str]] = {}
    for name in targets:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    read = []
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    t = targets[name]
                    sl = f.get_slice(name)
                    if list(sl.get_shape()) != list(t.shape):
                        raise PlanMismatchError(f"{path}: tensor {name!r} has shape {sl.get_shape()} but the "
                                                f"model's is {list(t.shape)}")
                    shape, offset = _block(t)
                    block = sl[tuple(slice(o, o + s) for o, s in zip(offset, shape))] if shape else sl[...]
                    local = t._local_tensor if isinstance(t, DTensor) else t
                    local.copy_(block.to(local.dtype))
                    read.append(name)
    return read


def export_hf(module: nn.Module, out_dir: str | Path, config, *, tokenizer_dir: str | Path | None = None) -> None:
    """Write ``module``'s weights as an HF directory loadable by ``from_pretrained`` (every rank must call it:
    sharded parameters are gathered). ``config`` is the model's ``PretrainedConfig``."""
    state = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if isinstance(t, DTensor):
            t = t.full_tensor()
        state[name] = t.detach()
    non_persistent = {f"{m}.{b}".lstrip(".") for m, mod in module.named_modules()
                      for b in getattr(mod, "_non_persistent_buffers_set", ())}
    state = {k: v.contiguous().cpu() for k, v in state.items() if k not in non_persistent}
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).is_file():
                shutil.copy(Path(tokenizer_dir) / f, out / f)
    if dist.is_initialized():
        dist.barrier()
