"""Distributed checkpoints: ``autopar.save`` / ``autopar.load`` on ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory:
  ``.metadata``, ``__*.distcp``   DCP's files: the model and optimizer state (``get_state_dict``)
  ``autopar.json``                what autopar adds, as JSON: format version, world size, the plan (as data),
                                  every parameter's global shape, the user's extras (``step`` etc.)
  ``rng/rank<R>.json``            each rank's torch CPU (and CUDA) generator states, base64

Parameters of an applied module are DTensors, so DCP reshards on load: a checkpoint saved under one
plan or world size loads into another (DPxTP on 4 ranks -> TP on 2 ranks, or another sharding on the
same ranks). RNG states are restored only when the world size is the one saved (a rank's stream has
no meaning under another layout). A pipelined module (each rank holds its stages) records every rank's
parameters, and keys its optimizer's state and param groups by parameter FQN (DCP's
``flatten_optimizer_state_dict``; ``optimizer_flat`` in ``autopar.json``), as its ranks' param groups differ.

Loading never executes code: autopar's files are JSON; DCP's ``.metadata`` (a pickle) is read with an
unpickler that resolves only DCP's metadata classes, torch dtypes/sizes and paths; tensors and
non-tensor state (optimizer hyper-parameters) load with ``torch.load(weights_only=True)``.
This module imports autopar's core only.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, filesystem, metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from autopar.core.errors import ConfigError, PlanMismatchError
from autopar.core.plan import Plan

log = logging.getLogger(__name__)

__all__ = ["PendingSave", "load", "read_meta", "read_plan", "save"]

FORMAT = "autopar-checkpoint"
VERSION = 1
META_FILE = "autopar.json"


# ----------------------------------------------------------------------------- safe reading of DCP files

def _safe_globals() -> dict[tuple[str, str], object]:

    allowed: dict[tuple[str, str], object] = {}
    for name in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                 "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # layout by name
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the classes DCP's metadata is made of: anything else is refused, never imported."""

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _safe_globals()
        try:
            return _MetadataUnpickler._allowed[(module, name)]
        except KeyError:
            raise ConfigError(f"checkpoint metadata refers to {module}.{name}, which a DCP checkpoint never "
                              f"holds; refusing to load it (the file is corrupted or not a checkpoint)") from None


def _reader(path: Path):

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            if rank is None and not Path(self._get_metadata_path(rank)).is_file():
                raise ConfigError(f"checkpoint {str(path)!r} lacks DCP's metadata file (an interrupted save?)")
            with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
                try:
                    md = _MetadataUnpickler(f).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
                    raise ConfigError(f"checkpoint {str(path)!r}: DCP metadata is corrupted ({e})") from None
            if getattr(md, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(path)


def _planner():

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        """DCP's planner, with non-tensor items read by ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return WeightsOnlyPlanner()


# ----------------------------------------------------------------------------------------- helpers

def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _param_shapes(module: nn.Module) -> dict[str, list[int]]:
    shapes = {n: list(p.shape) for n, p in module.named_parameters()}  # a DTensor's shape is the global one
    plan = getattr(module, "plan", None)
    if plan is not None and plan.pipeline is not None and dist.is_available() and dist.is_initialized():
        # a pipelined module holds this rank's stages only: the model's parameters are every rank's (a collective,
        # as save and load are)
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, shapes)
        shapes = {n: s for part in parts for n, s in part.items()}
    return shapes


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"cpu": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


def _pipelined(module: nn.Module) -> bool:
    plan = getattr(module, "plan", None)
    return plan is not None and plan.pipeline is not None


def _state_dicts(module: nn.Module, optimizer: torch.optim.Optimizer | None, flat: bool = False) -> dict[str, Any]:
    """``flat``: the optimizer's state and param groups keyed by parameter FQN (DCP's
    ``flatten_optimizer_state_dict``). A pipelined module's ranks hold different parameters, so their param groups
    differ; unflattened, DCP keeps one rank's list of groups under one key and the other ranks load foreign groups."""

    if optimizer is None:
        return {"model": get_model_state_dict(module)}
    if not isinstance(optimizer, torch.optim.Optimizer) or callable(getattr(optimizer, "host_tensors", None)):
        # DCP keys optimizer states by the module's parameters; a host optimizer's are its host masters
        raise ConfigError(f"autopar.save/load checkpoint a torch.optim.Optimizer through DCP; a "
                          f"{type(optimizer).__name__} (optimizer offload) is not supported there yet: pass "
                          f"optimizer=None and keep optimizer.state_dict() per rank with torch.save, or plan "
                          f"without optimizer offload")
    msd, osd = get_state_dict(module, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=flat))
    return {"model": msd, "optim": osd}


# -------------------------------------------------------------------------------------- public API

class PendingSave:
    """An asynchronous ``save`` in flight: ``wait()`` (a collective call, on every rank) returns once the
    checkpoint is complete on every rank; a checkpoint not waited for is incomplete (no ``autopar.json``)."""

    def __init__(self, path: Path, future, finish) -> None:
        self.path, self._future, self._finish = path, future, finish

    def wait(self) -> None:
        if self._future is None:
            return
        self._future.result()   # this rank's files written (raises what the writer raised)
        self._future = None
        self._finish()          # autopar.json (rank 0), then a barrier: complete everywhere


_CHECKPOINT_GROUP: list = []


def _checkpoint_group():
    """A gloo process group of its own for asynchronous saves (made once, collectively): DCP's background thread
    coordinates the ranks over it while training runs its own collectives on the default group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if not _CHECKPOINT_GROUP:
        _CHECKPOINT_GROUP.append(dist.new_group(backend="gloo"))
    return _CHECKPOINT_GROUP[0]


def save(path: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         *, asynchronous: bool = False, **extra: Any) -> PendingSave | None:
    """Save ``module`` (and ``optimizer``) to the directory ``path`` on every rank (a collective call).

    ``extra`` (e.g. ``step=100``) must be JSON data; ``load`` returns it. The module's plan (``.plan``
    of an applied module), each rank's RNG state and every parameter's global shape are saved too.
    ``asynchronous=True``: the state is copied (DCP's stager, into host memory: one more copy of the model and
    optimizer state while it is written) and written by a background thread (``dcp.async_save``) while the
    caller goes on, even changing the parameters; returns a :class:`PendingSave` to ``wait()`` on before
    the checkpoint counts (``autopar.json``, which ``load`` requires, is written then)."""
    try:
        extra_json = json.loads(json.dumps(extra))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"checkpoint extras must be JSON data (numbers, strings, lists, dicts): {e}; "
                          f"save tensors as module buffers instead") from None

    path = Path(path)
    rank, world = _rank_world()
    plan = getattr(module, "plan", None)
    meta = {"format": FORMAT, "version": VERSION, "world_size": world,
            "plan": plan.to_dict() if plan is not None else None,
            "param_shapes": _param_shapes(module), "optimizer": optimizer is not None, "extra": extra_json}
    flat = _pipelined(module)
    if flat and optimizer is not None:
        meta["optimizer_flat"] = True
    rng = _rng_state()

    def finish() -> None:
        (path / "rng").mkdir(parents=True, exist_ok=True)
        _write_json(path / "rng" / f"rank{rank}.json", rng)
        if rank == 0:
            _write_json(path / META_FILE, meta)
        _barrier()  # nobody returns before the checkpoint is complete

    if asynchronous:
        group = _checkpoint_group()
        future = dcp.async_save(_state_dicts(module, optimizer, flat), checkpoint_id=path, process_group=group,
                                no_dist=group is None)
        return PendingSave(path, getattr(future, "upload_completion", future), finish)
    dcp.save(_state_dicts(module, optimizer, flat), checkpoint_id=path)
    finish()
    return None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``autopar.json`` as data (checked: format and version)."""
    f = Path(path) / META_FILE
    if not f.is_file():
        raise ConfigError(f"{str(path)!r} is not an autopar checkpoint (no {META_FILE}); "
                          f"write one with autopar.save(path, module, optimizer)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"checkpoint file {str(f)!r} is not valid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"checkpoint file {str(f)!r}: 'format' is not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ConfigError(f"checkpoint file {str(f)!r}: unknown version {meta.get('version')!r}; "
                          f"this autopar reads version {VERSION}")
    for key, typ in (("world_size", int), ("param_shapes", dict), ("optimizer", bool), ("extra", dict)):
        if not isinstance(meta.get(key), typ):
            raise ConfigError(f"checkpoint file {str(f)!r}: field {key!r} is missing or not a {typ.__name__}")
    return meta


def read_plan(path: str | os.PathLike):
    """The plan the checkpoint was saved under (``None`` when the module had none)."""

    d = read_meta(path)["plan"]
    return Plan.from_dict(d) if d is not None else None


def load(path: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer | None = None
         ) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save` into ``module`` (and ``optimizer``), resharding to their
    current placements (a collective call); returns the saved extras (``step`` etc.)."""

    path = Path(path)
    meta = read_meta(path)
    have, saved = _param_shapes(module), {k: list(v) for k, v in meta["param_shapes"].items()}
    missing = sorted(set(have) - set(saved))
    unknown = sorted(set(saved) - set(have))
    if missing or unknown:
        what = f"parameter {missing[0]!r} is not in the checkpoint" if missing else \
            f"the checkpoint has parameter {unknown[0]!r}, which the module lacks"
        raise PlanMismatchError(f"checkpoint {str(path)!r} was saved from another model: {what}")
    for name, shape in have.items():
        if shape != saved[name]:
            raise PlanMismatchError(f"checkpoint {str(path)!r}: parameter {name!r} has shape {saved[name]} there "
                                    f"but {shape} in this module")
    if optimizer is not None and not meta["optimizer"]:
        raise ConfigError(f"checkpoint {str(path)!r} has no optimizer state; call load without the optimizer")

    _reader(path).read_metadata()  # refuses a tampered .metadata with a ConfigError before DCP reads it
    flat = bool(meta.get("optimizer_flat", False))
    if optimizer is not None and _pipelined(module) and not flat:
        raise ConfigError(f"checkpoint {str(path)!r} keeps its optimizer's param groups unflattened (it was not saved "
                          f"from a pipelined module), which a pipelined module's optimizer cannot take: load it with "
                          f"optimizer=None (the model only), or resume from a checkpoint of the pipelined run")
    state = _state_dicts(module, optimizer, flat)
    try:
        dcp.load(state, storage_reader=_reader(path), planner=_planner())
    except dcp.api.CheckpointException as e:
        raise ConfigError(f"checkpoint {str(path)!r} could not be read: {str(e).strip().splitlines()[-1][:300]}") from e
    if optimizer is None:
        set_model_state_dict(module, state["model"])
    else:
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(flatten_optimizer_state_dict=flat))
    rank, world = _rank_world()
    rng = path / "rng" / f"rank{rank}.json"
    if world == meta["world_size"] and rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    else:
        log.info("checkpoint %s: RNG states not restored (saved on %d ranks, loading on %d)", path,
                 meta["world_size"], world)
    return dict(meta["extra"])
