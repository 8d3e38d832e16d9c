"""``autopar predict``: a hand-written GPT plan (TP x PP x DP) costed with the solver's own model.

No capture: a GPT-style config given by numbers (layers L, hidden h, heads a, sequence s, vocab V,
global batch B, micro-batch b) and a fixed plan (tensor parallel t, pipeline p, data parallel d,
sequence parallel, recompute, interleaving v, ZeRO stage). Every op time is
``autopar.solver.cost.roofline_cost`` and every collective ``collective_time`` on the profile's
link for its mesh dim (mesh ``pp x dp x tp``, tp innermost; dims of size 1 dropped), so predict
and ``autopar plan`` agree on the same hardware numbers. Per micro-batch and layer:

* compute: the six GEMMs of a Megatron layer (forward 24bsh^2 + 4bs^2h FLOPs, /t), layer norms,
  softmax, GELU and residual adds as memory-bound ops; backward as cost.py charges it (2x);
* TP (1-D Megatron): 4 all-reduces of b*s*h elements (2 forward, 2 backward); with sequence
  parallel 4 all-gathers + 4 reduce-scatters of the same tensor instead;
* recompute: full repeats the forward (and its TP collectives), selective the attention core;
* dropout (``dropout=True``, Megatron's GPT): the attention probabilities read and written with a
  1-byte mask, and a 1-byte mask for each of the two hidden dropouts (Korthikanti et al. 2022, 4.1);
* PP: one send/recv of the stage's activation forward and one of its gradient backward per
  micro-batch and virtual stage; bubble (p-1)/v micro-batch slots of the slowest stage, i.e. a
  fraction (p-1)/(m+p-1) of the iteration for 1F1B and GPipe (m = B / (b*d) micro-batches);
  with ``scatter_gather`` (Narayanan et al. SC'21, 4.1) each tp rank sends 1/t of the boundary and
  the receiving stage all-gathers it over tp; once per step the first and the last stage all-reduce
  the tied word embedding's gradient (V*h/t elements);
* DP per step, on the parameters Psi of one GPU: all-reduce of the gradients 2(d-1)/d*Psi
  bytes (ZeRO-1/2: reduce-scatter + all-gather, the same volume; ZeRO-3 adds one more all-gather:
  1.5x), on rings that leave a node over as many NICs as the group has GPUs there
  (``ClusterProfile.dim_links``). Collectives are not overlapped with compute (as in the solver's
  objective, and as Megatron-LM ran them in the published results benchmarks/published.py checks);
* the AdamW step: one memory-bound pass over the GPU's (ZeRO-1: 1/d of its) parameters,
  ``optimizer_step_time``.

Memory per GPU: parameters and gradients in ``dtype``, AdamW states (8 bytes per element, plus a
4-byte fp32 master copy when dtype is not fp32), sharded over dp by the ZeRO stage; activations per
layer (Korthikanti et al. 2022, 2-byte activations, scaled to dtype): sbh(34 + 5as/h) without
TP, sbh(10 + 24/t + 5as/(ht)) with TP, sbh/t(34 + 5as/h) with TP+SP; selective recompute drops
the 5as/h term, full keeps 2sbh (/t with SP) plus one layer being recomputed; the first stage holds
p micro-batches in flight with 1F1B (times 1 + (p-1)/(pv) interleaved), m with GPipe; the last
stage adds fp32 logits 4bsV/t. This module imports autopar's core and the solver's cost functions
only; it never captures or runs a model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from autopar.cluster.profile import ClusterProfile, LinkSpec
from autopar.core.errors import ConfigError
from autopar.core.mesh import MeshSpec
from autopar.core.runtime_rules import ring_traffic
from autopar.solver.cost import OpCost, collective_time, roofline_cost

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("1f1b", "gpipe")


@dataclass(frozen=True, kw_only=True)
class GPTPlan:
    """A GPT-style model and a hand-written parallel plan (validated on construction)."""

    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    global_batch: int
    micro_batch: int
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"
    interleave: int = 1
    zero: int = 0
    schedule: str = "1f1b"
    dtype: str = "bfloat16"
    scatter_gather: bool = False
    dropout: bool = False
    grad_dtype: str | None = None   # gradients kept and data-parallel reduced in (default: dtype)

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "seq", "vocab", "global_batch", "micro_batch", "tp", "pp", "dp",
                     "interleave"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.heads % self.tp:
            raise ConfigError(f"--tp {self.tp} does not divide --heads {self.heads}: each tensor-parallel rank needs "
                              f"whole attention heads; pick a tp that divides {self.heads}")
        if self.hidden % self.heads:
            raise ConfigError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        if self.global_batch % (self.micro_batch * self.dp):
            raise ConfigError(f"--global-batch {self.global_batch} is not a multiple of micro-batch x dp = "
                              f"{self.micro_batch} x {self.dp}; each data-parallel rank needs whole micro-batches")
        if self.layers % (self.pp * self.interleave):
            raise ConfigError(f"--layers {self.layers} does not split into pp x interleave = {self.pp} x "
                              f"{self.interleave} equal stages")
        if self.interleave > 1 and (self.pp == 1 or self.schedule != "1f1b"):
            raise ConfigError("--interleave > 1 needs --pp > 1 and the 1f1b schedule (interleaved 1F1B)")
        if self.scatter_gather and (self.pp == 1 or self.tp == 1):
            raise ConfigError("--scatter-gather splits a stage's output over the tp ranks it is sent from: it needs "
                              "--pp > 1 and --tp > 1")
        if self.sequence_parallel and self.seq % self.tp:
            raise ConfigError(f"--sequence-parallel splits --seq {self.seq} over --tp {self.tp}: make it divisible")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"--recompute {self.recompute!r}: one of {RECOMPUTE}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r}: one of {SCHEDULES}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero {self.zero!r}: a ZeRO stage 0, 1, 2 or 3")
        if self.grad_dtype is not None and self.grad_dtype not in DTYPE_BYTES:
            raise ConfigError(f"--grad-dtype {self.grad_dtype!r}: one of {sorted(DTYPE_BYTES)}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"--dtype {self.dtype!r}: one of {sorted(DTYPE_BYTES)}")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def micro_batches(self) -> int:
        """Micro-batches per data-parallel rank per step."""
        return self.global_batch // (self.micro_batch * self.dp)

    def mesh(self) -> MeshSpec:
        """pp x dp x tp (tp innermost, so it stays inside a node), size-1 dims dropped."""
        dims = [(n, k) for n, k in (("pp", self.pp), ("dp", self.dp), ("tp", self.tp)) if k > 1] or [("dp", 1)]
        return MeshSpec.make(tuple(k for _, k in dims), tuple(n for n, _ in dims))


@dataclass(frozen=True, kw_only=True)
class Collective:
    """One kind of collective a step issues: ``count`` times over ``ranks`` ranks, each on a full tensor of
    ``bytes_each``; ``traffic_bytes`` is the per-rank ring traffic of all of them."""

    kind: str
    ranks: int
    count: int
    bytes_each: float
    traffic_bytes: float
    time_s: float


@dataclass(frozen=True, kw_only=True)
class Prediction:
    step_time_s: float
    time_breakdown: dict[str, float]
    peak_memory_bytes: int
    memory_breakdown: dict[str, int]
    communication: dict[str, Collective]
    micro_batches: int
    params_per_gpu: float
    mesh: dict[str, int]
    cluster: str
    plan: GPTPlan
    extras: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["breakdown"] = {"time": d.pop("time_breakdown"), "memory": d.pop("memory_breakdown")}
        return d


# --- the model, by numbers -----------------------------------------------------------------------
def _layer_ops(c: GPTPlan, e: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(flops, bytes) of the forward ops of one layer on one TP rank: (all ops, the attention core)."""
    b, s, h, t = c.micro_batch, c.seq, c.hidden, c.tp
    a_t = c.heads // t
    bsh = b * s * h
    sp = t if c.sequence_parallel else 1
    core = [(2.0 * b * s * s * h / t, (2 * bsh / t + b * a_t * s * s) * e),     # Q K^T
            (0.0, 2.0 * b * a_t * s * s * e),                                   # softmax
            (2.0 * b * s * s * h / t, (b * a_t * s * s + 2 * bsh / t) * e)]      # P V
    if c.dropout:   # on the attention probabilities: read P, write P and its 1-byte mask (Korthikanti et al. 4.1)
        core.insert(2, (0.0, b * a_t * s * s * (2 * e + 1)))
    drop = (0.0, bsh / sp) if c.dropout else (0.0, 0.0)  # + the 1-byte mask of each hidden dropout
    ops = [(0.0, 2.0 * bsh / sp * e),                                           # layer norm 1
           (2.0 * bsh * 3 * h / t, (bsh + 3 * h * h / t + 3 * bsh / t) * e),   # QKV
           *core,
           (2.0 * bsh * h / t, (bsh / t + h * h / t + bsh) * e),               # attention projection
           (0.0, 3.0 * bsh / sp * e + drop[1]),                                 # (dropout +) residual add
           (0.0, 2.0 * bsh / sp * e),                                           # layer norm 2
           (2.0 * bsh * 4 * h / t, (bsh + 4 * h * h / t + 4 * bsh / t) * e),   # MLP up
           (0.0, 2.0 * 4 * bsh / t * e),                                        # GELU
           (2.0 * bsh * 4 * h / t, (4 * bsh / t + 4 * h * h / t + bsh) * e),   # MLP down
           (0.0, 3.0 * bsh / sp * e + drop[1])]                                 # (dropout +) residual add
    return ops, core


def _cost(ops: list[tuple[float, float]], c: GPTPlan, cluster: ClusterProfile) -> OpCost:
    fwd = bwd = 0.0
    for flops, nbytes in ops:
        oc = roofline_cost(flops, nbytes, c.dtype, cluster.device)
        fwd, bwd = fwd + oc.fwd_s, bwd + oc.bwd_s
    return OpCost(fwd, bwd)


def params_per_gpu(c: GPTPlan) -> dict[str, float]:
    """Parameter elements held by one GPU of the first and of the last pipeline stage (before ZeRO)."""
    h, t = c.hidden, c.tp
    layer = (12 * h * h + 7 * h) / t + 6 * h  # column/row weights and column biases split; row biases, LNs not
    stage_layers = c.layers // c.pp * layer
    embed = c.vocab * h / t                    # vocab-parallel word embedding (tied with the LM head)
    first = stage_layers + embed + c.seq * h + (2 * h if c.pp == 1 else 0)
    last = stage_layers + 2 * h + (embed if c.pp > 1 else 0)  # a copy of the tied embedding for the LM head
    return {"first": first, "last": last if c.pp > 1 else first}


def _activation_bytes_per_layer(c: GPTPlan, e: int) -> float:
    s, b, h, a, t = c.seq, c.micro_batch, c.hidden, c.heads, c.tp
    sbh, attn = s * b * h, 5 * a * s / h
    scale = e / 2  # Korthikanti et al. count 2-byte activations (1-byte dropout masks)
    sp = c.sequence_parallel
    if c.recompute == "full":
        return 2 * sbh / (t if sp else 1) * scale
    keep_attn = c.recompute == "none"
    if sp or t == 1:
        return sbh / t * (34 + (attn if keep_attn else 0)) * scale
    return sbh * (10 + 24 / t + (attn / t if keep_attn else 0)) * scale


def _in_flight_layers(c: GPTPlan) -> float:
    """Layers' worth of one micro-batch's activations the first stage holds at its peak."""
    per_stage = c.layers / c.pp
    if c.pp == 1:
        return per_stage
    if c.schedule == "gpipe":
        return per_stage * c.micro_batches
    inflight = min(c.pp, c.micro_batches) * per_stage
    return inflight * (1 + (c.pp - 1) / (c.pp * c.interleave)) if c.interleave > 1 else inflight


def optimizer_step_time(elements: float, e: int, cluster: ClusterProfile) -> float:
    """Seconds of one AdamW step over ``elements`` parameters on one GPU: a memory-bound pass (a fused
    multi-tensor Adam, as Megatron's and torch's ``fused=True``) that reads the gradient (``e`` bytes), the
    fp32 master weight (absent when ``e`` is 4: the parameter is the master), exp_avg and exp_avg_sq and
    writes them back with the ``e``-byte parameter: ``elements * (2e + 24)`` bytes at the achieved memory
    bandwidth (fp32: ``28`` bytes, the 7 fp32 tensor passes of Adam; Kingma & Ba 2015, Algorithm 1)."""
    if elements <= 0:
        return 0.0
    dev = cluster.device
    nbytes = elements * (2 * e + 24) if e != 4 else elements * 28
    return dev.op_overhead_s + nbytes / (dev.memory_bandwidth * dev.max_memory_efficiency)


# --- the prediction ---------------------------------------------------------------------------------
def _collective(kind: str, count: int, nbytes: float, n: int, link: LinkSpec | None) -> Collective:
    if n <= 1 or count == 0 or link is None:
        return Collective(kind=kind, ranks=n, count=0, bytes_each=nbytes, traffic_bytes=0.0, time_s=0.0)
    return Collective(kind=kind, ranks=n, count=count, bytes_each=nbytes,
                      traffic_bytes=count * ring_traffic(kind, n) * nbytes,
                      time_s=count * collective_time(kind, nbytes, n, link))


def predict(c: GPTPlan, cluster: ClusterProfile, *, nodes: int | None = None, gpus: int | None = None) -> Prediction:
    """Iteration time and memory per GPU of plan ``c`` on ``cluster`` (``nodes`` it spans; ``gpus`` total)."""
    if gpus is None and nodes is not None:
        gpus = nodes * cluster.gpus_per_node
    if gpus is not None and gpus != c.gpus:
        raise ConfigError(f"dp x tp x pp = {c.dp} x {c.tp} x {c.pp} = {c.gpus} GPUs, but the cluster has {gpus}"
                          f"{f' ({nodes} node(s) of {cluster.gpus_per_node})' if nodes else ''}; "
                          f"make the product equal the GPU count")
    mesh = c.mesh()
    links = dict(zip(mesh.dim_names, cluster.dim_links(mesh, nodes)))
    e = DTYPE_BYTES[c.dtype]
    b, s, h, t, m = c.micro_batch, c.seq, c.hidden, c.tp, c.micro_batches
    bsh_bytes = b * s * h * e
    per_stage = c.layers // c.pp

    ops, core = _layer_ops(c, e)
    layer = _cost(ops, c, cluster)
    logits = _cost([(2.0 * b * s * h * c.vocab / t, (b * s * h + c.vocab * h / t + b * s * c.vocab / t) * e),
                    (0.0, 2.0 * b * s * c.vocab / t * 4)], c, cluster)   # LM head GEMM, fp32 cross-entropy
    embed = _cost([(0.0, 2.0 * bsh_bytes)], c, cluster)
    recompute_layer = {"none": 0.0, "selective": _cost(core, c, cluster).fwd_s, "full": layer.fwd_s}[c.recompute]
    first_mb = per_stage * layer.total + embed.total + (logits.total if c.pp == 1 else 0.0)
    last_mb = per_stage * layer.total + logits.total
    compute_mb = max(first_mb, last_mb)

    # tensor parallel: per layer per micro-batch 2 forward + 2 backward (+2 forward again under full recompute)
    tp_per_layer = 4 + (2 if c.recompute == "full" else 0)
    count = tp_per_layer * per_stage * m
    comm: dict[str, Collective] = {}
    if c.sequence_parallel:
        comm["tp_all_gather"] = _collective("all_gather", count, bsh_bytes, t, links.get("tp"))
        comm["tp_reduce_scatter"] = _collective("reduce_scatter", count, bsh_bytes, t, links.get("tp"))
    else:
        comm["tp_all_reduce"] = _collective("all_reduce", count, bsh_bytes, t, links.get("tp"))
    # pipeline: activations forward and gradients backward across each virtual stage boundary. With scatter/gather
    # (Narayanan et al. SC'21 sec. 4.1) each tp rank sends 1/t of it and the receiving stage all-gathers it over tp
    split_send = c.sequence_parallel or c.scatter_gather
    pp_bytes = bsh_bytes / (t if split_send else 1)
    comm["pp_send_recv"] = _collective("send_recv", 2 * m * c.interleave, pp_bytes, c.pp, links.get("pp"))
    if c.scatter_gather and not c.sequence_parallel:
        comm["pp_gather"] = _collective("all_gather", 2 * m * c.interleave, bsh_bytes, t, links.get("tp"))
    # data parallel, once per step, on the gradients of the biggest stage's GPU
    psi = params_per_gpu(c)
    psi_max = max(psi.values())
    d = c.dp
    eg = DTYPE_BYTES[c.grad_dtype or c.dtype]   # e.g. Megatron's --accumulate-allreduce-grads-in-fp32: 4
    if c.zero == 0:
        comm["dp_all_reduce"] = _collective("all_reduce", 1, psi_max * eg, d, links.get("dp"))
    else:
        comm["dp_reduce_scatter"] = _collective("reduce_scatter", 1, psi_max * eg, d, links.get("dp"))
        comm["dp_all_gather"] = _collective("all_gather", 2 if c.zero == 3 else 1, psi_max * e, d, links.get("dp"))

    if c.pp > 1:   # the tied word embedding's gradient, summed once per step by the first and the last stage
        comm["pp_embedding_grad"] = _collective("all_reduce", 1, c.vocab * h / t * e, 2, links.get("pp"))
    tp_s = sum(v.time_s for k, v in comm.items() if k.startswith("tp_"))
    pp_s = comm["pp_send_recv"].time_s + (comm["pp_gather"].time_s if "pp_gather" in comm else 0.0)
    emb_s = comm["pp_embedding_grad"].time_s if c.pp > 1 else 0.0
    dp_s = sum(v.time_s for k, v in comm.items() if k.startswith("dp_"))
    recompute_s = recompute_layer * per_stage * m
    slot = compute_mb + recompute_layer * per_stage + (tp_s + pp_s) / m  # one micro-batch on the slowest stage
    bubble_s = (c.pp - 1) / c.interleave * slot
    opt_s = optimizer_step_time(psi_max / (d if c.zero >= 1 else 1), e, cluster)
    tb = {"compute_s": compute_mb * m, "comm_s": tp_s + pp_s + dp_s + emb_s, "recompute_s": recompute_s,
          "offload_s": 0.0, "bubble_s": bubble_s, "optimizer_s": opt_s}

    # memory per GPU
    master = 0 if e == 4 else 4
    zero_div = lambda stage: d if c.zero >= stage else 1  # noqa: E731
    act_layer = _activation_bytes_per_layer(c, e)
    working = 0.0
    if c.recompute == "full":  # the layer being recomputed holds its full activations for its backward
        working = _activation_bytes_per_layer(GPTPlan(**{**asdict(c), "recompute": "none"}), e)
    acts_first = act_layer * _in_flight_layers(c) + working
    logits_bytes = 4.0 * b * s * c.vocab / t  # fp32 logits on the last stage
    acts_last = (act_layer * per_stage + working if c.pp > 1 else acts_first) + logits_bytes
    best = None
    for stage, acts in (("first", acts_first), ("last", acts_last)):
        p = psi[stage]
        mb = {"params": p * e / zero_div(3), "grads": p * eg / zero_div(2),
              "optimizer": p * (8 + master) / zero_div(1), "activations": acts}
        if best is None or sum(mb.values()) > sum(best.values()):
            best = mb
    mbi = {k: int(round(v)) for k, v in best.items()}
    model_flops = 6.0 * c.global_batch * s * (12 * c.layers * h * h + c.vocab * h) \
        + 12.0 * c.global_batch * c.layers * s * s * h  # forward+backward, no recompute (MFU convention)
    step = sum(tb.values())
    return Prediction(step_time_s=step, time_breakdown=tb, peak_memory_bytes=sum(mbi.values()),
                      memory_breakdown=mbi, communication=comm, micro_batches=m, params_per_gpu=psi_max,
                      mesh=dict(zip(mesh.dim_names, mesh.shape)), cluster=cluster.name, plan=c,
                      extras={"tp_comm_s": tp_s, "pp_comm_s": pp_s, "dp_comm_s": dp_s,
                              "model_flops_per_gpu": model_flops / c.gpus,
                              "achieved_flops_per_gpu": model_flops / c.gpus / step if step else 0.0})


# --- a configuration search over the same model ------------------------------------------------------
def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def search_plans(model: GPTPlan, cluster: ClusterProfile, gpus: int, *, memory: float | None = None,
                 max_micro_batch: int = 8, max_interleave: int = 4, top: int = 1) -> list[tuple[GPTPlan, Prediction]]:
    """The ``top`` fastest Megatron-style plans of ``model``'s GPT (its layers, hidden, heads, seq, vocab,
    global batch and dtype; its parallel fields are ignored) on ``gpus`` GPUs of ``cluster`` whose predicted
    memory per GPU fits ``memory`` (default: the device's capacity), by exhaustive enumeration: tp a divisor
    of the heads within one node, pp a divisor of the layers, dp the rest; micro-batch up to
    ``max_micro_batch``; 1F1B, interleaved up to ``max_interleave`` virtual stages; recompute none / selective
    / full; sequence parallel or scatter/gather where tp > 1. Every candidate is priced by ``predict``; raises
    ConfigError when none fits."""
    cap = float(cluster.device.memory_capacity if memory is None else memory)
    base = {k: getattr(model, k) for k in ("layers", "hidden", "heads", "seq", "vocab", "global_batch", "dtype",
                                           "dropout")}
    found: list[tuple[float, GPTPlan, Prediction]] = []
    for tp in (k for k in _divisors(model.heads) if k <= cluster.gpus_per_node and gpus % k == 0):
        for pp in (k for k in _divisors(model.layers) if (gpus // tp) % k == 0):
            dp = gpus // (tp * pp)
            if model.global_batch % dp:
                continue
            for mb in (k for k in _divisors(model.global_batch // dp) if k <= max_micro_batch):
                if pp > 1 and model.global_batch // (dp * mb) < pp:
                    continue
                vs = [v for v in range(1, max_interleave + 1) if (model.layers // pp) % v == 0] if pp > 1 else [1]
                comms = [(False, False)] + ([(True, False)] + ([(False, True)] if pp > 1 else []) if tp > 1 else [])
                for v in vs:
                    for rc in RECOMPUTE:
                        for sp, sg in comms:
                            if sp and model.seq % tp:
                                continue
                            c = GPTPlan(**base, micro_batch=mb, tp=tp, pp=pp, dp=dp, interleave=v, recompute=rc,
                                        sequence_parallel=sp, scatter_gather=sg)
                            p = predict(c, cluster, gpus=gpus)
                            if p.peak_memory_bytes <= cap:
                                found.append((p.step_time_s, c, p))
    if not found:
        raise ConfigError(f"no Megatron-style plan of this GPT fits {cap / 2**30:.1f} GiB per GPU on {gpus} GPUs")
    found.sort(key=lambda x: x[0])
    return [(c, p) for _, c, p in found[:top]]
