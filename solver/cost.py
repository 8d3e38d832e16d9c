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

Mixed precision (plan.precision): ``autocast_graph`` rewrites a float32 capture's metas to the dtypes autocast
gives each value (``autocast_dtypes``), so the functions above charge compute at that dtype's peak and bytes
at their real size, with parameters, gradients and AdamW states float32 (``precision_graph``: the graph a plan of
a given plan.precision is costed on). Memory adds the lower-precision copies autocast makes of float32 arguments
(a weight's, an activation's) that an op keeps for backward (``cast_bytes``, traced by solver.saved), split
like the argument where the op reads it.
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
from autopar.core.plan import check_precision
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


# --- mixed precision ------------------------------------------------------------------------
# torch.amp's autocast op lists for CUDA (PyTorch docs, "Automatic Mixed Precision package", Autocast Op
# Reference, CUDA Op-Specific Behavior), by ATen op name: ops that run in the lower precision, and ops that
# run (and return) in float32 whatever their inputs. Every other op runs in the type its tensor inputs
# promote to, so a float32 value meeting a lower-precision one (a residual add) is float32 again.
AUTOCAST_LOWER = frozenset({
    "linear", "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "mv", "addmv", "addr", "chain_matmul",
    "multi_dot", "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention"})
AUTOCAST_FP32 = frozenset({
    "pow", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "exp", "expm1", "log", "log10", "log1p", "log2",
    "reciprocal", "rsqrt", "softplus", "cumprod", "cumsum", "prod", "sum", "dist", "pdist", "cdist", "norm",
    "renorm", "layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "softmax", "_softmax",
    "log_softmax", "_log_softmax", "softmin", "normalize", "cosine_similarity", "cross_entropy_loss", "nll_loss",
    "nll_loss_forward", "nll_loss2d", "mse_loss", "l1_loss", "smooth_l1_loss", "kl_div", "poisson_nll_loss",
    "binary_cross_entropy_with_logits", "cosine_embedding_loss", "hinge_embedding_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "multi_margin_loss", "soft_margin_loss", "triplet_margin_loss"})


def _op_name(target) -> str:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", "") if packet is not None else ""


def _promoted(dtypes) -> torch.dtype | None:
    out = None
    for d in dtypes:
        if d is not None and d.is_floating_point:
            out = d if out is None else torch.promote_types(out, d)
    return out


def autocast_dtypes(gi, compute_dtype: torch.dtype, device_type: str = "cuda") -> dict[str, tuple]:
    """The dtype each node's outputs have when the captured (float32) model runs under
    ``torch.autocast(device_type, compute_dtype)`` with float32 parameters (plan.precision's mixed precision).

    ``device_type="cpu"``: torch's own answer, each op dispatched on fake tensors under CPU autocast (its op
    lists differ from CUDA's); an op the fake mode cannot run falls back to the rule below. ``"cuda"``: the
    CUDA autocast lists (``AUTOCAST_LOWER`` / ``AUTOCAST_FP32``), which need no GPU to apply: a lower-precision
    op's floating outputs that followed its inputs take ``compute_dtype``, an fp32-list op's stay float32, and
    any other op's outputs that followed its inputs' dtype follow their new promoted dtype. Parameters,
    buffers and inputs keep theirs; explicit casts keep their target dtype. Returns node name -> dtypes."""
    new: dict[str, tuple] = {}
    fake_vals: dict[str, object] = {}
    mode = None
    if device_type == "cpu":
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    for name, g in gi.nodes.items():
        orig = tuple(m.dtype if m is not None else None for m in g.outputs)
        if g.kind != "op":
            new[name] = orig
            continue
        in_orig = _promoted(gi.nodes[r.src].outputs[r.out].dtype for r in g.inputs
                            if gi.nodes[r.src].outputs[r.out] is not None)
        in_new = _promoted(new[r.src][r.out] for r in g.inputs)
        out = None
        if mode is not None and g.fx_node is not None:
            out = _dispatch_dtypes(g, gi, new, fake_vals, mode, compute_dtype)
        if out is None:
            op = _op_name(g.target)
            if op in AUTOCAST_FP32:
                out = orig
            elif op in AUTOCAST_LOWER:
                out = tuple(compute_dtype if d is not None and d == in_orig and d.is_floating_point else d
                            for d in orig)
            else:
                out = tuple(in_new if d is not None and d == in_orig and d.is_floating_point and in_new is not None
                            else d for d in orig)
        new[name] = out
        if mode is not None and name not in fake_vals and g.fx_node is not None:
            fake_vals[name] = _fakes(mode, g, out, g.fx_node.meta.get("val"))
    return new


def _dispatch_dtypes(g, gi, new, fake_vals, mode, compute_dtype) -> tuple | None:
    """Output dtypes of ``g`` run on fake tensors (its inputs at their ``new`` dtypes) under CPU autocast."""
    import torch.utils._pytree as pytree

    def val(a):
        if not isinstance(a, fx.Node):
            return a
        if a.name in fake_vals:
            return fake_vals[a.name]
        v = a.meta.get("val")
        if a.name not in new:
            return v
        return _fakes(mode, gi.nodes[a.name], new[a.name], v)

    try:
        with mode, torch.autocast("cpu", dtype=compute_dtype):
            args, kwargs = pytree.tree_map(val, (tuple(g.fx_node.args), dict(g.fx_node.kwargs)))
            res = g.target(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError):   # fake mode cannot run it
        return None
    fake_vals[g.name] = res
    vals = res if isinstance(res, (list, tuple)) else (res,)
    out = tuple(v.dtype if isinstance(v, torch.Tensor) else None for v in vals)
    return out if len(out) == len(g.outputs) else None


def _fakes(mode, g, dtypes, val):
    """Fake tensors for ``g``'s outputs at ``dtypes`` (a tuple where the node returns several)."""
    with mode:
        made = tuple(torch.empty(m.shape, dtype=d) if m is not None else None for m, d in zip(g.outputs, dtypes))
    return made if isinstance(val, (list, tuple)) else made[0]


def autocast_graph(gi, compute_dtype: torch.dtype, device_type: str = "cuda"):
    """A copy of GraphIndex ``gi`` whose tensor metas carry the dtypes of ``autocast_dtypes``: compute_cost then
    charges each op at its dtype's peak (``DeviceSpec.flops_for``: bf16/fp16 tensor cores) and moves its bytes at
    their real size, reshardings communicate lower-precision activations at their size, and activation memory
    counts them at it, while parameters, their gradients (autocast's casts return float32 gradients to the
    float32 parameters) and AdamW states stay float32. float32: ``gi`` itself."""
    if compute_dtype == torch.float32:
        return gi
    import copy

    dtypes = autocast_dtypes(gi, compute_dtype, device_type)
    nodes = {}
    for name, g in gi.nodes.items():
        g2 = copy.copy(g)
        g2.outputs = tuple(TensorMeta(shape=m.shape, dtype=d) if m is not None else None
                           for m, d in zip(g.outputs, dtypes[name]))
        nodes[name] = g2
    return type(gi)(nodes=nodes, layer_counts=dict(gi.layer_counts), observed_counts=dict(gi.observed_counts),
                    shared_lists=set(gi.shared_lists), output_refs=gi.output_refs, heads=dict(gi.heads),
                    first_shared=dict(gi.first_shared))


def compute_dtype(precision: dict | None) -> torch.dtype:
    """plan.precision's autocast dtype (None: float32)."""
    if not precision:
        return torch.float32
    return getattr(torch, check_precision(precision)["compute_dtype"])


def precision_graph(gi, precision: dict | None, profile: ClusterProfile):
    """``gi`` at the dtypes a plan of ``precision`` (plan.precision) runs in: autocast_graph with the device's
    autocast rules (CPU's where the host is the device, else CUDA's lists); ``gi`` itself for float32. The
    planner costs a plan on this graph, so price_plan / explain must too."""
    return autocast_graph(gi, compute_dtype(precision), "cpu" if profile.host_is_device else "cuda")


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
    total += cast_bytes(strategy, saved, mesh_shape)
    if saved.extra_bytes:
        # an op's internal results (norm statistics, cross-entropy's log-softmax) are split like its
        # first input (a reduction's output, e.g. the loss, is not)
        first = next((p for p in (*strategy.inputs[:1], *strategy.outputs[:1]) if p is not None), ())
        total += saved.extra_bytes / shard_factor(first, mesh_shape)
    return total


def cast_bytes(strategy: Strategy, saved, mesh_shape: tuple[int, ...]) -> float:
    """Local bytes of the copies autocast made of an op's float32 arguments (a weight's, an activation's) and the
    op keeps for backward (``saved.casts``): each split like its argument where this op reads it (a gathered
    ZeRO-3 weight is cast whole, a tensor-parallel weight's shard is). Part of saved_bytes; selective recompute
    does not keep them (the casts are recomputed, solver.remat)."""
    if saved is None:
        return 0.0
    return sum(b / shard_factor(strategy.inputs[a], mesh_shape) if a < len(strategy.inputs) else b
               for a, b in saved.casts)


def activation_bytes(node: GNode, strategy: Strategy, mesh_shape: tuple[int, ...]) -> float:
    if node.kind != "op" or node.target in NO_SAVED_OUTPUT:
        return 0.0
    return sum(local_bytes(m, p, mesh_shape) for m, p in zip(node.outputs, strategy.outputs)
               if m is not None and p is not None)
