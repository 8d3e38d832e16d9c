"""The checkpoint directory of a job: ``step_<N>`` checkpoints, a ``latest`` pointer, keep-last-N.

Each checkpoint is ``autopar.save`` (DCP: model, optimizer, every rank's RNG) with the step and the data
position as extras, written synchronously or in the background (``checkpoint.async_save``). ``latest`` names
the newest *complete* checkpoint: it is written (atomically, by rank 0) only after the save completed on
every rank, so a run killed while saving resumes from the one before. Older checkpoints beyond ``keep_last`` are deleted after the pointer moved.
Must not: know the training loop.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch.distributed as dist
from torch import nn

from autopar.runtime.checkpoint import load, save

__all__ = ["CheckpointWriter", "latest_checkpoint", "restore", "save_step"]

LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def latest_checkpoint(directory: Path) -> Path | None:
    f = directory / LATEST
    if not f.is_file():
        return None
    path = directory / f.read_text().strip()
    return path if path.is_dir() else None


class CheckpointWriter:
    """The job's checkpoints, written synchronously or (``asynchronous``) by ``autopar.save``'s background writer
    while training goes on; ``latest`` moves to a checkpoint only once it is complete on every rank: an
    asynchronous save completes at the next ``save`` or at ``finish`` (a collective call, every rank)."""

    def __init__(self, directory: Path, keep_last: int, *, asynchronous: bool = False) -> None:
        self.directory, self.keep_last, self.asynchronous = directory, keep_last, asynchronous
        self._pending: tuple[Path, object] | None = None

    def save(self, step: int, module: nn.Module, optimizer, data_state: dict) -> Path:
        """Save step ``step`` (a collective call)."""
        self.finish()   # one save in flight at a time
        path = self.directory / f"step_{step:08d}"
        if _rank() == 0 and path.exists():     # a partial save of a killed run
            shutil.rmtree(path)
        if dist.is_initialized():
            dist.barrier()
        with _quiet():
            pending = save(path, module, optimizer, asynchronous=self.asynchronous, step=step, data=data_state)
        self._pending = (path, pending)
        if not self.asynchronous:
            self.finish()
        return path

    def finish(self) -> None:
        """Complete the save in flight (if any): wait for it, move ``latest`` to it, prune old ones (rank 0)."""
        if self._pending is None:
            return
        path, pending = self._pending
        self._pending = None
        if pending is not None:
            with _quiet():
                pending.wait()
        if _rank() == 0:
            tmp = self.directory / (LATEST + ".tmp")
            tmp.write_text(path.name)
            os.replace(tmp, self.directory / LATEST)
            if self.keep_last > 0:
                done = sorted(p for p in self.directory.glob("step_*") if p.is_dir() and p.name <= path.name)
                for old in done[:-self.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()


def save_step(directory: Path, step: int, module: nn.Module, optimizer, data_state: dict, keep_last: int) -> Path:
    """Save step ``step`` (a collective), move ``latest`` to it and prune old ones (rank 0)."""
    return CheckpointWriter(directory, keep_last).save(step, module, optimizer, data_state)


def restore(path: Path, module: nn.Module, optimizer) -> dict:
    """Load ``path`` into the module and optimizer; returns its extras (``step``, ``data``)."""
    with _quiet():
        return load(path, module, optimizer)


@contextlib.contextmanager
def _quiet():
    """In one process DCP warns on every call that it assumes a single process, which is what is meant."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
