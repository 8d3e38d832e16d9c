"""Typed options: what ``autopar.plan``, ``parallelize``, the CLI, memory sweeps and the pipeline path accept.

Every option is a field of a frozen, keyword-only dataclass validated once, in ``__post_init__``; a value
of the wrong kind, an unknown name or an option the chosen mode cannot honour is a ``ConfigError`` that
names it. The front ends build these objects from keyword arguments or command-line flags and pass them
down whole; nothing below them reads a ``**kwargs`` bag. Core type: imports only ``autopar.core``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from autopar.core.errors import AutoparError, ConfigError
from autopar.core.plan import PRECISION_DTYPES, check_precision

__all__ = ["INPUT_MODES", "PIPELINE_SCHEDULES", "RECOMPUTE_MODES", "ApplyOptions", "PipelineOptions", "PlanOptions", "parse_bytes",
           "precision_option"]

PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE_MODES = ("none", "selective", "full", "offload")
BACKENDS = ("auto", "highs", "cbc")
INPUT_MODES = ("global", "local")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_PRECISION_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
                    **{name: name for name in PRECISION_DTYPES}}


def parse_bytes(value: int | float | str | None, what: str = "memory budget") -> int | None:
    """``40GiB``, ``80GB``, ``1.5e9`` or an int -> bytes (None stays None); must be positive."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{what} {value!r} is not a size; write bytes (int) or e.g. '40GiB', '80GB'")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not n > 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return int(n)


def precision_option(value) -> dict[str, str] | None:
    """``precision=``: "bf16" / "fp16" / "fp32" (or the torch dtype names), or a dict of plan.precision's
    fields, as plan.precision (defaults filled in). None: fp32."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in _PRECISION_NAMES:
            raise ConfigError(f"precision={value!r} is not one of {sorted(_PRECISION_NAMES)}")
        value = {"compute_dtype": _PRECISION_NAMES[value]}
    if not isinstance(value, dict):
        raise ConfigError(f"precision must be a string like 'bf16' or a dict, got {type(value).__name__}")
    try:
        return check_precision(value)
    except AutoparError as e:
        raise ConfigError(f"precision option: {e}") from None


def _positive_int(value, what: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def _patterns(value, what: str) -> dict[str, tuple[str, ...]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a dict {{key or FQN glob: [placement per mesh dim]}}, got {value!r}")
    out = {}
    for pat, sh in value.items():
        if not isinstance(pat, str) or isinstance(sh, str) or not isinstance(sh, (list, tuple)):
            raise ConfigError(f"{what}[{pat!r}] must be a list of placements, one per mesh dim (e.g. ['S(0)', "
                              f"'R']), got {sh!r}")
        out[pat] = tuple(str(x) for x in sh)
    return out


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """``pipeline=`` of ``autopar.plan`` on a mesh with a ``pp`` dim: the fields given are fixed, the
    others (None) are the planner's choice."""

    stages: int | None = None
    """Pipeline stages in all (a multiple of the pp size; more than pp means interleaving)."""
    schedule: str | None = None
    """``gpipe``, ``1f1b`` or ``interleaved``."""
    microbatches: int | None = None
    """Micro-batches per step (a divisor of the batch)."""
    virtual_stages: int | None = None
    """Stages per pp rank (interleaved schedule)."""

    def __post_init__(self):
        for name in ("stages", "microbatches", "virtual_stages"):
            _positive_int(getattr(self, name), f"pipeline {name}")
        if self.schedule is not None:
            sched = str(self.schedule).lower()
            if sched not in PIPELINE_SCHEDULES:
                raise ConfigError(f"pipeline schedule {self.schedule!r} is not one of {PIPELINE_SCHEDULES}")
            object.__setattr__(self, "schedule", sched)

    @staticmethod
    def parse(value) -> PipelineOptions:
        """``"auto"`` / True (every choice the planner's), a dict of the fields, or a PipelineOptions."""
        if isinstance(value, PipelineOptions):
            return value
        if value == "auto" or value is True:
            return PipelineOptions()
        if not isinstance(value, dict):
            raise ConfigError(f"pipeline must be 'auto', False or a dict like {{'stages': 4, 'schedule': '1f1b', "
                              f"'microbatches': 8}}, got {value!r}")
        known = {f.name for f in dataclasses.fields(PipelineOptions)}
        unknown = set(value) - known
        if unknown:
            raise ConfigError(f"unknown pipeline option(s) {sorted(unknown)}; known: {sorted(known)}")
        return PipelineOptions(**value)


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """Everything ``autopar.plan`` takes besides the model, inputs, mesh and cluster.

    Build it from keyword arguments with :meth:`from_kwargs` (unknown names are a ConfigError)."""

    memory_budget: int | None = None
    """Bytes per device (``"40GiB"``, ``"80GB"`` or an int); None: the device capacity."""
    fix: dict[str, tuple[str, ...]] | None = None
    """{graph key or FQN glob: placements}: pins placements (e.g. ``{"input:*": ["S(0)", "R"]}``)."""
    prefer: dict[str, tuple[str, ...]] | None = None
    """{key glob: placements}: pins op outputs where the op has such a strategy (others stay free)."""
    backend: str = "auto"
    """ILP backend: ``auto`` (HiGHS when installed, else CBC), ``highs`` or ``cbc``."""
    time_limit: float = 60.0
    """Seconds the ILP backend may run."""
    nodes: int | None = None
    """How many nodes the mesh spans (which mesh dims cross nodes)."""
    fold_layers: bool = True
    """Capture two of N identical blocks and plan them once."""
    precision: dict[str, str] | None = None
    """``bf16`` / ``fp16`` / ``fp32`` or a dict of plan.precision: autocast compute with fp32 master weights."""
    fuse: bool | None = None
    """Cost (and list in the plan) the fused kernels codegen substitutes on CUDA; None: on for a GPU cluster."""
    offload: bool | None = None
    """None / True: the ILP may move activations and optimizer states to host memory where the host is not
    the device; False keeps everything on the device."""
    recompute: str | None = None
    """Every repeated block: ``none``, ``selective``, ``full`` or ``offload``; None: the solver decides."""
    zero: int | None = None
    """0 none, 1 optimizer states sharded over replicated dims, 2 gradients too; None: the solver decides."""
    pipeline: PipelineOptions | bool | None = None
    """On a mesh with a ``pp`` dim: None / True / ``"auto"`` plans stages, a PipelineOptions (or dict) fixes
    some of their choices, False plans without stages."""
    training: bool = True
    """True: plan a training step (forward, backward, gradient reduction, optimizer states; recompute, ZeRO and
    offload decisions). False: plan inference, the forward alone: forward compute and forward collectives are
    priced, memory is the parameters in their placements, the activations live at the forward's peak and the
    declared ``kv_cache_bytes``; no gradients, optimizer states, recompute, ZeRO or offload."""
    kv_cache_bytes: int | None = None
    """Inference only: the KV cache the engine will hold, in bytes as one device would hold it (every layer's K
    and V, every kv head). Each attention op's share is charged per rank divided by how many ways the plan
    splits that op's heads, so where memory binds the planner can shard the cache by heads."""

    def __post_init__(self):
        set_ = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731
        set_("memory_budget", parse_bytes(self.memory_budget))
        set_("fix", _patterns(self.fix, "fix"))
        set_("prefer", _patterns(self.prefer, "prefer"))
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is not one of {BACKENDS}")
        if isinstance(self.time_limit, bool) or not isinstance(self.time_limit, (int, float)) or \
                not self.time_limit > 0:
            raise ConfigError(f"time_limit must be a positive number of seconds, got {self.time_limit!r}")
        set_("time_limit", float(self.time_limit))
        _positive_int(self.nodes, "nodes")
        for name in ("fold_layers",):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("fuse", "offload"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True, False or None, got {getattr(self, name)!r}")
        set_("precision", precision_option(self.precision))
        if self.recompute is not None and self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"recompute={self.recompute!r} is not one of {RECOMPUTE_MODES} (or None: the "
                              f"solver decides)")
        if self.zero is not None and (isinstance(self.zero, bool) or self.zero not in (0, 1, 2)):
            raise ConfigError(f"zero={self.zero!r} must be 0, 1 or 2 (ZeRO-3 is fix={{'param:*': [...]}}), or "
                              f"None: the solver decides")
        if self.pipeline not in (None, True, False):
            set_("pipeline", PipelineOptions.parse(self.pipeline))
        elif self.pipeline is True:
            set_("pipeline", PipelineOptions())
        set_("kv_cache_bytes", parse_bytes(self.kv_cache_bytes, "kv_cache_bytes"))
        self._check_mode()

    def _check_mode(self) -> None:
        """``training=False`` (inference) takes no training-only decision; ``kv_cache_bytes`` needs it."""
        if not isinstance(self.training, bool):
            raise ConfigError(f"training must be True or False, got {self.training!r}")
        if self.training:
            if self.kv_cache_bytes is not None:
                raise ConfigError("kv_cache_bytes is the KV cache of an inference plan: pass training=False with it "
                                  "(--inference on the command line; a training step holds no KV cache)")
            return
        for name, ok in (("recompute", (None, "none")), ("zero", (None, 0)), ("offload", (None, False))):
            if getattr(self, name) not in ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is a training decision; an inference plan "
                                  f"(training=False) keeps no activations for backward, no gradients and no "
                                  f"optimizer states: drop it")

    @staticmethod
    def from_kwargs(**kwargs: Any) -> PlanOptions:
        known = {f.name for f in dataclasses.fields(PlanOptions)}
        unknown = set(kwargs) - known
        if unknown:
            raise ConfigError(f"unknown plan option(s) {sorted(unknown)}; known: {sorted(known)}")
        return PlanOptions(**kwargs)

    def replace(self, **changes: Any) -> PlanOptions:
        """A copy with ``changes`` (validated like the constructor's arguments)."""
        return PlanOptions.from_kwargs(**{**self.as_kwargs(), **changes})

    def as_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fix_dict(self) -> dict[str, list[str]] | None:
        return None if self.fix is None else {k: list(v) for k, v in self.fix.items()}

    def prefer_dict(self) -> dict[str, list[str]] | None:
        return None if self.prefer is None else {k: list(v) for k, v in self.prefer.items()}

    def check_pipeline(self) -> None:
        """The options a pipelined plan cannot honour yet, each a ConfigError naming it."""
        if not self.training:
            raise ConfigError("training=False (an inference plan) is not supported with pipeline stages; plan "
                              "inference without stages (pipeline=False, or a mesh without a 'pp' dim)")
        if self.fuse:
            raise ConfigError("fuse=True is not supported with pipeline stages yet (stages are costed unfused); "
                              "drop it or pass pipeline=False")
        if self.precision is not None and self.precision.get("loss_scaling") == "dynamic":
            raise ConfigError("precision with float16 compute needs dynamic loss scaling, which pipeline stages do "
                              "not apply yet; use precision='bf16' or pass pipeline=False")
        for name, ok in (("recompute", (None, "none", "full")), ("zero", (None, 0)), ("offload", (None, False))):
            if getattr(self, name) not in ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported with pipeline stages yet (a "
                                  f"stage recomputes all its blocks or none, without ZeRO or offload); drop it, "
                                  f"use recompute='full' / 'none', or pass pipeline=False")


@dataclass(frozen=True, kw_only=True)
class ApplyOptions:
    """What ``autopar.apply`` / ``parallelize`` take besides the model, plan and mesh."""

    input_mode: str = "global"
    """``global``: every rank gets the whole batch (as the model does); ``local``: each rank its shard."""
    defer_param_grads: bool = True
    """Reduce data-parallel gradients in overlapped buckets after backward (False: inside each backward,
    as pipeline stages need: several backwards per step)."""

    def __post_init__(self):
        if self.input_mode not in INPUT_MODES:
            raise ConfigError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if not isinstance(self.defer_param_grads, bool):
            raise ConfigError(f"defer_param_grads must be True or False, got {self.defer_param_grads!r}")
