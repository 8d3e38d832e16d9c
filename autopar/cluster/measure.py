"""``autopar profile``: measure a live cluster and fit the numbers the cost model reads.

On a process group (spawned here, or joined under torchrun) every rank takes part at once, so
shared hardware is measured the way training uses it (4 gloo ranks on 2 cores each see half a
core). Measured:

* per mesh dim, the extra cost of a collective call that follows compute over what its alpha-beta fit
  charges (``measure_sync``: ranks drift apart during the compute and the call waits for the last one;
  large where ranks share cores);
* per mesh dim and collective kind (all-reduce, all-gather, reduce-scatter, all-to-all,
  send/recv as a ring shift), times over message sizes fitted to ``t = alpha + beta * x`` where
  x is the per-rank ring traffic the solver's ``collective_time`` charges (all-reduce
  2(n-1)/n*S, gathers and scatters (n-1)/n*S, send/recv S). The four reshard collectives are
  timed as the parallel module runs them (``autopar.ops.collectives.redistribute``, copies included);
  send/recv as raw torch.distributed p2p;
* matmul time against FLOPs (fp32 fitted to ``t = (f + h) / P``, the DeviceSpec efficiency
  curve with max efficiency 1; other dtypes at the largest size), memory bandwidth (a streaming
  add), the per-op overhead as the cost model charges it (a chain of tiny ops, forward and
  backward), and host<->device bandwidth on CUDA (pinned copies; on CPU the memory bandwidth);
* a calibration: forward+backward of small GPTs (the example model) timed and compared with
  what the cost model charges for their captured ops; the per-op overhead and the throughputs
  are scaled by least squares so the two agree (:func:`autopar.cluster.calibrate.calibrate`);
* per op of a checkpointed block, what selective and full activation checkpointing cost beyond the
  recomputed ops (the same probes with their blocks checkpointed,
  :func:`autopar.cluster.calibrate.measure_checkpoint_overhead`);
* optionally (``ProfileOptions.ops_of``, ``autopar profile --ops-of MODEL``) a model's own ops at the local
  shapes of every strategy on the profiled mesh (:func:`autopar.cluster.calibrate.calibrate_ops`), stored as the
  profile's ``op_times`` and charged instead of the roofline.

The result is a :class:`~autopar.cluster.profile.ClusterProfile` with one measured link per mesh dim,
plus the raw samples under ``measurements`` (ignored by the loader). Each point is the median of
a few timed trials (what a step pays per call, see ``_timed``), maximum over ranks. Library code logs and calls
``progress``; it never prints.
"""
from __future__ import annotations

import datetime
import logging
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh

from autopar.cluster.calibrate import OpCalibrationOptions, calibrate, calibrate_ops, measure_checkpoint_overhead
from autopar.cluster.profile import COLLECTIVES, AlphaBeta, ClusterProfile, DeviceSpec, LinkSpec
from autopar.cluster.timing import ProfileOptions, fit_alpha_beta, fit_linear, op_overhead, timed
from autopar.core.capture import capture
from autopar.core.errors import ClusterProfileError, ConfigError
from autopar.core.mesh import MeshSpec
from autopar.core.placement import Partial, Replicate, Shard
from autopar.core.runtime_rules import ring_traffic
from autopar.models import build_model
from autopar.ops.collectives import redistribute

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (what, done, total)
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# --- fitting ----------------------------------------------------------------------------------
# --- options ----------------------------------------------------------------------------------
# --- timing helpers -----------------------------------------------------------------------------
def _runtime_call(kind: str, nbytes: int, mesh, d: int, device: torch.device) -> Callable[[], object] | None:
    """The collective step as the parallel module runs it (autopar.ops.collectives.redistribute on mesh dim d,
    with its copies and checks), on a 2-D fp32 tensor whose full size is ~``nbytes``; None for send/recv."""

    n = mesh.size(d)
    cols = 16 * n
    rows = max(n, (nbytes // 4 // cols) // n * n)
    steps = {"all_reduce": (Partial("sum"), Replicate(), rows), "all_gather": (Shard(0), Replicate(), rows // n),
             "reduce_scatter": (Partial("sum"), Shard(0), rows), "all_to_all": (Shard(0), Shard(1), rows // n)}
    if kind not in steps:
        return None
    a, b, local_rows = steps[kind]
    on = lambda p: tuple(p if i == d else Replicate() for i in range(mesh.ndim))  # noqa: E731
    x = torch.ones(local_rows, cols, device=device)
    return lambda: redistribute(x, on(a), on(b), mesh=mesh)


def _collective_call(kind: str, nbytes: int, n: int, group, device: torch.device) -> Callable[[], object]:
    """A closure running one collective of ``kind`` whose full tensor has ``nbytes`` (fp32)."""
    numel = max(n, (nbytes // 4) // n * n)
    full = torch.ones(numel, dtype=torch.float32, device=device)
    part = torch.ones(numel // n, dtype=torch.float32, device=device)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if kind == "all_gather":
        return lambda: _ALL_GATHER(full, part, group=group)
    if kind == "reduce_scatter":
        return lambda: _REDUCE_SCATTER(part, full, group=group)
    if kind == "all_to_all":
        out = torch.empty_like(full)
        return lambda: dist.all_to_all_single(out, full, group=group)
    if kind == "send_recv":  # every rank sends S bytes to the next and receives from the previous one
        ranks = dist.get_process_group_ranks(group)
        me = ranks.index(dist.get_rank())
        recv = torch.empty_like(full)

        def shift():
            ops = [dist.P2POp(dist.isend, full, ranks[(me + 1) % n], group),
                   dist.P2POp(dist.irecv, recv, ranks[(me - 1) % n], group)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        return shift
    raise ConfigError(f"unknown collective {kind!r}; one of {COLLECTIVES}")


def _sweep(kind: str, mesh, d: int, device: torch.device, opts: ProfileOptions) -> tuple[list[float], list[float]]:
    """(per-rank traffic bytes, seconds) of one collective over every message size."""
    n, group = mesh.size(d), mesh.get_group(d)
    xs, ts = [], []
    for nbytes in opts.message_sizes:
        unit = 64 * n * n  # whole rows of 16n fp32 columns, n | rows: both call paths move exactly nbytes
        nbytes = max(unit, nbytes // unit * unit)
        call = _runtime_call(kind, nbytes, mesh, d, device) or _collective_call(kind, nbytes, n, group, device)
        ts.append(timed(call, device, opts.trials, opts.warmup, iters=max(1, min(16, (1 << 20) // nbytes))))
        xs.append(ring_traffic(kind, n) * nbytes)
    return xs, ts


def measure_sync(mesh, d: int, device: torch.device, opts: ProfileOptions, all_reduce: AlphaBeta,
                 work_s: float = 1e-3) -> tuple[float, dict]:
    """(seconds, raw) a collective call costs beyond what its alpha-beta fit charges when compute sits
    between calls, as in a training step: every rank runs ``work`` (matmuls worth ~``work_s``) then a
    small all-reduce through the runtime's reshard path on mesh dim d, against ``work`` alone;
    sync = T(work + call) - T(work) - (alpha + beta x), at least 0, with ``all_reduce`` the fit of the same
    call over message sizes (x its ring traffic). Ranks that share cores drift apart during the work and
    the call waits for the last one. Timed over twice the usual trials: it is a difference of medians."""
    a = torch.randn(64, 64, device=device)
    n = mesh.size(d)
    nbytes = max(64 * n * n, min(opts.message_sizes) // (64 * n * n) * 64 * n * n)
    call = _runtime_call("all_reduce", nbytes, mesh, d, device)
    trials = 2 * opts.trials
    t_mm = timed(lambda: torch.mm(a, a), device, opts.trials, opts.warmup, iters=64)
    k = max(1, int(work_s / max(t_mm, 1e-9)))

    def work():
        for _ in range(k):
            torch.mm(a, a)
    t_work = timed(work, device, trials, opts.warmup, iters=8)
    t_both = timed(lambda: (work(), call()), device, trials, opts.warmup, iters=8)
    fitted = all_reduce.alpha + all_reduce.beta * ring_traffic("all_reduce", n) * nbytes
    sync = max(0.0, t_both - t_work - fitted)
    return sync, {"work_s": t_work, "work_and_call_s": t_both, "fitted_call_s": fitted, "bytes": nbytes,
                  "matmuls": k, "sync_s": sync}


# --- measurements ---------------------------------------------------------------------------------
def measure_links(mesh, opts: ProfileOptions, progress: Progress | None = None) -> tuple[list[LinkSpec], dict]:
    """One LinkSpec per mesh dim (a torch DeviceMesh), fitted from every collective over the sizes."""
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device(mesh.device_type)
    names = mesh.mesh_dim_names or tuple(f"d{i}" for i in range(mesh.ndim))
    links, raw, warnings = [], {"warnings": []}, []
    total = sum(len(COLLECTIVES) * len(opts.message_sizes) for d in range(mesh.ndim) if mesh.size(d) > 1)
    done = 0
    for d in range(mesh.ndim):
        n = mesh.size(d)
        if n == 1:  # nothing travels over a dim of one rank; filled in from another dim below
            links.append(None)
            continue
        group, coll, raw[names[d]] = mesh.get_group(d), {}, {}
        for kind in COLLECTIVES:
            timed(_collective_call(kind, max(opts.message_sizes), n, group, device), device, 1, opts.warmup)
            for attempt in range(2):  # a sweep that noise made non-increasing is measured once more
                xs, ts = _sweep(kind, mesh, d, device, opts)
                try:
                    coll[kind] = fit_alpha_beta(xs, ts)
                    break
                except ClusterProfileError:
                    if attempt:  # still flat: latency = the fastest point, bandwidth bounded by the largest
                        log.warning("%s %s: times %s do not grow with size (a busy host?); using alpha = the "
                                    "fastest time, beta = largest time / largest size", names[d], kind, ts)
                        warnings.append(f"{names[d]} {kind}: no size dependence measured; bandwidth is a bound")
                        coll[kind] = AlphaBeta(alpha=min(ts), beta=ts[-1] / xs[-1])
            done += len(opts.message_sizes)
            if progress:
                progress(f"{names[d]} {kind}", done, total)
            raw[names[d]][kind] = {"traffic_bytes": xs, "seconds": ts}
        sync, raw[names[d]]["sync"] = measure_sync(mesh, d, device, opts, coll["all_reduce"])
        links.append(LinkSpec(name=f"measured-{names[d]}", collectives=coll, sync_s=sync))
    raw["warnings"] = warnings
    known = [lk for lk in links if lk is not None]
    if not known:
        raise ClusterProfileError(f"mesh {tuple(mesh.shape)} has no dim of more than one rank: there is no link "
                                  f"to measure; profile with --nproc 2 or more")
    return [lk if lk is not None else known[-1] for lk in links], raw


def measure_device(device: torch.device, opts: ProfileOptions, progress: Progress | None = None
                   ) -> tuple[DeviceSpec, float, dict]:
    """DeviceSpec (peaks, efficiency curve, overhead), host bandwidth, raw samples."""
    raw: dict[str, object] = {}
    steps = len(opts.matmul_sizes) + len(opts.dtypes) + len(opts.stream_bytes) + 2
    done = [0]

    def tick(what: str) -> None:
        done[0] += 1
        if progress:
            progress(what, done[0], steps)

    overhead = op_overhead(device, opts)
    raw["op_overhead_s"] = overhead
    tick("op overhead")
    flops, times = [], []
    for k in opts.matmul_sizes:
        a = torch.randn(k, k, device=device)
        b = torch.randn(k, k, device=device)
        times.append(timed(lambda: torch.mm(a, b), device, opts.trials, opts.warmup, iters=max(1, 2 ** 21 // k ** 2)))
        flops.append(2.0 * k ** 3)
        tick(f"matmul {k}")
    intercept, slope = fit_linear(flops, times)
    if not slope > 0:
        raise ClusterProfileError(f"matmul times {times} do not grow with size; use larger --matmul-sizes")
    peak32 = 1.0 / slope
    half = max(0.0, (intercept - overhead) * peak32)  # t = overhead + (f + half) / peak (cost.py's roofline)
    raw["matmul"] = {"float32": {"flops": flops, "seconds": times}}
    peaks = {"float32": peak32}
    k = max(opts.matmul_sizes)
    for dt in opts.dtypes:
        if dt == "float32":
            tick("matmul float32")
            continue
        dtype = torch.float32 if dt == "tf32" else getattr(torch, dt)
        a = torch.randn(k, k, device=device).to(dtype)
        b = torch.randn(k, k, device=device).to(dtype)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = dt == "tf32"
        try:
            t = timed(lambda: torch.mm(a, b), device, opts.trials, opts.warmup, iters=max(1, 2 ** 21 // k ** 2))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        f = 2.0 * k ** 3
        peaks[dt] = (f + half) / max(t - overhead, 1e-12)
        raw["matmul"][dt] = {"flops": [f], "seconds": [t]}
        tick(f"matmul {dt}")
    xs, ts = [], []
    for nbytes in opts.stream_bytes:
        numel = max(1, nbytes // 4)
        a, b = torch.ones(numel, device=device), torch.ones(numel, device=device)
        c = torch.empty_like(a)
        ts.append(timed(lambda: torch.add(a, b, out=c), device, opts.trials, opts.warmup,
                         iters=max(1, 2 ** 22 // numel)))
        xs.append(3.0 * numel * 4)
        tick(f"memory {nbytes} B")
    mem_bw = xs[-1] / ts[-1]  # the largest stream (small ones run from cache)
    raw["memory"] = {"bytes": xs, "seconds": ts}
    host_bw = _host_bandwidth(device, opts) if device.type == "cuda" else mem_bw
    tick("host link")
    capacity = _capacity(device)
    spec = DeviceSpec(name=_device_name(device), peak_flops=peaks, memory_bandwidth=mem_bw, memory_capacity=capacity,
                      max_matmul_efficiency=1.0, matmul_half_efficiency_flops=half, max_memory_efficiency=1.0,
                      op_overhead_s=overhead)
    if opts.probes:
        spec, raw["calibration"] = calibrate(spec, device, opts)
        spec, raw["checkpoint"] = measure_checkpoint_overhead(spec, device, opts)
    return spec, host_bw, raw


def _host_bandwidth(device: torch.device, opts: ProfileOptions) -> float:
    nbytes = max(opts.message_sizes) * 4
    host = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    dev = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    t = timed(lambda: dev.copy_(host, non_blocking=True), device, opts.trials, opts.warmup, iters=4)
    return nbytes / t


def _capacity(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
    return int(total // max(1, local))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} thread(s) per rank)"


# --- the whole profile -------------------------------------------------------------------------
def profile_cluster(mesh_shape: tuple[int, ...], *, dim_names: tuple[str, ...] | None = None,
                    opts: ProfileOptions | None = None, progress: Progress | None = None) -> dict:
    """Measure on the current (initialized) process group; every rank returns the profile JSON dict."""

    opts = opts or ProfileOptions.for_backend(dist.get_backend())
    spec = MeshSpec.make(mesh_shape, dim_names)
    world = dist.get_world_size()
    spec.check_world_size(world)
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
    mesh = init_device_mesh(device_type, spec.shape, mesh_dim_names=spec.dim_names)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    t0 = time.perf_counter()
    links, raw_links = measure_links(mesh, opts, progress)
    dev, host_bw, raw_dev = measure_device(device, opts, progress)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # dims inside a node: their span (size times the sizes inside them) fits on one node
    inner, span = [], 1
    for d in reversed(range(spec.ndim)):
        span *= spec.shape[d]
        inner.append(span <= per_node)
    inner.reverse()
    intra = next((links[d] for d in reversed(range(spec.ndim)) if inner[d]), links[-1])
    inter = next((links[d] for d in range(spec.ndim) if not inner[d]), links[0])
    prof = ClusterProfile(
        name=f"measured-{dist.get_backend()}-{'x'.join(map(str, spec.shape))}", device=dev,
        gpus_per_node=per_node, intra_node=intra, inter_node=inter, host_bandwidth=host_bw,
        mesh_shape=tuple(spec.shape), mesh_dim_links=tuple(links),
        sources={"device": f"measured by autopar profile on {socket.gethostname()}",
                 "links": f"{dist.get_backend()} collectives over mesh {spec.shape} {spec.dim_names}, sizes "
                          f"{list(opts.message_sizes)} B, fitted alpha-beta on per-rank ring traffic",
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "torch": torch.__version__, "world_size": str(world)})
    if opts.ops_of is not None:
        prof = _with_op_times(prof, opts, device, progress)
    out = prof.to_dict()
    out["measurements"] = {"links": raw_links, "device": raw_dev, "seconds": time.perf_counter() - t0,
                           "dim_names": list(spec.dim_names)}
    return out


def _with_op_times(prof: ClusterProfile, opts: ProfileOptions, device: torch.device,
                   progress: Progress | None) -> ClusterProfile:
    """``prof`` with per-op calibration of the model ``opts.ops_of`` = (spec, batch, seq) on its mesh: every
    rank builds the model on ``device`` and times its ops at once (autopar.cluster.calibrate.calibrate_ops)."""


    spec, batch, seq = opts.ops_of
    if progress:
        progress(f"ops of {spec}", 0, 1)
    model, inputs = build_model(spec, batch=batch, seq=seq, device=device)
    table = calibrate_ops(capture(model, inputs), prof.mesh_shape, prof, device=device,
                          options=OpCalibrationOptions(trials=opts.trials, warmup=opts.warmup,
                                                       min_trial_s=opts.ops_trial_s))
    if progress:
        progress(f"ops of {spec}", 1, 1)
    return replace(prof, op_times=table)


def _worker(rank: int, world: int, port: int, backend: str, mesh_shape, dim_names, opts, progress, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    status = 0
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
        res = profile_cluster(mesh_shape, dim_names=dim_names, opts=opts, progress=progress if rank == 0 else None)
        if rank == 0:
            q.put(("ok", res))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        status = 1
        if rank == 0:
            q.put(("error", e if isinstance(e, ClusterProfileError | ConfigError) else repr(e)))
    q.close()
    q.join_thread()
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(status)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_profile(*, nproc: int, mesh_shape: tuple[int, ...] | None = None, dim_names: tuple[str, ...] | None = None,
                backend: str = "gloo", opts: ProfileOptions | None = None, progress: Progress | None = None,
                timeout: float = 1800.0) -> dict:
    """Profile JSON dict: joins the process group when one exists (torchrun: RANK/WORLD_SIZE set), else
    spawns ``nproc`` local ranks. ``progress`` must be picklable (a module-level function) when spawning."""

    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"backend {backend!r}: use gloo (CPU) or nccl (GPU)")
    if dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        if not dist.is_initialized():
            dist.init_process_group(backend)
        world = dist.get_world_size()
        return profile_cluster(mesh_shape or (world,), dim_names=dim_names, opts=opts,
                               progress=progress if dist.get_rank() == 0 else None)
    shape = tuple(mesh_shape or (nproc,))
    if nproc < 2:
        raise ConfigError(f"--nproc {nproc}: profiling links needs at least 2 ranks")
    MeshSpec.make(shape, dim_names).check_world_size(nproc)
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ConfigError(f"nccl with {nproc} ranks needs {nproc} GPUs; this host has {torch.cuda.device_count()}")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, backend, shape, dim_names, opts, progress, q))
             for r in range(nproc)]
    for p in procs:
        p.start()
    try:
        status, res = q.get(timeout=timeout)
    except Exception:
        status, res = "error", "the ranks reported nothing before the timeout"
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    if status != "ok":
        if isinstance(res, Exception):
            raise res
        raise ClusterProfileError(f"profiling failed on rank 0: {res}")
    return res
