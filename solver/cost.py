"""Cost model v0: pure functions of (op, shapes, placements, profile) -> seconds or bytes.

Compute: an op's measured time where the profile has per-op calibration for it (``op_times``, keyed
by ``op_key``: op, local input shapes, dtype, other arguments), else the roofline
``max(flops / achieved_flops, bytes / achieved_bandwidth) + op_overhead`` where achieved FLOP/s rise
with op size (DeviceSpec's efficiency curve); backward costs twice the forward FLOPs for contractions
and twice the bytes for memory-bound ops; views are free. Ops that run inside one fused kernel
(``fused_compute_cost``) share its traffic: inputs from outside the group read once, values leaving it
written once, one op overhead.

Communication: alpha-beta per mesh dim with ring volumes, S = bytes of the full (gathered) tensor
along that mesh dim, plus the link's per-call ``sync_s`` (ranks arriving at different times):
  all-reduce 2(n-1)/n*S, all-gather (n-1)/n*S, reduce-scatter (n-1)/n*S, all-to-all (n-1)/n*S.
A placement change (src -> dst) costs its forward collective plus the collective that carries
its gradient back (dst-side gradient placement -> src-side), where a replicated input of an op
that splits its work on a mesh dim receives a Partial gradient (the data-parallel all-reduce).

Memory per rank: parameters, gradients (same placement), AdamW states (two fp32 tensors per
parameter element), activations kept for backward (non-view op outputs, and gathered copies of
parameters an op keeps). Must not import codegen.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from autopar.cluster.profile import ClusterProfile, DeviceSpec, LinkSpec, OpKey
from autopar.core.graph import GNode, TensorMeta
from autopar.core.placement import Partial, Placement, Replicate, Shard, redistribute_steps
from autopar.core.runtime_rules import GRAD_BUCKET_BYTES, ring_traffic
from autopar.solver.strategies.base import Strategy

aten = torch.ops.aten

FREE_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
            aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
            aten.transpose.int, aten.permute.default, aten.t.default, aten.expand.default, aten.slice.Tensor,
            aten.select.int, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
            aten.alias.default, aten.detach.default, operator.getitem}
# views never own memory; these ops do not keep their output for backward either
NO_SAVED_OUTPUT = FREE_OPS | {aten.arange.default, aten.arange.start, aten.zeros.default, aten.ones.default,
                              aten.full.default, aten.scalar_tensor.default}
ADAM_STATE_BYTES_PER_ELEMENT = 8  # exp_avg + exp_avg_sq in fp32


@dataclass(frozen=True)
class OpCost:
    fwd_s: float
    bwd_s: float

    @property
    def total(self) -> float:
        return self.fwd_s + self.bwd_s


def shard_factor(placements: tuple[Placement, ...], mesh_shape: tuple[int, ...]) -> int:
    return math.prod(n for p, n in zip(placements, mesh_shape) if isinstance(p, Shard))


def local_bytes(meta: TensorMeta, placements: tuple[Placement, ...], mesh_shape: tuple[int, ...]) -> float:
    return meta.nbytes / shard_factor(placements, mesh_shape)


def contraction_flops(node: GNode, in_metas: list[TensorMeta]) -> float:
    """Forward FLOPs of matmul-like ops and attention (0 for everything else)."""
    t, out = node.target, node.outputs[0]
    if out is None:
        return 0.0
    if t in (aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.matmul.default):
        a = in_metas[1] if t == aten.addmm.default else in_metas[0]
        return 2.0 * out.numel * a.shape[-1]
    if t == aten.scaled_dot_product_attention.default:
        q, k = in_metas[0], in_metas[1]
        b_h = math.prod(q.shape[:-2])
        return 4.0 * b_h * q.shape[-2] * k.shape[-2] * q.shape[-1]
    return 0.0


def local_shape(meta: TensorMeta, placements: tuple[Placement, ...], mesh_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one rank's shard (the largest, as torch.chunk splits: ceil division)."""
    shape = list(meta.shape)
    for p, n in zip(placements, mesh_shape):
        if isinstance(p, Shard) and p.dim < len(shape):
            shape[p.dim] = -(-shape[p.dim] // n)
    return tuple(shape)


def _arg_text(a) -> str:
    if isinstance(a, fx.Node):
        return "T"
    if isinstance(a, (list, tuple)):
        return "[" + ",".join(_arg_text(x) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ",".join(f"{k}:{_arg_text(v)}" for k, v in sorted(a.items())) + "}"
    if isinstance(a, torch.device):   # a model captured on meta and the one timed share their keys
        return "device"
    return repr(a)


def op_key(node: GNode, strategy: Strategy, in_metas: list[TensorMeta], mesh_shape: tuple[int, ...]) -> OpKey:
    """How ``ClusterProfile.op_times`` knows an op: ATen overload, the local input shapes under ``strategy``,
    output dtype and the other (non-tensor) arguments as text (tensors written ``T``)."""
    fx_node = node.fx_node
    args = _arg_text((tuple(fx_node.args), dict(fx_node.kwargs))) if fx_node is not None else ""
    dtype = str(node.outputs[0].dtype).removeprefix("torch.") if node.outputs and node.outputs[0] is not None \
        else "float32"
    shapes = tuple(local_shape(m, p, mesh_shape) for m, p in zip(in_metas, strategy.inputs))
    return (str(node.target), shapes, dtype, args)


def compute_cost(node: GNode, strategy: Strategy, in_metas: list[TensorMeta], profile: ClusterProfile,
                 mesh_shape: tuple[int, ...]) -> OpCost:
    """Seconds of one op under ``strategy``: its measured time where the profile has per-op calibration
    for it (``profile.op_times``, looked up by ``op_key``), otherwise the roofline."""
    if node.kind != "op" or node.target in FREE_OPS:
        return OpCost(0.0, 0.0)
    if profile.op_times is not None:
        hit = profile.op_times.lookup(op_key(node, strategy, in_metas, mesh_shape))
        if hit is not None:
            tab = profile.op_times
            grads = 2 if contraction_flops(node, in_metas) else 1   # as the roofline's overhead: per gradient
            return OpCost(tab.scale * hit.fwd_s + tab.extra_op_s, tab.scale * hit.bwd_s + grads * tab.extra_op_s)
    dev = profile.device
    split = math.prod(n for n, s in zip(mesh_shape, strategy.split_dims()) if s)
    flops = contraction_flops(node, in_metas) / split
    nbytes = sum(local_bytes(m, p, mesh_shape) for m, p in zip(in_metas, strategy.inputs))
    nbytes += sum(local_bytes(m, p, mesh_shape) for m, p in zip(node.outputs, strategy.outputs)
                  if m is not None and p is not None)
    dtype = str(node.outputs[0].dtype).removeprefix("torch.") if node.outputs[0] is not None else "float32"
    return roofline_cost(flops, nbytes, dtype, dev)


def fused_compute_cost(node: GNode, strategy: Strategy, in_metas: list[TensorMeta], profile: ClusterProfile,
                       mesh_shape: tuple[int, ...], *, reads: tuple[bool, ...], writes: tuple[bool, ...],
                       launch: bool) -> OpCost:
    """compute_cost of a memory-bound op whose work a fused kernel does (codegen's fuse_kernels): the
    kernel reads each tensor from outside its group once and writes only the values that leave the
    group, so this op is charged the inputs flagged in ``reads`` and the outputs flagged in ``writes``
    (views write nothing), and only the op flagged ``launch`` pays the kernel's op overhead. Summed over
    a group this is roofline_cost of the fused kernel's traffic; backward keeps the 2x-bytes rule.
    Contractions and non-ops are not fused: their compute_cost is returned unchanged (measured times of
    ``profile.op_times`` included). A fused member keeps the roofline even where its op was timed: the timed
    op read and wrote all its tensors and launched alone, which the fused kernel does not."""
    if node.kind != "op" or contraction_flops(node, in_metas):
        return compute_cost(node, strategy, in_metas, profile, mesh_shape)
    nbytes = sum(local_bytes(m, p, mesh_shape) for m, p, r in zip(in_metas, strategy.inputs, reads) if r)
    if node.target not in FREE_OPS:
        nbytes += sum(local_bytes(m, p, mesh_shape) for m, p, w in zip(node.outputs, strategy.outputs, writes)
                      if w and m is not None and p is not None)
    dev = profile.device
    mem_t = nbytes / (dev.memory_bandwidth * dev.max_memory_efficiency)
    overhead = dev.op_overhead_s if launch else 0.0
    return OpCost(overhead + mem_t, overhead + 2 * mem_t)


def roofline_cost(flops: float, nbytes: float, dtype: str, dev: DeviceSpec) -> OpCost:
    """Forward and backward seconds of one op of ``flops`` (contraction FLOPs, 0 for memory-bound ops)
    moving ``nbytes`` on ``dev``: the roofline of the module docstring (shared with autopar.cluster.predict)."""
    mem_t = nbytes / (dev.memory_bandwidth * dev.max_memory_efficiency)
    if flops:
        eff = dev.max_matmul_efficiency * flops / (flops + dev.matmul_half_efficiency_flops)
        flop_t = flops / (dev.flops_for(dtype) * eff)
        fwd = max(flop_t, mem_t)
        return OpCost(dev.op_overhead_s + fwd, 2 * dev.op_overhead_s + 2 * fwd)
    return OpCost(dev.op_overhead_s + mem_t, dev.op_overhead_s + 2 * mem_t)


def checkpoint_overhead(node: GNode, dev: DeviceSpec) -> OpCost:
    """Seconds a checkpointed block pays for ``node`` beyond recomputing it (fwd_s: under the selective
    policy, bwd_s: under full checkpointing): every dispatched op of the block, views included, passes
    the selective policy's dispatch mode in the forward and again in the recompute, and full
    checkpointing re-runs views and its saved-tensor hooks (DeviceSpec's measured per-op surcharges).
    Python-level nodes (getitem) dispatch nothing."""
    if node.kind != "op" or node.target is operator.getitem:
        return OpCost(0.0, 0.0)
    return OpCost(dev.selective_op_overhead_s, dev.recompute_op_overhead_s)


# --- communication ------------------------------------------------------------------------
def collective_time(kind: str, full_bytes: float, n: int, link: LinkSpec) -> float:
    """alpha-beta time of one collective over n ranks; full_bytes is the unsharded size on that dim."""
    if n <= 1 or full_bytes <= 0:
        return 0.0
    ab = link.collectives[kind]
    volume = ring_traffic(kind, n) * full_bytes
    return ab.alpha + link.sync_s + ab.beta * volume


def grad_placement(p: Placement) -> Placement:
    """The placement of the gradient of a tensor with placement p."""
    return Replicate() if isinstance(p, Partial) else p


@functools.lru_cache(maxsize=65536)
def _step_plan(src: tuple[Placement, ...], dst: tuple[Placement, ...], mesh_shape: tuple[int, ...]
               ) -> tuple[tuple[int, str, int], ...]:
    """(mesh dim, collective, shard factor of the tensor with that mesh dim unsharded) per step."""
    out = []
    cur = list(src)
    for d, kind, _before, after in redistribute_steps(tuple(src), tuple(dst)):
        if kind not in ("chunk", "zero"):
            gathered = list(cur)
            gathered[d] = Replicate()  # ring volumes count the tensor as if unsharded on this mesh dim
            out.append((d, kind, shard_factor(tuple(gathered), mesh_shape)))
        cur[d] = after
    return tuple(out)


def transition_time(meta: TensorMeta, src: tuple[Placement, ...], dst: tuple[Placement, ...],
                    mesh_shape: tuple[int, ...], links: tuple[LinkSpec, ...],
                    bucket_bytes: float | None = None) -> float:
    """Seconds of the collectives that take src to dst. ``bucket_bytes``: all-reduces are bucketed
    (data-parallel parameter gradients), so each pays its share bytes / bucket of one latency."""
    if src == dst or meta is None:
        return 0.0
    nbytes = meta.nbytes
    total = 0.0
    for d, kind, factor in _step_plan(tuple(src), tuple(dst), tuple(mesh_shape)):
        t = collective_time(kind, nbytes / factor, mesh_shape[d], links[d])
        if bucket_bytes and kind == "all_reduce" and t:
            alpha = links[d].collectives[kind].alpha + links[d].sync_s   # one call per bucket
            t -= alpha * (1.0 - min(1.0, nbytes / factor / bucket_bytes))
        total += t
    return total


def edge_cost(meta: TensorMeta, src: tuple[Placement, ...], dst: tuple[Placement, ...],
              consumer_split: tuple[bool, ...], mesh_shape: tuple[int, ...], links: tuple[LinkSpec, ...],
              param: bool = False) -> OpCost:
    """Forward resharding src->dst plus the backward resharding of the gradient. ``param``: the
    tensor is a parameter, whose gradient all-reduces the runtime buckets (autopar.runtime.grad_sync)."""
    fwd = transition_time(meta, src, dst, mesh_shape, links)
    gdst, gsrc = grad_transition(src, dst, consumer_split)
    bwd = transition_time(meta, gdst, gsrc, mesh_shape, links, GRAD_BUCKET_BYTES if param else None)
    return OpCost(fwd, bwd)


@functools.lru_cache(maxsize=65536)
def grad_transition(src: tuple[Placement, ...], dst: tuple[Placement, ...], consumer_split: tuple[bool, ...]
                    ) -> tuple[tuple[Placement, ...], tuple[Placement, ...]]:
    """Gradient placements (arriving at dst, wanted at src): a replicated input of an op that splits
    its work on a mesh dim gets a Partial gradient there."""
    gdst = tuple(Partial("sum") if isinstance(p, Replicate) and sp else grad_placement(p)
                 for p, sp in zip(dst, consumer_split))
    return gdst, tuple(grad_placement(p) for p in src)


# --- memory -------------------------------------------------------------------------------
def param_state_bytes(meta: TensorMeta, placements: tuple[Placement, ...], mesh_shape: tuple[int, ...]
                      ) -> dict[str, float]:
    local = local_bytes(meta, placements, mesh_shape)
    elems = meta.numel / shard_factor(placements, mesh_shape)
    return {"params": local, "grads": local, "optimizer": elems * ADAM_STATE_BYTES_PER_ELEMENT}


def saved_bytes(node: GNode, strategy: Strategy, saved, mesh_shape: tuple[int, ...]) -> float:
    """Local bytes autograd keeps for backward of ``node`` under ``strategy`` (``saved``: a
    solver.saved.Saved record, None when the node keeps nothing)."""
    if saved is None:
        return 0.0
    total = sum(local_bytes(node.outputs[i], strategy.outputs[i], mesh_shape) for i in saved.outputs
                if i < len(node.outputs) and node.outputs[i] is not None and strategy.outputs[i] is not None)
    if saved.extra_bytes:
        # an op's internal results (norm statistics, cross-entropy's log-softmax) are split like its
        # first input (a reduction's output, e.g. the loss, is not)
        first = next((p for p in (*strategy.inputs[:1], *strategy.outputs[:1]) if p is not None), ())
        total += saved.extra_bytes / shard_factor(first, mesh_shape)
    return total


def activation_bytes(node: GNode, strategy: Strategy, mesh_shape: tuple[int, ...]) -> float:
    if node.kind != "op" or node.target in NO_SAVED_OUTPUT:
        return 0.0
    return sum(local_bytes(m, p, mesh_shape) for m, p in zip(node.outputs, strategy.outputs)
               if m is not None and p is not None)
