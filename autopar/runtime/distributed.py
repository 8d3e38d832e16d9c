"""Run configuration (TOML or JSON, parsed as data) and process-group start-up with its timeout.

A config file holds sections of plain values; today one, ``[distributed]``::

    [distributed]
    backend = "auto"        # "gloo", "nccl" or "auto" (NCCL when CUDA is available, else gloo)
    timeout_s = 600         # every collective fails after this long instead of hanging
    fault_grace_s = 10      # after a failure, how long survivors wait for each other (autopar.guard_step)

Files are read with ``tomllib`` / ``json`` only (never executed); an unknown section or key, or a
value of the wrong type, is a ConfigError naming it. ``init_distributed`` starts the default process
group under torchrun (``env://``) or in processes a script spawned (pass ``rank``, ``world_size`` and
``store``, or set ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``). Imports autopar's core only.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autopar.core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["Config", "DistributedConfig", "init_distributed", "load_config"]

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    backend: str = "auto"
    """``gloo``, ``nccl`` or ``auto`` (NCCL when CUDA is available, else gloo)."""
    timeout_s: float = 600.0
    """Process-group timeout: a collective waiting longer raises instead of hanging."""
    fault_grace_s: float | None = None
    """After a failed collective, how long survivors wait to learn which ranks are alive (default: timeout_s)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"distributed.backend: {self.backend!r} is not one of {list(BACKENDS)}")
        for name in ("timeout_s", "fault_grace_s"):
            v = getattr(self, name)
            if v is None and name == "fault_grace_s":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"distributed.{name}: expected a positive number of seconds, got {v!r}")

    @property
    def grace_s(self) -> float:
        return float(self.fault_grace_s if self.fault_grace_s is not None else self.timeout_s)


@dataclass(frozen=True, kw_only=True)
class Config:
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


_SECTIONS = {"distributed": DistributedConfig}


def load_config(source: str | os.PathLike | dict[str, Any] | Config | None = None) -> Config:
    """A Config from a ``.toml`` / ``.json`` file, a dict of sections, a Config (returned) or None (defaults)."""
    if source is None:
        return Config()
    if isinstance(source, Config):
        return source
    if isinstance(source, dict):
        data, where = source, "config"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        where = repr(str(path))
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(path.read_text())
            elif path.suffix == ".json":
                data = json.loads(path.read_text())
            else:
                raise ConfigError(f"config file {where}: expected a .toml or .json file")
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {where} is not valid TOML: {e}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {where} is not valid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of sections at the top level")
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    sections = {}
    for name, cls in _SECTIONS.items():
        sec = data.get(name, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{where}: [{name}] must be a table of keys, got {type(sec).__name__}")
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(sec) - known)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {[f'{name}.{k}' for k in bad]}; known: {sorted(known)}")
        sections[name] = cls(**sec)
    return Config(**sections)


_ACTIVE: DistributedConfig | None = None


def active_distributed_config() -> DistributedConfig | None:
    """The [distributed] settings ``init_distributed`` started the process group with (None otherwise)."""
    return _ACTIVE


def init_distributed(config: str | os.PathLike | dict | Config | None = None, *, timeout_s: float | None = None,
                     backend: str | None = None, rank: int | None = None, world_size: int | None = None,
                     store=None) -> tuple[int, int]:
    """Start the default process group with the config's timeout; returns (rank, world size).

    ``timeout_s`` / ``backend`` override the config. Under torchrun nothing else is needed; spawned
    processes pass ``rank``, ``world_size`` and a ``store`` (or set the ``env://`` variables). When a
    group is already running it is kept (and a differing timeout is logged)."""

    global _ACTIVE
    cfg = load_config(config).distributed
    over = {k: v for k, v in (("timeout_s", timeout_s), ("backend", backend)) if v is not None}
    if over:
        cfg = DistributedConfig(**{**cfg.__dict__, **over})
    if dist.is_initialized():
        log.warning("init_distributed: a process group is already running; keeping it (timeout not changed)")
        _ACTIVE = cfg
        return dist.get_rank(), dist.get_world_size()
    name = cfg.backend
    if name == "auto":
        name = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {"backend": name, "timeout": datetime.timedelta(seconds=cfg.timeout_s)}
    if store is not None or rank is not None or world_size is not None:
        if store is None or rank is None or world_size is None:
            raise ConfigError("init_distributed: pass rank, world_size and store together (or none of them, "
                              "to read torchrun's environment)")
        kwargs.update(store=store, rank=rank, world_size=world_size)
    else:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if v not in os.environ]
        if missing:
            raise ConfigError(f"init_distributed: environment variables {missing} are not set; run under "
                              f"torchrun, or pass rank, world_size and store")
    if name == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank or 0)))
    dist.init_process_group(**kwargs)
    _ACTIVE = cfg
    return dist.get_rank(), dist.get_world_size()
