"""The training job's configuration: typed sections read from TOML, every key with its default here.

This file is the one place where the keys of ``autopar train --config job.toml`` and their defaults are
documented (each field's docstring). A job file holds sections of plain values::

    [model]       source, dtype, init_seed
    [data]        kind, paths, tokenizer, text_key, tokens_path, tokens_dtype, seq_len, vocab_size, ...
    [parallel]    mesh, dim_names, memory_budget, precision, zero, recompute, cluster, plan_file, ...
    [optimizer]   lr, betas, eps, weight_decay, impl, clip_grad_norm
    [schedule]    warmup_steps, decay, min_lr_ratio
    [training]    steps, global_batch, global_batch_tokens, micro_batch, grad_accum, seed
    [checkpoint]  dir, interval, keep_last, resume
    [logging]     every, metrics_file, progress, tensorboard_dir, peak_flops
    [distributed] backend, timeout_s, fault_grace_s   (autopar.runtime.distributed.DistributedConfig)

Files are read with ``tomllib`` (never executed). ``overrides`` (``--set section.key=value``) are applied on
top; a value is parsed as a TOML value (``3``, ``1e-3``, ``[2, 2]``, ``true``) and taken as a string
otherwise. Every mistake is a ConfigError naming the key, and the file and line where the key is written:
an unknown section or key (with the closest known one), a value of the wrong type, a missing file. Checks
that need the world size (mesh size, batch arithmetic) are :func:`resolve_batch` and :func:`mesh_for`.
This module imports autopar's core and ``autopar.runtime.distributed`` only; it builds nothing.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopar.core.errors import ConfigError
from autopar.core.mesh import default_dim_names
from autopar.runtime.distributed import DistributedConfig

__all__ = ["BatchLayout", "CheckpointConfig", "DataConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig",
           "ParallelConfig", "ScheduleConfig", "TrainConfig", "TrainingConfig", "load_train_config", "mesh_for",
           "resolve_batch"]

DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    source: str = "llama-tiny"
    """A built-in model name (``autopar plan --help`` lists them), a local HF model directory (config.json and
    safetensors weights, sharded or not), an HF ``config.json`` file (random init), or ``module:callable``
    returning a module (or ``(module, example_inputs)``)."""
    dtype: str = "float32"
    """Parameter dtype: ``float32``, ``bfloat16`` or ``float16`` (for mixed precision keep float32 and set
    ``parallel.precision``)."""
    init_seed: int = 0
    """Seeds the random initialization (every rank builds the same weights)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    kind: str = "synthetic"
    """``synthetic`` (a seeded token stream), ``text`` (txt/jsonl files tokenized with ``tokenizer``) or
    ``tokens`` (a pre-tokenized flat binary file, ``tokens_path``)."""
    paths: list[str] = field(default_factory=list)
    """``text``: files or directories (``*.txt``, ``*.jsonl``), relative to the config file's directory."""
    tokenizer: str = ""
    """``text``: a local directory holding an HF tokenizer (``tokenizer.json``); default: the model directory."""
    text_key: str = "text"
    """``text``: the field of each ``.jsonl`` record that holds the text."""
    tokens_path: str = ""
    """``tokens``: a flat binary file of token ids."""
    tokens_dtype: str = "uint16"
    """``tokens``: ``uint16`` or ``uint32``."""
    seq_len: int = 64
    """Tokens per training sequence (each sample is ``seq_len + 1`` consecutive tokens, packed across
    document boundaries with an end-of-text token between documents)."""
    vocab_size: int = 0
    """``synthetic``: token ids are drawn below this; 0: the model's vocabulary size."""
    num_sequences: int = 1024
    """``synthetic``: how many distinct sequences the stream holds before it repeats (in a new order)."""
    seed: int = 0
    """Seeds the order of sequences (one permutation per epoch) and the synthetic stream."""


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    mesh: list[int] | str = "auto"
    """Mesh shape, e.g. ``[2, 2]``; ``auto``: one data-parallel dim over all ranks. Its size must be the world
    size. One process (no torchrun) runs the plain model without a plan."""
    dim_names: list[str] = field(default_factory=list)
    """Mesh dim names; default ``dp`` / ``dp, tp`` / ``dp, sp, tp``. The batch is split over the dims named
    ``dp``."""
    memory_budget: str | int = ""
    """Bytes per device for the planner (``"40GiB"`` or an int); empty: the device capacity."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16``: autocast compute with fp32 master weights (the plan's precision)."""
    zero: int | str = "auto"
    """0, 1 or 2 (ZeRO stage), or ``auto``: the planner decides."""
    recompute: str = "auto"
    """``none``, ``selective``, ``full``, ``offload`` or ``auto`` (the planner decides)."""
    offload: bool | str = "auto"
    """Whether the planner may move activations / optimizer states to host memory (``auto``: its default)."""
    cluster: str = ""
    """Cluster preset or profile JSON for the plan's costs (default: cpu-gloo on CPU, h100-sxm on GPU)."""
    time_limit: float = 60.0
    """Seconds the ILP solver may run."""
    plan_file: str = ""
    """Apply this plan (JSON from ``autopar plan``) instead of planning."""
    plan_out: str = ""
    """Rank 0 writes the plan it applied to this JSON file."""
    pipeline: bool | str = "auto"
    """Pipeline stages over the mesh dim named ``pp``: ``auto`` (stages exactly when ``dim_names`` has ``pp``),
    ``true`` (a ``pp`` dim is required) or ``false`` (a ``pp`` dim is then planned as an ordinary dim). A
    pipelined step is one ``autopar.forward_backward`` over the global batch (every rank reads it whole), run
    by the plan's schedule over ``training.grad_accum`` micro-batches."""
    pipeline_schedule: str = "auto"
    """``auto`` (the planner's choice), ``gpipe``, ``1f1b`` or ``interleaved``."""
    pipeline_stages: int = 0
    """Pipeline stages in all (a multiple of the ``pp`` size; more than it interleaves); 0: the planner's choice."""


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    lr: float = 3e-4
    """Peak learning rate (after warm-up)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on parameters of 2 or more dims (biases and norms get none)."""
    impl: str = "auto"
    """``auto`` (torch's default), ``foreach``, ``fused`` or ``for-loop``."""
    clip_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0: no clipping (the norm is still logged)."""


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    warmup_steps: int = 0
    """Linear warm-up from 0 to ``optimizer.lr`` over this many steps."""
    decay: str = "cosine"
    """After warm-up: ``cosine``, ``linear`` (to ``min_lr_ratio * lr`` at the last step) or ``constant``."""
    min_lr_ratio: float = 0.1
    """The learning rate at the last step, as a fraction of ``optimizer.lr``."""


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    steps: int = 100
    """Optimizer steps."""
    global_batch: int = 8
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    global_batch_tokens: int = 0
    """Alternative to ``global_batch``: tokens per step (a multiple of ``data.seq_len``); 0: unused."""
    micro_batch: int = 0
    """Sequences per forward/backward on one data-parallel rank; 0: derived from ``grad_accum``."""
    grad_accum: int = 0
    """Micro-batches per step (gradients are synchronized once per step); 0: derived from ``micro_batch``
    (both 0: one micro-batch)."""
    seed: int = 0
    """Seeds torch's generators (dropout etc.)."""


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    dir: str = ""
    """Directory of ``step_<N>`` checkpoints (``autopar.save``, DCP); empty: no checkpoints."""
    interval: int = 0
    """Save every this many steps (and after the last step); 0: only after the last step."""
    keep_last: int = 2
    """Keep this many newest checkpoints; 0 keeps all."""
    resume: bool = True
    """Resume from the newest complete checkpoint in ``dir`` when there is one (model, optimizer, RNG, data
    position and step)."""
    async_save: bool = False
    """Write checkpoints in the background (``autopar.save(asynchronous=True)``: the state is copied to host
    memory first, then written while training goes on); ``latest`` moves once a save is complete."""


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    every: int = 1
    """Log (metrics file, progress bar) every this many steps."""
    metrics_file: str = ""
    """JSON-lines metrics (rank 0); empty: ``<checkpoint.dir>/metrics.jsonl``, or none without checkpoints."""
    progress: bool = True
    """A progress bar on stderr (rank 0; tqdm)."""
    tensorboard_dir: str = ""
    """Also write TensorBoard scalars here (needs the ``tensorboard`` package)."""
    peak_flops: float = 0.0
    """Peak FLOP/s per device for MFU; 0: the cluster profile's (``parallel.cluster``) for the compute dtype."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    base_dir: str = "."
    """Relative paths in the file are taken from here (the config file's directory)."""
    extra: dict[str, dict] = field(default_factory=dict)
    """Sections a script declared its own (``extra_sections``), as read: e.g. ``[dit]`` of examples/dit."""

    def path(self, p: str) -> Path:
        """``p`` relative to the config file's directory (absolute paths unchanged)."""
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else Path(self.base_dir) / q


SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(TrainConfig)
                             if f.name not in ("base_dir", "extra")}
CHOICES: dict[str, tuple] = {
    "model.dtype": DTYPES, "data.kind": ("synthetic", "text", "tokens"), "data.tokens_dtype": ("uint16", "uint32"),
    "parallel.precision": PRECISIONS, "parallel.recompute": ("auto", "none", "selective", "full", "offload"),
    "parallel.pipeline": ("auto", True, False), "parallel.pipeline_schedule": ("auto", "gpipe", "1f1b", "interleaved"),
    "optimizer.impl": ("auto", "foreach", "fused", "for-loop"), "schedule.decay": ("cosine", "linear", "constant"),
}
POSITIVE = {"data.seq_len", "data.num_sequences", "training.steps", "logging.every", "parallel.time_limit"}
NON_NEGATIVE = {"data.vocab_size", "training.global_batch", "training.global_batch_tokens", "training.micro_batch",
                "training.grad_accum", "parallel.pipeline_stages", "checkpoint.interval", "checkpoint.keep_last",
                "schedule.warmup_steps",
                "optimizer.lr", "optimizer.eps", "optimizer.weight_decay", "optimizer.clip_grad_norm",
                "schedule.min_lr_ratio", "logging.peak_flops"}


class _Where:
    """Says where a key is written: ``file:line`` (found by scanning the TOML text) or ``--set``."""

    def __init__(self, path: Path | None, text: str, overrides: dict[str, str]):
        self.path, self.lines, self.overrides = path, text.splitlines(), overrides

    def __call__(self, section: str, key: str | None = None) -> str:
        dotted = section if key is None else f"{section}.{key}"
        if dotted in self.overrides:
            return f"--set {dotted}={self.overrides[dotted]}"
        if self.path is None:
            return "config"
        line = self._line(section, key)
        return f"{self.path}:{line}" if line else str(self.path)

    def _line(self, section: str, key: str | None) -> int | None:
        current = None
        for i, raw in enumerate(self.lines, 1):
            s = raw.split("#", 1)[0].strip()
            m = re.fullmatch(r"\[\s*([A-Za-z0-9_.-]+)\s*\]", s)
            if m:
                current = m.group(1)
                if key is None and current == section:
                    return i
                continue
            if key is not None and current == section and re.match(rf"{re.escape(key)}\s*=", s):
                return i
            if key is not None and current is None and re.match(rf"{re.escape(section)}\.{re.escape(key)}\s*=", s):
                return i
        return None


def _closest(name: str, known) -> str:
    close = difflib.get_close_matches(name, [str(k) for k in known], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from TOML) fits the annotation ``hint`` (int is accepted for float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_check_type(v, inner) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["section.key=value", ...]`` -> ``{"section.key": value}`` (values parsed as TOML, else strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set training.steps=10")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key] = value
    return out


def load_train_config(source: str | os.PathLike | dict | None = None, overrides: list[str] | dict | None = None,
                      *, extra_sections: tuple[str, ...] = ()) -> TrainConfig:
    """A validated TrainConfig from a TOML file (or a dict of sections, or None: defaults) and ``--set``
    overrides (``["training.steps=10"]`` or ``{"training.steps": 10}``). ``extra_sections``: sections a
    script reads itself (kept as read in ``cfg.extra``; the script validates them)."""
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    raw_over = {k: str(v) for k, v in over.items()}
    path, text, base = None, "", "."
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in source.items()}
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a .toml job file "
                              f"(examples/llama/tiny.toml is one)")
        text = path.read_text()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
        base = str(path.resolve().parent)
    where = _Where(path, text, raw_over)
    for dotted, value in over.items():
        section, key = dotted.split(".", 1)
        if section not in SECTIONS and section not in extra_sections:
            raise ConfigError(f"--set {dotted}: unknown section {section!r}{_closest(section, SECTIONS)}; "
                              f"sections: {sorted(SECTIONS)}")
        sec = data.setdefault(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{where(section)}: [{section}] must be a table of keys")
        sec[key] = value
    sections: dict[str, Any] = {}
    for name in data:
        if name not in SECTIONS and name not in extra_sections:
            raise ConfigError(f"{where(name)}: unknown section [{name}]{_closest(name, SECTIONS)}; "
                              f"sections: {sorted(SECTIONS)}")
    for name, cls in SECTIONS.items():
        sec = data.get(name, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{where(name)}: [{name}] must be a table of keys, got {type(sec).__name__}")
        hints = typing.get_type_hints(cls)
        for key, value in sec.items():
            dotted = f"{name}.{key}"
            if key not in hints:
                raise ConfigError(f"{where(name, key)}: unknown key {dotted!r}{_closest(key, hints)}; "
                                  f"[{name}] takes {sorted(hints)}")
            if not _check_type(value, hints[key]):
                raise ConfigError(f"{where(name, key)}: {dotted} = {value!r} is a {type(value).__name__}, "
                                  f"expected {_type_name(hints[key])}")
            _check_value(dotted, value, where(name, key))
        try:
            sections[name] = cls(**sec)
        except ConfigError as e:
            raise ConfigError(f"{where(name)}: {e}") from None
    extra = {name: dict(data.get(name, {})) for name in extra_sections}
    cfg = TrainConfig(**sections, base_dir=base, extra=extra)
    _check_files(cfg, where)
    return cfg


def _check_value(dotted: str, value: Any, at: str) -> None:
    if dotted in CHOICES and value not in CHOICES[dotted]:
        raise ConfigError(f"{at}: {dotted} = {value!r} is not one of {list(CHOICES[dotted])}"
                          f"{_closest(str(value), CHOICES[dotted])}")
    if dotted in POSITIVE and not value > 0:
        raise ConfigError(f"{at}: {dotted} must be positive, got {value!r}")
    if dotted in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{at}: {dotted} must be 0 or more, got {value!r}")
    if dotted == "parallel.mesh" and isinstance(value, str) and value != "auto":
        raise ConfigError(f"{at}: parallel.mesh = {value!r}: give a list of sizes such as [2, 2], or \"auto\"")
    if dotted == "parallel.mesh" and isinstance(value, list) and (not value or any(v < 1 for v in value)):
        raise ConfigError(f"{at}: parallel.mesh = {value!r}: sizes must be positive integers")
    if dotted == "parallel.zero" and value not in (0, 1, 2, "auto"):
        raise ConfigError(f"{at}: parallel.zero = {value!r} is not 0, 1, 2 or \"auto\"")
    if dotted == "parallel.offload" and value not in (True, False, "auto"):
        raise ConfigError(f"{at}: parallel.offload = {value!r} is not true, false or \"auto\"")
    if dotted == "optimizer.betas" and (len(value) != 2 or not all(0 <= b < 1 for b in value)):
        raise ConfigError(f"{at}: optimizer.betas = {value!r}: expected two numbers in [0, 1)")


def _check_files(cfg: TrainConfig, where: _Where) -> None:
    """Files the job names must exist (the model directory or config, corpus, tokenizer, plan)."""
    src = cfg.model.source
    if ":" not in src and ("/" in src or src.endswith(".json") or src.startswith(".")) \
            and not cfg.path(src).exists():
        raise ConfigError(f"{where('model', 'source')}: model.source {src!r}: {str(cfg.path(src))!r} does not "
                          f"exist (a built-in name, an HF model directory, a config.json or module:callable)")
    d = cfg.data
    if d.kind == "text":
        if not d.paths:
            raise ConfigError(f"{where('data', 'paths')}: data.kind = \"text\" needs data.paths (txt/jsonl files "
                              f"or directories)")
        for p in d.paths:
            if not cfg.path(p).exists():
                raise ConfigError(f"{where('data', 'paths')}: data.paths: {str(cfg.path(p))!r} does not exist")
        tok = d.tokenizer or (src if cfg.path(src).is_dir() else "")
        if not tok:
            raise ConfigError(f"{where('data', 'tokenizer')}: data.kind = \"text\" needs data.tokenizer (a local "
                              f"directory with tokenizer.json) when model.source is not an HF model directory")
        if not cfg.path(tok).is_dir():
            raise ConfigError(f"{where('data', 'tokenizer')}: data.tokenizer: {str(cfg.path(tok))!r} is not a "
                              f"directory")
    if d.kind == "tokens" and not cfg.path(d.tokens_path).is_file():
        raise ConfigError(f"{where('data', 'tokens_path')}: data.tokens_path: {str(cfg.path(d.tokens_path))!r} "
                          f"does not exist")
    if cfg.parallel.plan_file and not cfg.path(cfg.parallel.plan_file).is_file():
        raise ConfigError(f"{where('parallel', 'plan_file')}: parallel.plan_file: "
                          f"{str(cfg.path(cfg.parallel.plan_file))!r} does not exist")
    t = cfg.training
    if t.global_batch_tokens and t.global_batch_tokens % d.seq_len:
        raise ConfigError(f"{where('training', 'global_batch_tokens')}: training.global_batch_tokens = "
                          f"{t.global_batch_tokens} is not a multiple of data.seq_len = {d.seq_len}")
    object.__setattr__(cfg, "_where", where)


def where_of(cfg: TrainConfig, section: str, key: str | None = None) -> str:
    """``file:line`` of a key of a loaded config (``config`` for one built from a dict)."""
    w = getattr(cfg, "_where", None)
    return w(section, key) if w is not None else "config"


def mesh_for(cfg: TrainConfig, world_size: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The mesh shape and dim names for ``world_size`` ranks (ConfigError when the mesh does not fit)."""
    p = cfg.parallel
    shape = (world_size,) if p.mesh == "auto" else tuple(p.mesh)
    if math.prod(shape) != world_size:
        raise ConfigError(f"{where_of(cfg, 'parallel', 'mesh')}: parallel.mesh = {list(shape)} has "
                          f"{math.prod(shape)} positions but the job runs on {world_size} ranks; launch with "
                          f"--nproc-per-node {math.prod(shape)} or change parallel.mesh")
    names = tuple(p.dim_names) if p.dim_names else default_dim_names(len(shape))
    if len(names) != len(shape):
        raise ConfigError(f"{where_of(cfg, 'parallel', 'dim_names')}: parallel.dim_names = {list(names)} has "
                          f"{len(names)} names for a {len(shape)}-dim mesh {list(shape)}")
    return shape, names


@dataclass(frozen=True, kw_only=True)
class BatchLayout:
    global_batch: int
    """Sequences per step."""
    dp: int
    """Data-parallel ranks (product of the mesh dims named dp)."""
    micro_batch: int
    """Sequences per forward on one dp rank."""
    grad_accum: int
    """Micro-batches per step."""


def resolve_batch(cfg: TrainConfig, dp: int) -> BatchLayout:
    """global = micro_batch * dp * grad_accum, with the unset ones derived (ConfigError when inconsistent)."""
    t = cfg.training
    at = where_of(cfg, "training", "global_batch")
    gb = t.global_batch_tokens // cfg.data.seq_len if t.global_batch_tokens else t.global_batch
    if gb < 1:
        raise ConfigError(f"{at}: training.global_batch must be positive (or set training.global_batch_tokens)")
    if gb % dp:
        raise ConfigError(f"{at}: inconsistent batch sizes: a global batch of {gb} sequences does not split over "
                          f"{dp} data-parallel ranks")
    per_rank = gb // dp
    mb, acc = t.micro_batch, t.grad_accum
    if mb == 0 and acc == 0:
        acc = 1
    if mb == 0:
        if per_rank % acc:
            raise ConfigError(f"{at}: inconsistent batch sizes: {gb} sequences over {dp} dp ranks = {per_rank} per "
                              f"rank, not divisible into training.grad_accum = {acc} micro-batches")
        mb = per_rank // acc
    elif acc == 0:
        if per_rank % mb:
            raise ConfigError(f"{at}: inconsistent batch sizes: {per_rank} sequences per dp rank ({gb} over {dp}) "
                              f"is not a multiple of training.micro_batch = {mb}")
        acc = per_rank // mb
    elif mb * dp * acc != gb:
        raise ConfigError(f"{at}: inconsistent batch sizes: training.global_batch = {gb} but micro_batch {mb} x "
                          f"{dp} dp ranks x grad_accum {acc} = {mb * dp * acc}; set one of them to 0 to derive it")
    return BatchLayout(global_batch=gb, dp=dp, micro_batch=mb, grad_accum=acc)
