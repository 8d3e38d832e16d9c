"""Helpers shared by the benchmark scripts: the machine description every result JSON carries, a
free localhost port for a gloo process group, and the end of a spawned worker. Not a benchmark itself."""
from __future__ import annotations

import os
import platform
import socket
import sys


def machine(**extra) -> dict:
    """Platform, Python, torch, CPU count and model, plus ``extra`` fields (e.g. GPU, library versions)."""
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "cpu": cpu, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_worker(out_q) -> None:
    """End a spawned rank: deliver what it queued, leave the process group, and exit without the
    interpreter teardown that sometimes aborts gloo workers (PITFALLS)."""
    import torch.distributed as dist

    out_q.close()
    out_q.join_thread()  # the queue's feeder thread must deliver before os._exit
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
