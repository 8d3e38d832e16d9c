"""Per-step metrics: a JSON-lines file, a progress bar and TensorBoard (rank 0 only).

Each record: ``step`` (steps done), ``loss``, ``lr``, ``grad_norm``, ``tokens`` (this step, all ranks),
``tokens_per_s``, ``step_time_s`` (forward, backward, sync, step), ``elapsed_s`` (since the loop started,
logging and checkpoints included), ``mfu`` (6 x parameters x tokens/s over the cluster's peak FLOP/s, the
usual dense-transformer estimate that leaves attention's quadratic term out), ``peak_memory_bytes`` (this
rank's peak allocated CUDA memory; ``null`` on CPU, where there is no allocator counter to read).
A resumed run first drops records past the step it resumed from, so the file is one clean curve.
Must not: decide anything about training.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger"]


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
                self._tb = SummaryWriter(str(tensorboard_dir))
            except (ImportError, ModuleNotFoundError):
                log.warning("logging.tensorboard_dir is set but the tensorboard package is not installed; skipped")

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
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
