"""Per-step metrics: a JSON-lines file, a progress bar and TensorBoard (rank 0 only).

Each record: ``step`` (steps done), ``loss``, ``lr``, ``grad_norm``, ``tokens`` (this step, all ranks),
``tokens_per_s``, ``step_time_s`` (forward, backward, sync, step), ``elapsed_s`` (since the loop started,
logging and checkpoints included), ``mfu`` (6 x parameters x tokens/s over the cluster's peak FLOP/s, the
usual dense-transformer estimate that leaves attention's quadratic term out), and two memory figures, each
per rank (``*_per_rank``, a list by global rank) and as the largest over the ranks:

- ``peak_memory_bytes``: peak allocated CUDA memory (``torch.cuda.max_memory_allocated``: tensors the
  caching allocator handed out); ``null`` on CPU, where torch keeps no allocator counter.
- ``host_peak_rss_bytes``: the process's resident-set high-water mark since it started
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), on CPU and GPU alike. It is what the operating system
  charged the process at its peak: tensors and everything else (the Python interpreter, torch's libraries,
  allocator caches, and the full model each rank builds before its slices are kept), so it is an upper
  bound on tensor memory, not live-tensor accounting; ``autopar.memory.measure`` is that, for one step.

TensorBoard (``logging.tensorboard_dir``, when the ``tensorboard`` package is installed; the import is lazy)
receives every number of a record as ``train/<key>`` at its step (lists and ``null`` are in the JSONL file
only); without the package the JSONL file is written alone, said once in the log.
A resumed run first drops records past the step it resumed from, so the file is one clean curve.
Must not: decide anything about training.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "host_peak_rss_bytes", "memory_per_rank", "peak_memory_bytes"]


class MetricsLogger:
    def __init__(self, path: Path | None, *, rank: int, total_steps: int, start_step: int, progress: bool,
                 tensorboard_dir: Path | None):
        self.rank, self.path = rank, path
        self._file = None
        self._bar = None
        self._tb = None
        if rank != 0:
            return
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if path.is_file():
                for line in path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue            # a line cut short by a kill
                    if rec.get("step", 0) <= start_step:
                        kept.append(line)
            path.write_text("".join(line + "\n" for line in kept))
            self._file = path.open("a")
        if progress:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                log.info("tqdm is not installed: no progress bar")
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # a resumed run: TensorBoard drops the earlier run's events past the step it resumed from
                self._tb = SummaryWriter(str(tensorboard_dir), purge_step=start_step + 1 if start_step else None)
            except (ImportError, ModuleNotFoundError):
                log.warning("logging.tensorboard_dir is set but the tensorboard package is not installed: only "
                            "the JSONL metrics file is written (pip install 'autopar[train]' or tensorboard)")

    def log(self, rec: dict) -> None:
        if self.rank != 0:
            return
        if self._file is not None:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        if self._bar is not None:
            self._bar.n = rec["step"]
            self._bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", refresh=False)
            self._bar.refresh()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        for h in (self._file, self._bar, self._tb):
            if h is not None:
                h.close()


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated CUDA memory of ``device``; None elsewhere (no allocator counter on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def host_peak_rss_bytes() -> int | None:
    """This process's resident-set high-water mark in bytes (``getrusage``: KiB on Linux, bytes on macOS);
    None where the ``resource`` module does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_per_rank(device: torch.device) -> dict:
    """The memory figures of every rank (a collective under a process group: every rank calls it), by global
    rank and as the largest: ``peak_memory_bytes[_per_rank]`` and ``host_peak_rss_bytes[_per_rank]``."""
    mine = [peak_memory_bytes(device), host_peak_rss_bytes()]
    rows = [mine]
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        t = torch.zeros((world, 2), dtype=torch.int64, device=device)
        t[rank] = torch.tensor([-1 if v is None else v for v in mine], dtype=torch.int64)
        dist.all_reduce(t)
        rows = [[None if v < 0 else v for v in row] for row in t.tolist()]
    out: dict = {}
    for i, key in enumerate(("peak_memory_bytes", "host_peak_rss_bytes")):
        per = [row[i] for row in rows]
        known = [v for v in per if v is not None]
        out[key] = max(known) if known else None
        out[f"{key}_per_rank"] = per if known else None
    return out
