"""The training loop behind ``autopar train``: one ordered function, each part a small helper.

    process group -> model -> mesh + plan (autopar.parallelize / apply) -> HF weights -> data loader
    -> optimizer -> resume -> steps (micro-batches, one gradient sync, clip, schedule, step) -> checkpoints

Under torchrun (``WORLD_SIZE`` > 1) or in processes that already hold a process group, the model is
planned on rank 0 and applied on every rank with ``input_mode="local"``: the batch is split over the mesh
dims named ``dp`` and each dp rank reads only its samples. In one process (no process group) the plain
model runs the same loop, which is the single-device reference a parallel run must match.

A mesh with a dim named ``pp`` gives a pipelined plan (``parallel.pipeline``): its step is one
``autopar.forward_backward`` over the global batch (the pipeline runtime's contract: every rank is handed
the whole batch, the stage plans split it over the other dims), which runs the plan's schedule over
``training.grad_accum`` micro-batches (the plan's micro-batches: no accumulation loop here, and the
data-parallel gradients are summed once per step by the runtime's ``StepReducer``). The loss comes back on
every rank (the runtime broadcasts the last stage's over the pp group). The gradient norm for clipping and
logging is global over pp too: each rank's squared norm of its stages' gradients (a weight tied across pp
ranks counted once, on the lowest) is summed over the pp group.

The planner's front end (``autopar.parallelize`` / ``autopar.apply``) sits a floor above this package, so a
parallel run is handed them (``autopar train`` and the examples pass ``autopar.parallelize`` and
``autopar.apply``). Must not: parse files (``autopar.train.config``) or read data formats
(``autopar.train.data``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from autopar.cluster.profile import load_cluster
from autopar.core.errors import ConfigError
from autopar.core.mesh import PP_DIM
from autopar.core.plan import Plan
from autopar.runtime.distributed import Config as RunConfig
from autopar.runtime.distributed import init_distributed
from autopar.runtime.host_optimizer import HostOptimizer, make_optimizer
from autopar.runtime.pipeline import PipelineModule, forward_backward
from autopar.train.accumulate import Accumulator
from autopar.train.checkpoints import CheckpointWriter, latest_checkpoint, restore
from autopar.train.config import BatchLayout, TrainConfig, mesh_for, resolve_batch, where_of
from autopar.train.data import Loader, Source, build_source
from autopar.train.hf_io import load_hf_weights, materialize_parameters
from autopar.train.metrics import MetricsLogger, memory_per_rank
from autopar.train.model import Adapter, build_model, to_device

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "lr_at", "train"]

PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    """Step (1-based, steps done) -> loss, for the steps this run executed."""
    start_step: int = 0
    """Steps already done when this run started (resumed from a checkpoint)."""
    module: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    records: list[dict] = field(default_factory=list)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up, then cosine / linear / constant."""
    s, o = cfg.schedule, cfg.optimizer
    if step < s.warmup_steps:
        return o.lr * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return o.lr
    span = max(1, cfg.training.steps - s.warmup_steps - 1)
    frac = min(1.0, (step - s.warmup_steps) / span)
    floor = o.lr * s.min_lr_ratio
    if s.decay == "linear":
        return o.lr - (o.lr - floor) * frac
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def _device(world: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0)
    return torch.device("cpu")


def _pipelined(cfg: TrainConfig, names: tuple[str, ...]) -> bool:
    """Whether the job plans pipeline stages (``parallel.pipeline`` against a ``pp`` dim in the mesh)."""
    want = cfg.parallel.pipeline
    if want is True and PP_DIM not in names:
        raise ConfigError(f"{where_of(cfg, 'parallel', 'pipeline')}: parallel.pipeline = true needs a mesh dim "
                          f"named {PP_DIM!r} (parallel.dim_names = {list(names)}), e.g. mesh = [2, 2] with "
                          f"dim_names = [\"pp\", \"dp\"]")
    return want is not False and PP_DIM in names


def _plan_options(cfg: TrainConfig, names: tuple[str, ...], pipelined: bool, layout: BatchLayout) -> dict:
    p = cfg.parallel
    opts: dict = {"time_limit": p.time_limit}
    if pipelined:            # the plan's micro-batches are the job's
        pipe: dict = {"microbatches": layout.grad_accum}
        if p.pipeline_schedule != "auto":
            pipe["schedule"] = p.pipeline_schedule
        if p.pipeline_stages:
            pipe["stages"] = p.pipeline_stages
        opts["pipeline"] = pipe
    elif PP_DIM in names:    # parallel.pipeline = false: pp is an ordinary dim
        opts["pipeline"] = False
    if "dp" in names and not pipelined:   # the batch splits over dp: each dp rank reads only its samples
        opts["fix"] = {"input:*": ["S(0)" if n == "dp" else "R" for n in names]}
    if p.memory_budget not in ("", 0):
        opts["memory_budget"] = p.memory_budget
    if p.precision != "fp32":
        opts["precision"] = p.precision
    if p.zero != "auto":
        opts["zero"] = p.zero
    if p.recompute != "auto":
        opts["recompute"] = p.recompute
    if p.offload != "auto":
        opts["offload"] = p.offload
    return opts


def _dp_rank(mesh, names: tuple[str, ...]) -> tuple[int, int]:
    """(dp size, this rank's dp index) over the mesh dims named dp (row-major)."""
    dp, idx = 1, 0
    for i, n in enumerate(names):
        if n == "dp":
            dp, idx = dp * mesh.shape[i], idx * mesh.shape[i] + mesh.get_local_rank(i)
    return dp, idx


def _parallel_module(cfg: TrainConfig, model: nn.Module, adapter: Adapter, source: Source, world: int,
                     device: torch.device, parallelize: Callable, apply: Callable):
    from torch.distributed.device_mesh import init_device_mesh

    shape, names = mesh_for(cfg, world)
    pipelined = _pipelined(cfg, names)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    dp, dp_idx = _dp_rank(mesh, names)
    layout = resolve_batch(cfg, dp)
    # a pipeline takes the global batch (split into its micro-batches); a flat plan one dp rank's micro-batch
    rows = [source.get(i % len(source)) for i in range(layout.global_batch if pipelined else layout.micro_batch * dp)]
    example = adapter.inputs({k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]})
    if cfg.parallel.plan_file:
        plan = Plan.from_json(cfg.path(cfg.parallel.plan_file))
        module = apply(model, plan, mesh, input_mode="global" if plan.pipeline is not None else "local")
    else:
        module = parallelize(model, mesh, example, cluster=cfg.parallel.cluster or None,
                             input_mode="global" if pipelined else "local",
                             **_plan_options(cfg, names, pipelined, layout))
    if isinstance(module, PipelineModule):
        _check_pipeline(cfg, module, layout)
    if cfg.parallel.plan_out and dist.get_rank() == 0:
        module.plan.to_json(cfg.path(cfg.parallel.plan_out))
    return module, layout, dp_idx


def _check_pipeline(cfg: TrainConfig, module: PipelineModule, layout: BatchLayout) -> None:
    """A pipelined plan (planned here or read from ``parallel.plan_file``) must run the job's batch layout."""
    planned = module.plan.model.inputs[0]["shape"][0]
    if module.microbatches != layout.grad_accum or planned != layout.global_batch:
        raise ConfigError(f"{where_of(cfg, 'training', 'grad_accum')}: the pipelined plan runs {planned} sequences "
                          f"per step in {module.microbatches} micro-batches but the job has training.global_batch "
                          f"= {layout.global_batch} in training.grad_accum = {layout.grad_accum}; set them to the "
                          f"plan's (its micro-batches are the job's accumulation steps) or re-plan")


def _optimizer(cfg: TrainConfig, module: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    impl = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}
    kwargs = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, **impl[o.impl]}
    plan = getattr(module, "plan", None)
    if plan is not None and getattr(plan, "optimizer_offload", False) and not plan.optimizer_sharding:
        return HostOptimizer(groups, torch.optim.AdamW, **kwargs)   # the plan keeps optimizer states on the host
    return make_optimizer(module, torch.optim.AdamW, params=groups, **kwargs)


def _grad_norm(module: nn.Module, max_norm: float) -> float:
    if isinstance(module, PipelineModule):
        return _pipeline_grad_norm(module, max_norm)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in module.parameters() if p.grad is not None], max_norm, norm)
    return float(norm)


def _pipeline_grad_norm(module: PipelineModule, max_norm: float) -> float:
    """The 2-norm of every stage's gradients (global over pp, and over the stages' sub-mesh for DTensors),
    then clipping of this rank's gradients by it. A weight tied across pp ranks (its gradient already summed
    over them by the runtime) is counted once, on the lowest pp rank holding it."""
    pp_rank = module.mesh.get_local_rank(PP_DIM)
    own = [p.grad for n, p in module.named_parameters() if p.grad is not None
           and (n not in module.tied or module.tied[n][0] == pp_rank)]
    sq = torch.zeros((), dtype=torch.float32, device=module.mesh.device_type)
    if own:
        norm = torch.nn.utils.get_total_norm(own, 2.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        sq = norm.to(sq.device, torch.float32).square()
    dist.all_reduce(sq, group=module.pp_group)
    total = sq.sqrt()
    grads = [p for p in module.parameters() if p.grad is not None]
    if max_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total)
    return float(total)


def _stage_loss(output, target) -> torch.Tensor:
    """The loss in what the last pipeline stage returns (the model's own loss: a tensor, or the first element of
    an HF model's flattened output), as the schedules' loss function (one object: the schedule is built once)."""
    loss = Adapter.loss(output)
    if loss.numel() != 1:
        raise ConfigError(f"the model's forward returned a loss of shape {list(loss.shape)}, not a scalar; return the "
                          f"mean loss over the batch")
    return loss.reshape(())


def _param_count(module: nn.Module) -> int:
    """Parameters of the whole model (a pipelined module holds only this rank's stages)."""
    if isinstance(module, PipelineModule):
        return module.plan.model.num_parameters or sum(math.prod(s) for s in module.plan.model.param_shapes.values())
    return sum(p.numel() for p in module.parameters())


def _peak_flops(cfg: TrainConfig, device: torch.device, world: int) -> float:
    if cfg.logging.peak_flops:
        return cfg.logging.peak_flops * world
    cluster = cfg.parallel.cluster or ("cpu-gloo" if device.type == "cpu" else "h100-sxm")
    return load_cluster(cluster).device.flops_for(PRECISION_DTYPE[cfg.parallel.precision]) * world


def _autocast(cfg: TrainConfig, device: torch.device, parallel: bool):
    """Mixed precision in one process (an applied module autocasts itself from its plan)."""
    if parallel or cfg.parallel.precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=getattr(torch, PRECISION_DTYPE[cfg.parallel.precision]))


def train(cfg: TrainConfig, *, parallelize: Callable | None = None, apply: Callable | None = None,
          model: nn.Module | None = None, adapter: Adapter | None = None, source: Source | None = None
          ) -> TrainResult:
    """Run the job ``cfg``. ``parallelize`` / ``apply``: ``autopar.parallelize`` / ``autopar.apply`` (needed
    with a process group); ``model`` / ``adapter`` / ``source`` replace the configured ones (examples)."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        init_distributed(RunConfig(distributed=cfg.distributed))
    rank = dist.get_rank() if dist.is_initialized() else 0
    parallel = dist.is_initialized()
    device = _device(world)
    if model is None:
        model, built = build_model(cfg)
        adapter = adapter or built
    adapter = adapter or Adapter("passthrough")
    model = to_device(model, device)     # an HF model whose weights are loaded keeps its parameters on meta
    source = source if source is not None else build_source(cfg, adapter.vocab_size)
    torch.manual_seed(cfg.training.seed)
    if parallel:
        if parallelize is None or apply is None:
            raise ConfigError("a parallel run needs the planner's front end: call train(cfg, "
                              "parallelize=autopar.parallelize, apply=autopar.apply)")
        if adapter.hf_dir is not None:
            # Not planned on meta yet: a graph captured from meta parameters keeps `.to(meta)` calls (HF rotary
            # tables) and, in unplanned pipeline stages, factories on meta (codegen's place_factories re-points
            # factories of planned graphs only). So the parameters the HF files will fill are allocated
            # (uninitialized: no random init) before planning.
            materialize_parameters(model, device)
        module, layout, dp_idx = _parallel_module(cfg, model, adapter, source, world, device, parallelize, apply)
    else:
        _pipelined(cfg, mesh_for(cfg, 1)[1])     # the same config checks as a parallel run
        if adapter.hf_dir is None and any(p.is_meta for p in model.parameters()):
            raise ConfigError("the model's parameters are on the meta device and no weights are loaded into them; "
                              "one process runs the plain model: build it on a real device")
        module, layout, dp_idx = model, resolve_batch(cfg, 1), 0
    pipelined = isinstance(module, PipelineModule)
    if adapter.hf_dir is not None:
        load_hf_weights(module, adapter.hf_dir, device=device)
    if pipelined:   # every rank reads the global batch, which the schedule splits into the micro-batches
        loader = Loader(source, global_batch=layout.global_batch, dp=1, dp_rank=0, micro_batch=layout.global_batch,
                        grad_accum=1, seed=cfg.data.seed)
    else:
        loader = Loader(source, global_batch=layout.global_batch, dp=layout.dp, dp_rank=dp_idx,
                        micro_batch=layout.micro_batch, grad_accum=layout.grad_accum, seed=cfg.data.seed)
    opt = _optimizer(cfg, module)
    ck = cfg.checkpoint
    ck_dir = cfg.path(ck.dir) if ck.dir else None
    start = 0
    if ck_dir is not None and ck.resume:
        latest = latest_checkpoint(ck_dir)
        if latest is not None:
            extra = restore(latest, module, opt)
            loader.load_state_dict(extra["data"])
            start = int(extra["step"])
            log.info("resumed from %s at step %d", latest, start)
    metrics_path = cfg.path(cfg.logging.metrics_file) if cfg.logging.metrics_file else \
        (ck_dir / "metrics.jsonl" if ck_dir is not None else None)
    logger = MetricsLogger(metrics_path, rank=rank, total_steps=cfg.training.steps, start_step=start,
                           progress=cfg.logging.progress,
                           tensorboard_dir=cfg.path(cfg.logging.tensorboard_dir) if cfg.logging.tensorboard_dir
                           else None)
    n_params = _param_count(module)
    tokens_per_sample = getattr(source, "tokens_per_sample", 1)
    peak = _peak_flops(cfg, device, world)
    writer = CheckpointWriter(ck_dir, ck.keep_last, asynchronous=ck.async_save) if ck_dir is not None else None
    acc = Accumulator(module)
    result = TrainResult(start_step=start, module=module, optimizer=opt)
    t_start = time.perf_counter()
    try:
        for step in range(start, cfg.training.steps):
            t0 = time.perf_counter()
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = loader.next_step()
            total = torch.zeros((), device=device)
            if pipelined:   # the schedule runs the micro-batches; the mean of their losses comes back
                (batch,) = micro
                inputs = adapter.inputs({k: v.to(device) for k, v in batch.items()})
                target = torch.zeros(layout.global_batch, 0, device=device)   # splits like the batch; unused
                total += forward_backward(module, inputs, target, _stage_loss).float().to(device)
            for i, mb in enumerate(() if pipelined else micro):
                with _autocast(cfg, device, parallel):
                    out = module(**adapter.inputs({k: v.to(device) for k, v in mb.items()}))
                loss = adapter.loss(out) / layout.grad_accum
                acc.backward(loss, last=i == len(micro) - 1)
                total += loss.detach().float()
            gnorm = _grad_norm(module, cfg.optimizer.clip_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)   # pipelined too: StepReducer.held() adopts the cleared gradients
            loss_val = float(total)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            done = step + 1
            result.losses[done] = loss_val
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"step {done}: the loss is {loss_val}; lower optimizer.lr or check the data")
            if done % cfg.logging.every == 0 or done == cfg.training.steps:
                tokens = layout.global_batch * tokens_per_sample
                rec = {"step": done, "loss": loss_val, "lr": lr, "grad_norm": gnorm, "tokens": tokens,
                       "step_time_s": dt, "elapsed_s": time.perf_counter() - t_start, "tokens_per_s": tokens / dt,
                       "mfu": 6 * n_params * tokens / dt / peak, **memory_per_rank(device)}
                result.records.append(rec)
                logger.log(rec)
            if writer is not None and ((ck.interval and done % ck.interval == 0) or done == cfg.training.steps):
                writer.save(done, module, opt, loader.state_dict())
        if writer is not None:
            writer.finish()   # the last checkpoint complete before returning
    finally:
        logger.close()
    return result
