"""The pipeline runtime: this rank's stages (``PipelineModule``) driven by ``torch.distributed.pipelining``.

``forward_backward`` runs one training step for any module autopar made: plain autograd for a
ParallelModule, the plan's schedule (torch's ``ScheduleGPipe`` / ``Schedule1F1B`` /
``ScheduleInterleaved1F1B``; no schedule is written here) over micro-batches for a pipelined one. Weights
used by stages on several pp ranks (tied embedding and LM head) get their gradients summed over the pp
group. Stages are built by ``autopar.frontend.applying.apply_pipeline``; this module never plans.

Stage boundaries are sent per rank: a stage returns each value it sends on as this rank's local piece in the
plan's ``send_placements`` (codegen reshards it there), torch's stages send it to the rank with the same
coordinates on the other pp dims, and the next stage takes it as its local input (``input_mode="local"``), with
the local shapes as static metadata. A plan without ``send_placements`` sends whole, replicated values.

Data-parallel gradients are summed once per step, not once per micro-batch: every stage is applied with
the bucketed reducer (``defer_param_grads=True``: no gradient all-reduce inside the stage graphs), and
``StepReducer`` takes that reducer's buckets (``autopar.core.runtime_rules.grad_buckets``, as the flat
plans' ``autopar.runtime.grad_sync``) out of backward: the micro-batches accumulate their local
gradients, and after the schedule each bucket is concatenated and all-reduced (one call per bucket and
mesh dim, the last dim asynchronously, every bucket in flight before the first wait). The pipeline
planner (``autopar.solver.pipeline``) charges this reduction once per step, after the schedule.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining

from autopar.core.capture import ExampleInputs, normalize_inputs
from autopar.core.errors import ConfigError, PlanMismatchError
from autopar.core.mesh import PP_DIM
from autopar.core.plan import Plan
from autopar.ops.collectives import redistribute
from autopar.ops.parallel_ops import local_chunk, placements
from autopar.runtime.module import _adopt_grad
from autopar.runtime.precision import check_precision, compute_dtype, precision_context

__all__ = ["PipelineModule", "StepReducer", "batch_size", "forward_backward", "stage_io"]


SCHEDULE_CLASSES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B"}


class PipelineModule(nn.Module):
    """This rank's pipeline stages. ``named_parameters()`` are its stages' parameters under their
    original FQNs (DTensors on the sub-mesh when the stages are sharded). Run a step with
    ``autopar.forward_backward``; calling the module directly is not supported (a pipeline runs a
    whole batch through every rank at once)."""

    def __init__(self, plan: Plan, mesh, submesh, stage_modules: dict[int, nn.Module], stage_io: dict,
                 pp_group, tied: dict[str, list[int]], received: dict[int, list[tuple[str, str]]] | None = None):
        super().__init__()
        self.__dict__["stage_io"] = stage_io
        # per stage taking its inputs per rank: (placements sent in, placements its plan reads them in) per input
        self.__dict__["received"] = dict(received or {})
        self.__dict__["plan"] = plan
        self.__dict__["mesh"] = mesh
        self.__dict__["submesh"] = submesh
        self.__dict__["_schedules"] = {}
        self.__dict__["stage_modules"] = stage_modules
        self.__dict__["pp_group"] = pp_group
        self.__dict__["tied"] = tied
        pipe = plan.pipeline
        self.num_stages = len(pipe["stages"])
        self.pp = mesh.shape[mesh.mesh_dim_names.index(PP_DIM)] if mesh is not None else 1
        self.microbatches = pipe["microbatches"]
        self.schedule_name = pipe["schedule"]
        self.__dict__["reducer"] = StepReducer(stage_modules)
        seen: dict[str, nn.Parameter] = {}
        for s in sorted(stage_modules):
            for fqn, prm in stage_modules[s].named_parameters(remove_duplicate=False):
                if fqn in seen and seen[fqn] is not prm:
                    raise PlanMismatchError(f"parameter {fqn!r} is used by two stages on one rank; pipelining "
                                            f"cannot keep two copies in step: plan with other stages")
                seen[fqn] = prm
        for fqn, prm in seen.items():   # a tree of plain modules: original FQNs, shared Parameter objects
            *path, leaf = fqn.split(".")
            mod = self
            for part in path:
                if part not in mod._modules:
                    mod.add_module(part, nn.Module())
                mod = mod._modules[part]
            mod.register_parameter(leaf, prm)

    def stage_param(self, fqn: str) -> nn.Parameter | None:
        """This rank's copy of a parameter (None when none of its stages uses it)."""
        try:
            return self.get_parameter(fqn)
        except AttributeError:
            return None

    def forward(self, *args, **kwargs):
        raise ConfigError("a pipelined module runs whole steps: call autopar.forward_backward(module, inputs)")

    def extra_repr(self) -> str:
        return (f"stages={sorted(self.stage_modules)} of {self.num_stages}, schedule={self.schedule_name!r}, "
                f"microbatches={self.microbatches}")


class _MixedPrecisionStage(nn.Module):
    """A stage run under the plan's autocast (``plan.precision``; parameters stay float32), its outputs cast
    back to the dtypes the plan's stage boundaries carry (``stage_io``): torch's PipelineStage checks what a
    stage sends against those, and the next stage then reads what one device under autocast reads there (a
    residual stream autocast keeps in float32 is sent as float32; the cast is a no-op then)."""

    def __init__(self, stage: nn.Module, plan: Plan, device_type: str, out_dtypes: list[torch.dtype]):
        super().__init__()
        self.stage = stage
        self.plan, self.device_type, self.out_dtypes = plan, device_type, out_dtypes

    def forward(self, *args, **kwargs):
        with precision_context(self.plan, self.device_type):
            out = self.stage(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return _cast(out, self.out_dtypes[0]) if self.out_dtypes else out
        return type(out)(_cast(o, d) for o, d in zip(out, self.out_dtypes)) if isinstance(out, (tuple, list)) \
            else out


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t


class _ReceivingStage(nn.Module):
    """A stage whose plan reads an input in other placements than the previous stage sends it in (a partial sum
    the sender summed first: ``R -> P``, no communication; or a stage told to read it otherwise): each input is
    redistributed (autograd-aware, ``ops.collectives.redistribute``) before the stage runs."""

    def __init__(self, stage: nn.Module, mesh, conversions: list[tuple[str, str]]):
        super().__init__()
        self.stage, self.mesh = stage, mesh
        self.conversions = [(placements(a), placements(b)) for a, b in conversions]

    def forward(self, *args):
        return self.stage(*(redistribute(x, a, b, mesh=self.mesh) if a != b else x
                            for x, (a, b) in zip(args, self.conversions)))


def _stage_module(pm: PipelineModule, s: int, mod: nn.Module) -> nn.Module:
    """The module torch's PipelineStage runs for stage ``s``: ``mod`` (taking inputs sent per rank in the
    placements its plan reads them in), under autocast for a lower-precision plan."""
    conv = pm.received.get(s)
    if conv is not None and any(a != b for a, b in conv):
        mod = _ReceivingStage(mod, pm.submesh, conv)
    if compute_dtype(pm.plan) == torch.float32:
        return mod
    if check_precision(pm.plan.precision)["loss_scaling"] == "dynamic":
        raise ConfigError("a pipelined plan with float16 compute needs dynamic loss scaling, which the pipeline "
                          "schedules do not apply yet; use precision='bf16' (no loss scaling) or pipeline=False")
    return _MixedPrecisionStage(mod, pm.plan, pm.mesh.device_type, [dt for _, dt in pm.stage_io[s][1]])


def batch_size(args: tuple, kwargs: dict) -> int:
    sizes = {t.shape[0] for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise ConfigError(f"pipelining splits every input along dim 0 into micro-batches, but the inputs' first "
                          f"dims are {sorted(sizes)}; give inputs that share one batch dim")
    return sizes.pop()


def _output_is_loss(output, target):
    """The model computed its loss itself (labels among the inputs): the last stage's output is it."""
    if not isinstance(output, torch.Tensor) or output.numel() != 1:
        raise ConfigError("the model's output is not a scalar loss; pass loss_fn= and target= to "
                          "autopar.forward_backward")
    return output.reshape(())


def forward_backward(module: nn.Module, inputs: ExampleInputs, target: torch.Tensor | None = None,
                     loss_fn=None) -> torch.Tensor:
    """One forward and backward over ``inputs`` (a dict of keyword or a tuple of positional inputs).

    The loss is the module's output (a model that computes its loss from labels among the inputs) or
    ``loss_fn(output, target)``. Gradients are left in the parameters' ``.grad`` (accumulated, as
    with ``loss.backward()``); the loss is returned (detached) on every rank. On a pipelined module the
    step runs the plan's schedule over its micro-batches (mean of the micro-batch losses, gradients
    of that mean); otherwise plain autograd.
    """
    if (target is None) != (loss_fn is None):
        raise ConfigError("give target= and loss_fn= together (or neither, when the model returns its loss)")
    args, kwargs = normalize_inputs(inputs)
    if not isinstance(module, PipelineModule):
        out = module(*args, **kwargs)
        loss = loss_fn(out, target) if loss_fn is not None else _output_is_loss(out, None)
        loss.backward()
        return loss.detach()
    return _pipeline_step(module, args, kwargs, target, loss_fn)


def _pipeline_step(pm: PipelineModule, args: tuple, kwargs: dict, target, loss_fn) -> torch.Tensor:
    batch = batch_size(args, kwargs)
    planned = pm.plan.model.inputs[0]["shape"][0]
    if batch != planned:
        raise PlanMismatchError(f"the batch has {batch} samples but the pipeline was planned for {planned} "
                                f"({pm.microbatches} micro-batches); re-plan for this batch")
    # The first stage takes every input positionally, in the captured order.
    order = [i["arg"] or i["name"] for i in pm.plan.model.inputs]
    if kwargs:
        missing = [n for n in order if n not in kwargs]
        if missing:
            raise PlanMismatchError(f"input {missing[0]!r} was planned but not given")
        args = tuple(kwargs[n] for n in order)
    fn = loss_fn if loss_fn is not None else _output_is_loss
    if target is None:   # the schedules hand every loss_fn call a target: give one that splits like the batch
        target = torch.zeros(batch, 0)
    sched = pm._schedules.get(fn)
    if sched is None:    # stages and schedule are built once per loss function and reused every step
        device = torch.device("cpu") if pm.mesh.device_type == "cpu" else \
            torch.device("cuda", torch.cuda.current_device())
        # static metadata: the shapes are the plan's (inferring them would run stages on uninitialized data)
        stages = [pipelining.PipelineStage(_stage_module(pm, s, mod), s, pm.num_stages, device, group=pm.pp_group,
                                           input_args=_examples(pm.stage_io[s][0], device, s > 0),
                                           output_args=_examples(pm.stage_io[s][1], device, True))
                  for s, mod in sorted(pm.stage_modules.items())]
        cls = getattr(pipelining, SCHEDULE_CLASSES[pm.schedule_name])
        sched = cls(stages if pm.schedule_name == "interleaved" else stages[0], n_microbatches=pm.microbatches,
                    loss_fn=fn)
        pm._schedules[fn] = sched
    holds_last = (pm.num_stages - 1) in pm.stage_modules
    losses: list[torch.Tensor] = []
    is_first = 0 in pm.stage_modules
    base = _tied_grads(pm)
    held = pm.reducer.held()
    sched.step(*(args if is_first else ()), target=target if holds_last else None, losses=losses,
               return_outputs=False)
    pm.reducer.reduce(held)       # data-parallel sums first: the tied weights' parts are then whole per pp rank
    _sync_tied_grads(pm, base)
    loss = (torch.stack([x.detach().reshape(()) for x in losses]).mean() if holds_last
            else torch.zeros((), dtype=torch.float32))
    last_rank = (pm.num_stages - 1) % pm.pp
    dist.broadcast(loss, group=pm.pp_group, group_src=last_rank)
    return loss


def _examples(metas: list[tuple[list[int], torch.dtype]], device, grad: bool) -> tuple[torch.Tensor, ...]:
    """Example tensors for a stage's static metadata; floating ones carry gradients between stages."""
    return tuple(torch.zeros(shape, dtype=dtype, device=device).requires_grad_(grad and dtype.is_floating_point)
                 for shape, dtype in metas)


def stage_io(gm) -> tuple[list, list]:
    """(shape, dtype) of a stage graph's inputs and outputs, from the captured metadata."""
    ins = [(list(n.meta["val"].shape), n.meta["val"].dtype) for n in gm.graph.nodes if n.op == "placeholder"]
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outs = [(list(o.meta["val"].shape), o.meta["val"].dtype) for o in (out if isinstance(out, (tuple, list)) else (out,))]
    return ins, outs


def _full_grad(pm: PipelineModule, fqn: str) -> torch.Tensor | None:
    prm = pm.stage_param(fqn)
    if prm is None or prm.grad is None:
        return None
    g = prm.grad
    return (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()


def _tied_grads(pm: PipelineModule) -> dict[str, torch.Tensor | None]:
    """The gradients tied weights hold before a step (accumulation: only this step's part is summed)."""
    return {fqn: _full_grad(pm, fqn) for fqn in sorted(pm.tied)}


def _sync_tied_grads(pm: PipelineModule, base: dict[str, torch.Tensor | None]) -> None:
    """A weight used by stages on several pp ranks (tied embedding and LM head) gets one gradient per
    rank: sum this step's parts over the pp group so every copy takes the same step."""
    for fqn in sorted(pm.tied):
        prm = pm.stage_param(fqn)
        full = _full_grad(pm, fqn)
        before = base.get(fqn)
        delta = torch.zeros(pm.plan.model.param_shapes[fqn]) if full is None else \
            full - before if before is not None else full
        delta = delta.contiguous()
        dist.all_reduce(delta, group=pm.pp_group)
        if prm is None:
            continue
        total = delta + before if before is not None else delta
        g = prm.grad
        if g is None:
            continue
        if hasattr(g, "_local_tensor"):
            # this stage's own placements: the stages holding a tied weight may place it differently
            g._local_tensor.copy_(local_chunk(total, tuple(g.placements), pm.submesh))
        else:
            g.copy_(total)


class StepReducer:
    """Data-parallel gradient sums of a rank's pipeline stages, once per step (module docstring).

    Takes over each stage's ``GradReducer`` (built by ``autopar.apply`` from the plan's deferred gradients):
    its hooks are removed, its buckets kept (by FQN: a parameter replaced later is looked up anew), and each
    local leaf publishes its accumulated gradient to the DTensor parameter's ``.grad`` after every
    micro-batch (as ParallelModule does for gradients the reducer does not take), so the schedule's
    micro-batches accumulate unreduced local gradients. ``reduce`` then all-reduces them bucket by bucket."""

    def __init__(self, stage_modules: dict[int, nn.Module]):
        self.stages: list[tuple[nn.Module, object, list[tuple[list[str], tuple[int, ...]]]]] = []
        for _, mod in sorted(stage_modules.items()):
            red = mod.__dict__.get("grad_reducer")
            if red is None:
                continue
            red.remove()
            fqn_of = {id(local): fqn for fqn, (_, local) in mod._leaves.items()}
            buckets = [([fqn_of[id(t)] for t in params], tuple(dims)) for params, dims in zip(red.buckets, red.dims)]
            mod.__dict__["grad_reducer"] = None     # its forward no longer prepares a per-backward reduction
            mod.__dict__["_reduced"] = set()        # a parameter replaced later publishes its own gradient
            for fqns, _ in buckets:
                for fqn in fqns:
                    mod._leaf(fqn).register_post_accumulate_grad_hook(mod._publisher(fqn))
            self.stages.append((mod, red.mesh, buckets))

    def calls(self) -> int:
        """All-reduce calls one ``reduce`` makes when every bucketed parameter has a gradient."""
        return sum(len(dims) for _, _, buckets in self.stages for _, dims in buckets)

    def held(self) -> dict[tuple[int, str], torch.Tensor]:
        """Before a step: the (already summed) gradients the bucketed parameters hold (accumulation over steps).
        Each local leaf first takes its parameter's ``.grad`` as the stage's forward would (``_adopt_grad``): a
        gradient the optimizer cleared (``zero_grad(set_to_none=True)`` sets the parameter's to None, not the
        leaf's) holds nothing, rather than last step's sum, which ``reduce`` would subtract from this step's."""
        out = {}
        for i, (mod, _, buckets) in enumerate(self.stages):
            for fqns, _ in buckets:
                for fqn in fqns:
                    leaf = mod._leaf(fqn)
                    _adopt_grad(mod._leaves[fqn][0], leaf)
                    g = leaf.grad
                    if g is not None:
                        out[(i, fqn)] = g.detach().clone()
        return out

    def reduce(self, held: dict[tuple[int, str], torch.Tensor]) -> None:
        """Sum this step's local gradients over their data-parallel mesh dims, bucket by bucket: every bucket's
        calls are issued before the first wait; each gradient becomes a view of its bucket, published to the
        parameter's ``.grad``."""
        pending = []
        for i, (mod, mesh, buckets) in enumerate(self.stages):
            for fqns, dims in buckets:
                have = [(fqn, leaf) for fqn in fqns for leaf in (mod._leaf(fqn),) if leaf.grad is not None]
                if not have:
                    continue
                parts = [leaf.grad - held[(i, fqn)] if (i, fqn) in held else leaf.grad for fqn, leaf in have]
                flat = torch.cat([g.reshape(-1) for g in parts]) if len(parts) > 1 or not parts[0].is_contiguous() \
                    else parts[0].view(-1)
                works = []
                for k, d in enumerate(dims):
                    last = k == len(dims) - 1
                    w = dist.all_reduce(flat, group=mesh.get_group(d), async_op=last)
                    if last:
                        works.append(w)
                pending.append((i, mod, have, flat, works))
        for i, mod, have, flat, works in pending:
            for w in works:
                w.wait()
            offset = 0
            for fqn, leaf in have:
                n = leaf.numel()
                g = flat[offset:offset + n].view(leaf.shape)
                offset += n
                if (i, fqn) in held:
                    g = g.add_(held[(i, fqn)])
                if leaf.grad is not g:
                    leaf.grad = g
                mod._publisher(fqn)(leaf)
