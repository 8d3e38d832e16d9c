"""HF weights in and out: a local safetensors checkpoint into a (parallel) module, and back out.

``load_hf_weights`` reads, for every parameter and persistent buffer, only the block this rank holds
(parameters still on the meta device, as ``autopar.train.model`` builds an HF model whose weights are loaded,
are first allocated on ``device``, this rank's block of a DTensor only; then every one must be in the files):
a DTensor parameter's local shape and global offset come from its placements
(``compute_local_shape_and_global_offset``) and the block is read with safetensors'
``safe_open(...).get_slice(name)[...]``, so no rank ever reads the whole model. Sharded checkpoints
(``model.safetensors.index.json``) and single files (``model.safetensors``) are both read. A parameter tied
to another (``lm_head.weight`` with ``tie_word_embeddings``) is one parameter and is read once.

``export_hf`` gathers each parameter (``DTensor.full_tensor()``, a collective every rank joins) and rank 0
writes ``model.safetensors`` and ``config.json`` (``config.save_pretrained``), so plain ``transformers``
loads the directory with ``from_pretrained``. A pipelined module (``PipelineModule``: each pp rank holds its
stages only) is written as a sharded checkpoint instead: the first rank of each pp position writes its stages'
parameters to ``model-<k>-of-<pp>.safetensors`` (a weight tied across pp ranks once, by the lowest), and rank 0
writes ``model.safetensors.index.json`` naming every tensor's file. Its stages hold parameters only, so
persistent buffers are not exported there (HF decoder LLMs keep none: their rotary tables are not persistent).
Must not: plan, build process groups or train.
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
from autopar.core.mesh import PP_DIM
from autopar.runtime.pipeline import PipelineModule

__all__ = ["export_hf", "hf_weight_files", "load_hf_weights", "materialize_parameters"]

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


def materialize_parameters(module: nn.Module, device: torch.device | str) -> set[str]:
    """Allocate (uninitialized) every parameter still on the meta device on ``device`` (a DTensor: this rank's
    block); returns their names. The new Parameter replaces the old one wherever a module holds it (tied weights
    stay one), in ``module``'s tree and, for a PipelineModule, in its stage modules (outside its tree). Call it
    before an optimizer is made over the parameters."""
    device = torch.device(device)
    mods = list(module.modules())
    for st in getattr(module, "stage_modules", {}).values():
        mods += list(st.modules())
    new: dict[int, nn.Parameter] = {}
    for mod in mods:
        for name, p in mod._parameters.items():
            if p is None or not (p._local_tensor if isinstance(p, DTensor) else p).is_meta:
                continue
            if id(p) not in new:
                if isinstance(p, DTensor):
                    data = DTensor.from_local(torch.empty(p._local_tensor.shape, dtype=p.dtype, device=device),
                                              p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                              stride=p.stride())
                else:
                    data = torch.empty(p.shape, dtype=p.dtype, device=device)
                new[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            mod._parameters[name] = new[id(p)]
    made = {id(p) for p in new.values()}
    return {fqn for fqn, p in module.named_parameters(remove_duplicate=False) if id(p) in made}


def load_hf_weights(module: nn.Module, directory: str | Path, *, strict: bool = True,
                    device: torch.device | str = "cpu") -> list[str]:
    """Copy the checkpoint's tensors into ``module``'s parameters and persistent buffers, each rank reading
    only its blocks; returns the names read. Missing or mis-shaped tensors are a PlanMismatchError (always for
    a parameter that was on the meta device: it holds no values until read)."""
    from safetensors import safe_open

    allocated = materialize_parameters(module, device)
    files = hf_weight_files(directory)
    targets: dict[str, torch.Tensor] = dict(module.named_parameters())
    non_persistent = {f"{m}.{b}".lstrip(".") for m, mod in module.named_modules()
                      for b in getattr(mod, "_non_persistent_buffers_set", ())}
    targets.update({n: b for n, b in module.named_buffers() if n not in non_persistent})
    missing = sorted(n for n in targets if n not in files)
    if missing and (strict or any(n in allocated for n in missing)):
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
    if isinstance(module, PipelineModule):
        _export_stages(module, state, Path(out_dir))
    elif dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return
    else:
        from safetensors.torch import save_file
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file(state, str(Path(out_dir) / "model.safetensors"), metadata={"format": "pt"})
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return
    out = Path(out_dir)
    config.save_pretrained(str(out))
    if tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).is_file():
                shutil.copy(Path(tokenizer_dir) / f, out / f)
    if dist.is_initialized():
        dist.barrier()


def _export_stages(module: PipelineModule, state: dict[str, torch.Tensor], out: Path) -> None:
    """One safetensors file per pp position (written by its first rank), the index by rank 0 (collective)."""
    from safetensors.torch import save_file

    names = tuple(module.mesh.mesh_dim_names)
    pp_rank = module.mesh.get_local_rank(PP_DIM)
    mine = {k: v for k, v in state.items() if k not in module.tied or module.tied[k][0] == pp_rank}
    writer = int(module.mesh.mesh.select(names.index(PP_DIM), pp_rank).min())
    fname = f"model-{pp_rank + 1:05d}-of-{module.pp:05d}.safetensors"
    listing = {k: (fname, v.numel() * v.element_size()) for k, v in mine.items()} if dist.get_rank() == writer else {}
    if listing:
        out.mkdir(parents=True, exist_ok=True)
        save_file(mine, str(out / fname), metadata={"format": "pt"})
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, listing)
    if dist.get_rank() == 0:
        (out / "model.safetensors").unlink(missing_ok=True)    # an earlier single-file export would be read first
        files = {k: f for part in parts for k, (f, _) in part.items()}
        total = sum(n for part in parts for _, n in part.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(files.items()))}, indent=2) + "\n")
