"""ClusterProfile: what the cost model knows about the hardware, as JSON.

Per device: peak FLOP/s per dtype, memory bandwidth and capacity, a size-dependent
efficiency curve. Per link (inside a node, across nodes, or per measured mesh dim):
alpha (s) and beta (s/byte) for each collective kind. Host<->device bandwidth.

Presets for real hardware cite the vendor spec sheet for every peak number; latencies and
achievable fractions are not on spec sheets and are marked as typical values to be replaced by
``autopar profile`` measurements. Units: seconds, bytes, FLOP/s. This module does no I/O except
reading a profile file the user names, parsed as JSON (never executed).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from autopar.core.errors import ClusterProfileError
from autopar.core.mesh import MeshSpec
from autopar.core.runtime_rules import COLLECTIVES


class OpTableError(ClusterProfileError):
    """A profile's per-op calibration (``op_times``) is malformed or belongs to another world size."""


# (ATen overload, local input shapes, output dtype, the op's other arguments as text): one measured op
OpKey = tuple[str, tuple[tuple[int, ...], ...], str, str]


@dataclass(frozen=True, kw_only=True)
class AlphaBeta:
    """t(bytes) = alpha + beta * bytes, with bytes the per-rank ring traffic of the collective."""

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ClusterProfileError(f"alpha must be a finite latency >= 0 s, got {self.alpha}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ClusterProfileError(f"beta must be a positive s/byte (a positive bandwidth), got {self.beta}")


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    """Alpha-beta per collective kind over one kind of link.

    ``sync_s``: what each collective call costs on top of alpha when it sits between compute, as in a
    training step, rather than in a tight loop of collectives: the ranks arrive at different times and
    the call waits for the last one. Where ranks share cores (several gloo ranks on one CPU) the skew
    is about a scheduling slice and dominates small collectives. ``autopar profile`` measures it; the
    presets (one device per rank) and profiles written before it existed have 0."""

    name: str
    collectives: dict[str, AlphaBeta]
    sync_s: float = 0.0

    def __post_init__(self) -> None:
        missing = [k for k in COLLECTIVES if k not in self.collectives]
        if missing:
            raise ClusterProfileError(f"link {self.name!r} lacks alpha/beta for {missing}; give all of {COLLECTIVES}")
        if not (self.sync_s >= 0 and math.isfinite(self.sync_s)):
            raise ClusterProfileError(f"link {self.name!r}: sync_s must be a finite time >= 0 s, got {self.sync_s}")

    @staticmethod
    def uniform(name: str, *, alpha: float, bandwidth: float) -> "LinkSpec":
        ab = AlphaBeta(alpha=alpha, beta=1.0 / bandwidth)
        return LinkSpec(name=name, collectives={k: ab for k in COLLECTIVES})


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator (or one CPU process): peaks and the efficiency curve.

    Achieved matmul FLOP/s = peak * max_matmul_efficiency * f / (f + matmul_half_efficiency_flops)
    for an op of f FLOPs: small ops are latency-bound, large ones approach the asymptote.
    Memory-bound ops run at memory_bandwidth * max_memory_efficiency; every op pays op_overhead_s.

    ``op_overhead_s`` is the host time per op (Python, dispatcher, autograd) that the device does not
    hide, charged once forward and once backward (twice for a contraction's two gradients), again for a
    recomputed op, and once per micro-batch in a pipeline. ``autopar profile`` measures it (a chain of
    tiny ops forward and backward) and scales it with the GPT-probe calibration, which also absorbs the
    views and autograd bookkeeping the cost model does not count one by one (on this kind of 2-core
    host ~13 us raw, ~60 us calibrated with 2 ranks). The GPU presets keep 5 us, a typical CUDA launch
    latency (not a spec sheet number): launches are asynchronous and overlap with the kernels already
    queued, so they only show where ops are shorter than their launch.

    ``selective_op_overhead_s`` / ``recompute_op_overhead_s``: what activation checkpointing costs per op
    of a checkpointed block (every op node of the captured graph, views included) beyond the recomputed
    ops' own time that the cost model already charges: the selective policy (a Python dispatch mode that
    decides per dispatched op, in the forward and again in the recompute) and full checkpointing (saved-
    tensor hooks, the recompute's views and bookkeeping). ``autopar profile`` measures both on its GPT
    probes (blocks checkpointed as codegen does, against the same probes plain). 0 = not measured (the
    GPU presets and profiles written before these fields existed): only the recomputed ops are charged.
    """

    name: str
    peak_flops: dict[str, float]
    memory_bandwidth: float
    memory_capacity: int
    max_matmul_efficiency: float = 0.7
    matmul_half_efficiency_flops: float = 2e9
    max_memory_efficiency: float = 0.8
    op_overhead_s: float = 5e-6
    selective_op_overhead_s: float = 0.0
    recompute_op_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for k, v in self.peak_flops.items():
            if not (v > 0 and math.isfinite(v)):
                raise ClusterProfileError(f"device.peak_flops[{k!r}] must be positive, got {v}")
        if "float32" not in self.peak_flops:
            raise ClusterProfileError("device.peak_flops needs at least a 'float32' entry")
        for name in ("memory_bandwidth", "memory_capacity", "max_matmul_efficiency", "max_memory_efficiency"):
            if not getattr(self, name) > 0:
                raise ClusterProfileError(f"device.{name} must be positive, got {getattr(self, name)}")
        for name in ("op_overhead_s", "selective_op_overhead_s", "recompute_op_overhead_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ClusterProfileError(f"device.{name} must be a finite time >= 0 s, got {v!r}")

    def flops_for(self, dtype: str) -> float:
        return self.peak_flops.get(dtype, self.peak_flops["float32"])


@dataclass(frozen=True, kw_only=True)
class OpTime:
    """Measured seconds of one op: its forward, and its backward (the gradients of every input)."""

    fwd_s: float
    bwd_s: float

    def __post_init__(self) -> None:
        for name in ("fwd_s", "bwd_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise OpTableError(f"{name} must be a finite time >= 0 s, got {v!r}")


@dataclass(frozen=True, kw_only=True)
class OpTable:
    """Per-op calibration: measured forward/backward seconds of a model's own ops at the local (sharded)
    shapes its strategies give them, written by :func:`autopar.cluster.calibrate.calibrate_ops`. The cost model
    (``solver.cost.compute_cost``) charges an op found here ``scale`` times its measured time plus
    ``extra_op_s`` per forward and per backward op, and the roofline for every op not found. ``scale``: a
    step's ops run once each, one after another, for as long as a step lasts, where the table's trials
    repeat one op for milliseconds (warm caches, rarely preempted by a process sharing the core): the ratio
    of the timed ops run back to back to the sum of their medians. ``extra_op_s``: what a step pays per op
    beyond the op itself (views, autograd bookkeeping): the probe-calibrated op overhead minus the overhead
    an isolated op already shows.

    ``ranks``: how many processes timed the ops at once (each rank the same op, as a step runs them).
    Where ranks share cores the times depend on it, so a table belongs to a profile of that world size."""

    times: dict[OpKey, OpTime]
    ranks: int = 1
    extra_op_s: float = 0.0
    scale: float = 1.0
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise OpTableError(f"op_times.ranks must be an integer >= 1 (processes timing at once), "
                               f"got {self.ranks!r}")
        v = self.extra_op_s
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
            raise OpTableError(f"op_times.extra_op_s must be a finite time >= 0 s, got {v!r}")
        v = self.scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise OpTableError(f"op_times.scale must be a finite factor > 0, got {v!r}")

    def lookup(self, key: OpKey) -> OpTime | None:
        """The op's time as a step pays it: measured times times ``scale``, plus ``extra_op_s`` per op (forward
        once, backward once; a contraction's backward, two gradients, twice is the caller's: solver.cost)."""
        return self.times.get(key)

    def to_dict(self) -> dict:
        return {"ranks": self.ranks, "extra_op_s": self.extra_op_s, "scale": self.scale,
                "sources": dict(self.sources),
                "entries": [{"op": op, "shapes": [list(s) for s in shapes], "dtype": dtype, "args": args,
                             "fwd_s": t.fwd_s, "bwd_s": t.bwd_s}
                            for (op, shapes, dtype, args), t in self.times.items()]}

    @staticmethod
    def from_dict(d: dict, *, where: str = "op_times") -> "OpTable":
        """Validate and read the JSON form (plain data only; nothing is executed)."""
        if not isinstance(d, dict):
            raise OpTableError(f"{where}: expected an object with 'entries', 'ranks' and 'extra_op_s'")
        entries = d.get("entries")
        if not isinstance(entries, list):
            raise OpTableError(f"{where}.entries must be a list of {{op, shapes, dtype, args, fwd_s, bwd_s}}")
        times: dict[OpKey, OpTime] = {}
        for i, e in enumerate(entries):
            at = f"{where}.entries[{i}]"
            if not isinstance(e, dict):
                raise OpTableError(f"{at}: expected an object")
            missing = [k for k in ("op", "shapes", "dtype", "args", "fwd_s", "bwd_s") if k not in e]
            if missing:
                raise OpTableError(f"{at}: missing field(s) {missing}")
            if not all(isinstance(e[k], str) for k in ("op", "dtype", "args")):
                raise OpTableError(f"{at}: op, dtype and args must be strings")
            shapes = e["shapes"]
            if not (isinstance(shapes, list) and all(
                    isinstance(s, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in s)
                    for s in shapes)):
                raise OpTableError(f"{at}.shapes must be a list of shapes (lists of integers >= 0), got {shapes!r}")
            try:
                t = OpTime(fwd_s=e["fwd_s"], bwd_s=e["bwd_s"])
            except OpTableError as err:
                raise OpTableError(f"{at}: {err}") from None
            times[(e["op"], tuple(tuple(s) for s in shapes), e["dtype"], e["args"])] = t
        sources = d.get("sources", {})
        if not (isinstance(sources, dict) and all(isinstance(v, str) for v in sources.values())):
            raise OpTableError(f"{where}.sources must be an object of strings")
        try:
            return OpTable(times=times, ranks=d.get("ranks", 1), extra_op_s=d.get("extra_op_s", 0.0),
                           scale=d.get("scale", 1.0), sources=dict(sources))
        except OpTableError as err:
            raise OpTableError(f"{where}: {err}") from None


@dataclass(frozen=True, kw_only=True)
class ClusterProfile:
    """Everything the cost model reads about a cluster. JSON round-trips through to_dict/from_dict."""

    name: str
    device: DeviceSpec
    gpus_per_node: int
    intra_node: LinkSpec
    inter_node: LinkSpec
    host_bandwidth: float
    mesh_shape: tuple[int, ...] | None = None
    mesh_dim_links: tuple[LinkSpec, ...] | None = None
    sources: dict[str, str] = field(default_factory=dict)
    op_times: OpTable | None = None   # per-op calibration (optional), see OpTable

    def __post_init__(self) -> None:
        if not (isinstance(self.gpus_per_node, int) and self.gpus_per_node >= 1):
            raise ClusterProfileError(f"gpus_per_node must be an integer >= 1, got {self.gpus_per_node!r}")
        if (self.mesh_dim_links is None) != (self.mesh_shape is None):
            raise ClusterProfileError("mesh_shape and mesh_dim_links go together: give both or neither")
        if self.mesh_dim_links is not None and len(self.mesh_dim_links) != len(self.mesh_shape):
            raise ClusterProfileError(f"mesh_dim_links has {len(self.mesh_dim_links)} entries for a mesh of "
                                      f"{len(self.mesh_shape)} dims {self.mesh_shape}; give one per mesh dim")
        if self.op_times is not None and self.mesh_shape is not None \
                and self.op_times.ranks != math.prod(self.mesh_shape):
            raise OpTableError(
                f"profile {self.name!r}: its op times were measured with {self.op_times.ranks} rank(s) at once but the "
                f"profile is for a mesh of {math.prod(self.mesh_shape)} ranks {self.mesh_shape}; on shared cores the "
                f"times depend on it: calibrate the ops on the same world size (autopar.cluster.calibrate.calibrate_ops)")

    @property
    def host_is_device(self) -> bool:
        """The device is the host CPU (``cpu-gloo``, a profile measured on gloo): "offloading" to host
        memory frees nothing there, so the planner does not offer activation or optimizer offload."""
        return self.device.name.split(" ", 1)[0].lower() == "cpu"

    def dim_links(self, mesh: MeshSpec, nodes: int | None = None) -> tuple[LinkSpec, ...]:
        """The link each mesh dim communicates over (measured per dim when the profile has them).

        Without measurements the innermost dims fill a node first; a dim whose span (its size
        times the sizes of the dims inside it) exceeds ``gpus_per_node`` crosses nodes. Where such a
        group has ``g > 1`` members in each node, its ring collectives run over ``g`` NICs at once
        (``rail_parallel``).
        """
        if self.mesh_dim_links is not None:
            if tuple(mesh.shape) != tuple(self.mesh_shape or ()):
                raise ClusterProfileError(
                    f"profile {self.name!r} was measured on mesh {self.mesh_shape} but the plan is for {mesh.shape}; "
                    f"run `autopar profile --mesh {'x'.join(map(str, mesh.shape))}` or use a preset")
            return self.mesh_dim_links
        per_node = self.gpus_per_node
        if nodes is not None:
            if nodes < 1:
                raise ClusterProfileError(f"--nodes must be >= 1, got {nodes}")
            if mesh.size % nodes:
                raise ClusterProfileError(f"mesh of {mesh.size} devices does not split over {nodes} nodes")
            per_node = mesh.size // nodes
            if per_node > self.gpus_per_node:
                raise ClusterProfileError(f"{nodes} node(s) of {self.gpus_per_node} devices cannot hold a mesh of "
                                          f"{mesh.size}; use --nodes {math.ceil(mesh.size / self.gpus_per_node)}")
        links: list[LinkSpec] = []
        span = 1
        for size in reversed(mesh.shape):
            inner, span = span, span * size
            if span <= per_node:
                links.append(self.intra_node)
            else:
                members = per_node // inner if per_node % inner == 0 else 1
                links.append(rail_parallel(self.inter_node, self.intra_node, min(members, size)))
        return tuple(reversed(links))

    # --- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(replace(self, op_times=None))
        d.pop("op_times")
        if self.op_times is not None:
            d["op_times"] = self.op_times.to_dict()
        d["version"] = 1
        return d

    @staticmethod
    def from_dict(d: dict, *, where: str = "profile") -> "ClusterProfile":
        if not isinstance(d, dict):
            raise ClusterProfileError(f"{where}: expected a JSON object")
        if d.get("version", 1) != 1:
            raise ClusterProfileError(f"{where}: unknown profile version {d.get('version')!r}; this autopar reads 1")
        try:
            dev = DeviceSpec(**_req(d, "device", where))
            links = {k: _link(_req(d, k, where), f"{where}.{k}") for k in ("intra_node", "inter_node")}
            dims = d.get("mesh_dim_links")
            return ClusterProfile(
                name=str(_req(d, "name", where)), device=dev, gpus_per_node=int(_req(d, "gpus_per_node", where)),
                host_bandwidth=_positive(_req(d, "host_bandwidth", where), f"{where}.host_bandwidth"),
                mesh_shape=tuple(d["mesh_shape"]) if d.get("mesh_shape") is not None else None,
                mesh_dim_links=tuple(_link(x, f"{where}.mesh_dim_links[{i}]") for i, x in enumerate(dims))
                if dims is not None else None,
                sources=dict(d.get("sources", {})),
                op_times=OpTable.from_dict(d["op_times"], where=f"{where}.op_times")
                if d.get("op_times") is not None else None, **links)
        except (TypeError, ValueError) as e:
            raise ClusterProfileError(f"{where}: malformed field ({e}); compare with `autopar profile` output") from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


RING_KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def rail_parallel(inter: LinkSpec, intra: LinkSpec, members: int) -> LinkSpec:
    """The inter-node link of a collective group with ``members`` ranks in each node (one NIC per GPU).

    NCCL splits a ring collective over several channels, each a ring that leaves a node through a
    different NIC, so a group with g members per node moves its inter-node ring traffic over g NICs in
    parallel; each rank still sends its whole ring traffic over its own NVLink, which caps the gain:
    beta = max(beta_inter / g, beta_intra) for all-reduce, all-gather and reduce-scatter, alpha that of
    the inter-node link (Jeaugey, "Massively Scale Your Deep Learning Training with NCCL 2.4", NVIDIA
    technical blog 2019; nccl-tests doc/PERFORMANCE.md: bus bandwidth of multi-node DGX all-reduces is
    the nodes' aggregate NIC bandwidth per GPU). send/recv and all-to-all keep one NIC per rank."""
    if members <= 1:
        return inter
    coll = dict(inter.collectives)
    for k in RING_KINDS:
        ab = inter.collectives[k]
        coll[k] = AlphaBeta(alpha=ab.alpha, beta=max(ab.beta / members, intra.collectives[k].beta))
    return LinkSpec(name=inter.name, collectives=coll, sync_s=inter.sync_s)


def _req(d: dict, key: str, where: str):
    if key not in d:
        raise ClusterProfileError(f"{where}: missing field {key!r}")
    return d[key]


def _positive(v, where: str) -> float:
    if not isinstance(v, (int, float)) or not v > 0:
        raise ClusterProfileError(f"{where} must be a positive number, got {v!r}")
    return float(v)


def _link(d: dict, where: str) -> LinkSpec:
    coll = _req(d, "collectives", where)
    if not isinstance(coll, dict):
        raise ClusterProfileError(f"{where}.collectives must be an object of kind -> {{alpha, beta}}")
    out = {}
    for k, v in coll.items():
        if not isinstance(v, dict) or "alpha" not in v or "beta" not in v:
            raise ClusterProfileError(f"{where}.collectives.{k} needs 'alpha' and 'beta'")
        try:
            out[k] = AlphaBeta(alpha=float(v["alpha"]), beta=float(v["beta"]))
        except (TypeError, ValueError):
            raise ClusterProfileError(f"{where}.collectives.{k}: alpha and beta must be numbers, got {v!r}") from None
    sync = d.get("sync_s", 0.0)
    if not isinstance(sync, (int, float)) or isinstance(sync, bool):
        raise ClusterProfileError(f"{where}.sync_s must be a number of seconds, got {sync!r}")
    return LinkSpec(name=str(d.get("name", where)), collectives=out, sync_s=float(sync))


# --- presets --------------------------------------------------------------------------------
GB = 1e9
GiB = 1 << 30


def _gpu_node(name: str, *, peaks: dict[str, float], hbm_bw: float, hbm_bytes: int, nvlink_bw: float,
              ib_bw: float, host_bw: float, sources: dict[str, str]) -> ClusterProfile:
    # Achievable bus bandwidth: ~80 % of the per-direction link rate (typical NCCL, not spec sheet).
    # Latencies: ~10 us inside a node, ~20 us across InfiniBand (typical NCCL ring, not spec sheet).
    return ClusterProfile(
        name=name,
        device=DeviceSpec(name=name, peak_flops=peaks, memory_bandwidth=hbm_bw, memory_capacity=hbm_bytes),
        gpus_per_node=8,
        intra_node=LinkSpec.uniform("nvlink", alpha=10e-6, bandwidth=0.8 * nvlink_bw),
        inter_node=LinkSpec.uniform("infiniband", alpha=20e-6, bandwidth=0.8 * ib_bw),
        host_bandwidth=host_bw, sources=sources)


def _presets() -> dict[str, ClusterProfile]:
    return {
        # NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP32 67 TFLOPS, TF32 494.5 (dense), BF16/FP16 989.5 TFLOPS
        # dense (1,979 with sparsity), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s (bidirectional, 450 GB/s each way),
        # PCIe Gen5 128 GB/s (bidirectional, 64 GB/s each way). DGX H100: 8 GPUs, 8x ConnectX-7 400 Gb/s (50 GB/s) each.
        "h100-sxm": _gpu_node(
            "h100-sxm", peaks={"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989.5e12, "float16": 989.5e12},
            hbm_bw=3.35e12, hbm_bytes=80 * 10**9, nvlink_bw=450 * GB, ib_bw=50 * GB, host_bw=64 * GB,
            sources={"device": "NVIDIA H100 Tensor Core GPU datasheet, SXM5 column",
                     "inter_node": "NVIDIA DGX H100 datasheet: 8x ConnectX-7 400 Gb/s InfiniBand per node"}),
        # NVIDIA H200 Tensor Core GPU datasheet (SXM): same compute as H100 SXM (FP32 67, TF32 494.5 dense,
        # BF16/FP16 989.5 dense TFLOPS), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s, PCIe Gen5 128 GB/s.
        "h200-sxm": _gpu_node(
            "h200-sxm", peaks={"float32": 67e12, "tf32": 494.5e12, "bfloat16": 989.5e12, "float16": 989.5e12},
            hbm_bw=4.8e12, hbm_bytes=141 * 10**9, nvlink_bw=450 * GB, ib_bw=50 * GB, host_bw=64 * GB,
            sources={"device": "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column",
                     "inter_node": "NVIDIA DGX H200: 8x ConnectX-7 400 Gb/s InfiniBand per node"}),
        # NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): FP32 19.5 TFLOPS, TF32 156 (dense), BF16/FP16 312 TFLOPS
        # dense, 80 GB HBM2e at 2,039 GB/s, NVLink 600 GB/s (bidirectional, 300 GB/s each way), PCIe Gen4 64 GB/s
        # (bidirectional, 32 each way). DGX A100: 8x ConnectX-6 200 Gb/s HDR InfiniBand (25 GB/s) per node.
        "a100-80g-sxm": _gpu_node(
            "a100-80g-sxm", peaks={"float32": 19.5e12, "tf32": 156e12, "bfloat16": 312e12, "float16": 312e12},
            hbm_bw=2.039e12, hbm_bytes=80 * 10**9, nvlink_bw=300 * GB, ib_bw=25 * GB, host_bw=32 * GB,
            sources={"device": "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column",
                     "inter_node": "NVIDIA DGX A100 datasheet: 8x ConnectX-6 200 Gb/s HDR InfiniBand per node"}),
        # This kind of machine: 2 CPU cores shared by all gloo ranks over loopback. Rough values read on it
        # (one process, fp32 GEMM ~50 GFLOP/s; gloo loopback ~1 GB/s, ~100 us latency); `autopar profile`
        # measures the real ones. The checkpoint surcharges stay 0 (not measured) here: a measured profile of
        # this host had selective ~300 us and full ~90 us per block op (one process, load ~3), which makes
        # selective recompute dearer than full on it, unlike on GPUs.
        "cpu-gloo": ClusterProfile(
            name="cpu-gloo",
            device=DeviceSpec(name="cpu", peak_flops={"float32": 50e9, "bfloat16": 10e9, "float16": 5e9},
                              memory_bandwidth=10e9, memory_capacity=4 * GiB, max_matmul_efficiency=1.0,
                              matmul_half_efficiency_flops=2e6, op_overhead_s=10e-6),
            gpus_per_node=8,
            intra_node=LinkSpec.uniform("gloo-loopback", alpha=100e-6, bandwidth=1e9),
            inter_node=LinkSpec.uniform("gloo-tcp", alpha=200e-6, bandwidth=0.5e9),
            host_bandwidth=10e9, sources={"device": "rough values for a 2-core CPU host; measure with autopar profile"}),
    }


PRESETS: dict[str, ClusterProfile] = _presets()


def load_cluster(cluster: "str | Path | ClusterProfile") -> ClusterProfile:
    """A preset name, a path to a profile JSON, or a ClusterProfile."""
    if isinstance(cluster, ClusterProfile):
        return cluster
    name = str(cluster)
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name)
    if not path.suffix == ".json" and not path.exists():
        raise ClusterProfileError(f"unknown cluster preset {name!r}; use one of {sorted(PRESETS)} or a path to a "
                                  f"profile JSON written by `autopar profile`")
    if not path.exists():
        raise ClusterProfileError(f"cluster profile file {name!r} does not exist; write one with "
                                  f"`autopar profile --out {name}` or use a preset {sorted(PRESETS)}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ClusterProfileError(f"cluster profile {name!r} is not valid JSON: {e}") from None
    return ClusterProfile.from_dict(data, where=name)


def with_capacity(profile: ClusterProfile, capacity: int) -> ClusterProfile:
    return replace(profile, device=replace(profile.device, memory_capacity=int(capacity)))
