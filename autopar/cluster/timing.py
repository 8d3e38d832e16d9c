"""Timing and fitting primitives shared by ``autopar profile``'s measurements (``measure``) and the
cost-model calibration (``calibrate``): what a trial is (median of several, after warm-up, synchronized),
the least-squares fits, and the profiling options. Imports only the core and the profile types.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from autopar.cluster.profile import AlphaBeta
from autopar.core.errors import ClusterProfileError, ConfigError

__all__ = ["ProfileOptions", "fit_alpha_beta", "fit_linear", "fit_per_op", "op_overhead", "sizes_between", "timed"]


def fit_linear(x: Sequence[float], t: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``t = a + b*x`` weighted by 1/t (relative error, so small sizes pin ``a``);
    ``a`` is clamped at 0 (then ``b`` is refitted through the origin). Returns (a, b)."""
    xs, ts = np.asarray(x, dtype=float), np.asarray(t, dtype=float)
    if xs.shape != ts.shape or xs.ndim != 1:
        raise ConfigError(f"sizes and times must be two 1-D sequences of one length, got {xs.shape} and {ts.shape}")
    if len(np.unique(xs)) < 2:
        raise ConfigError(f"an alpha-beta fit needs at least 2 distinct sizes, got {sorted(set(xs.tolist()))}")
    if not (np.all(np.isfinite(xs)) and np.all(xs >= 0) and np.all(np.isfinite(ts)) and np.all(ts > 0)):
        raise ConfigError("sizes must be finite and >= 0 and times finite and > 0 to fit alpha-beta")
    w = 1.0 / ts
    (a, b), *_ = np.linalg.lstsq(np.stack([w, w * xs], axis=1), w * ts, rcond=None)
    if a < 0:
        a = 0.0
        b = float(np.sum(w * w * xs * ts) / np.sum(w * w * xs * xs))
    return float(a), float(b)


def fit_per_op(ops: Sequence[float], base: Sequence[float], timed: Sequence[float]) -> float:
    """Seconds per op ``s`` with ``timed_i - base_i = s * ops_i``: least squares weighted by 1/base_i^2
    (relative error, so a small probe, where the surcharge stands out of the noise, counts as much as a
    large one); at least 0 (a surcharge the noise hides is none)."""
    n, b, t = (np.asarray(v, dtype=float) for v in (ops, base, timed))
    if not (n.shape == b.shape == t.shape and n.ndim == 1) or not np.all(b > 0) or not np.any(n > 0):
        raise ConfigError(f"need op counts (some > 0), base times > 0 and timed times of one length, got "
                          f"{n.tolist()}, {b.tolist()}, {t.tolist()}")
    w = 1.0 / b ** 2
    return max(0.0, float(np.sum(w * n * (t - b)) / np.sum(w * n * n)))


def fit_alpha_beta(sizes: Sequence[float], times: Sequence[float]) -> AlphaBeta:
    """alpha (s) and beta (s/byte) from times measured at message sizes (bytes of ring traffic)."""
    a, b = fit_linear(sizes, times)
    if not b > 0:
        raise ClusterProfileError(f"the times {list(times)} do not grow with message size {list(sizes)}; "
                                  f"measure larger messages (--max-bytes) to fit a bandwidth")
    return AlphaBeta(alpha=a, beta=b)


@dataclass(frozen=True, kw_only=True)
class ProfileOptions:
    """What to measure and how often. Sizes are bytes of the full (gathered) tensor."""

    message_sizes: tuple[int, ...] = (1 << 12, 1 << 15, 1 << 18, 1 << 20, 1 << 22)
    matmul_sizes: tuple[int, ...] = (32, 64, 128, 256, 384)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    stream_bytes: tuple[int, ...] = (1 << 16, 1 << 20, 1 << 23)
    trials: int = 5
    warmup: int = 2
    # GPT probes (layers, d_model, heads, vocab, seq, batch) whose forward+backward calibrates the roofline
    probes: tuple[tuple[int, int, int, int, int, int], ...] = ((2, 64, 4, 256, 32, 2), (2, 128, 4, 512, 64, 8),
                                                             (2, 256, 8, 1024, 64, 8))
    # per-op calibration (optional): (model spec as `autopar plan --model` takes it, batch, seq) whose ops are
    # timed at the local shapes of every strategy on the profiled mesh (autopar.cluster.calibrate.calibrate_ops)
    ops_of: tuple[str, int, int] | None = None
    ops_trial_s: float = 20e-3   # shortest timed trial of one op (OpCalibrationOptions.min_trial_s)

    @staticmethod
    def for_backend(backend: str, message_sizes: tuple[int, ...] | None = None, trials: int = 5) -> "ProfileOptions":
        """Defaults sized for the hardware: CPU gloo (KiB..MiB, small GEMMs) or GPU nccl (up to 256 MiB,
        GEMMs up to 8192, 1 GiB streams) where small sizes would only measure launch latency."""
        if backend == "nccl":
            return ProfileOptions(message_sizes=message_sizes or sizes_between(1 << 16, 1 << 28, 7),
                                  matmul_sizes=(512, 1024, 2048, 4096, 8192), stream_bytes=(1 << 24, 1 << 28, 1 << 30),
                                  dtypes=("float32", "tf32", "bfloat16", "float16"), trials=trials,
                                  probes=((4, 1024, 16, 8192, 512, 8), (4, 2048, 16, 8192, 1024, 8)))
        return ProfileOptions(message_sizes=message_sizes or ProfileOptions.message_sizes, trials=trials)

    def __post_init__(self) -> None:
        if self.trials < 1 or self.warmup < 0:
            raise ConfigError(f"trials must be >= 1 and warmup >= 0, got {self.trials}, {self.warmup}")
        if len(set(self.message_sizes)) < 2 or min(self.message_sizes) < 64:
            raise ConfigError(f"give at least 2 distinct message sizes of >= 64 bytes, got {self.message_sizes}")
        if len(set(self.matmul_sizes)) < 2 or min(self.matmul_sizes) < 1:
            raise ConfigError(f"give at least 2 distinct matmul sizes, got {self.matmul_sizes}")


def sizes_between(lo: int, hi: int, count: int) -> tuple[int, ...]:
    """``count`` message sizes spaced geometrically from lo to hi bytes (multiples of 64)."""
    if not (64 <= lo < hi) or count < 2:
        raise ConfigError(f"need 64 <= min bytes < max bytes and >= 2 sizes, got {lo}, {hi}, {count}")
    return tuple(sorted({max(64, int(round(lo * (hi / lo) ** (i / (count - 1)) / 64)) * 64) for i in range(count)}))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, trials: int, warmup: int, iters: int = 1) -> float:
    """Median of ``trials`` runs of ``iters`` back-to-back calls (per call), maximum over all ranks.

    The median, not the fastest run: a training step pays every call's typical time, and the fastest
    run hides how unevenly calls take. On gloo ranks that share cores the spread is mostly in the
    collectives (a tight loop of small all-reduces measured 1.0 ms fastest, 3.2 ms median, while
    matmuls spread 1.3x), so the fastest runs priced collectives low against compute. The maximum over
    ranks is what a synchronous step waits for."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(trials):
        if dist.is_initialized():
            dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / iters)
    med = torch.tensor([float(np.median(samples))], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item())


def op_overhead(device: torch.device, opts: ProfileOptions) -> float:
    """Seconds per tiny op as the cost model charges it: forward (1x) plus backward (1x) per op."""
    chain = 16
    x = torch.ones(8, device=device, requires_grad=True)

    def run():
        y = x
        for _ in range(chain):
            y = y * 1.0001
        y.sum().backward()
    return timed(run, device, opts.trials, opts.warmup, iters=20) / (2 * (chain + 1))
