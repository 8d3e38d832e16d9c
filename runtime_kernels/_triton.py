"""Where Triton comes from, and when a kernel runs instead of its torch reference.

A kernel runs when Triton is importable and the tensors are on CUDA, or on the CPU when
``TRITON_INTERPRET=1`` was set before this package was imported (Triton itself reads the variable
when a kernel is decorated, so setting it later has no effect on either). Everything else (CPU
without the interpreter, meta/fake tensors, dtypes the kernels do not handle) runs the torch
reference. Without Triton installed the package still imports: ``jit`` leaves the kernel a plain,
never-called function and ``tl`` answers every attribute, so the kernel signatures still evaluate.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch references still work
    triton = None

    class _Absent:
        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):   # tl.constexpr(...) at module level
            return self

    tl = _Absent()

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW = 65536  # row kernels hold one row in registers; longer rows run the reference


def jit(fn):
    return triton.jit(fn) if triton is not None else fn


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Run the Triton kernel for these tensors (all on one device, float dtypes the kernels handle)?"""
    if triton is None:
        return False
    ts = [t for t in tensors if t is not None]
    dev = ts[0].device.type
    if dev not in ("cuda", "cpu") or (dev == "cpu" and not INTERPRET):
        return False
    if any(t.device != ts[0].device for t in ts):
        return False
    return all(t.dtype in KERNEL_DTYPES for t in ts if t.is_floating_point())


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def row_warps(block: int) -> int:
    """Warps for a kernel that holds ``block`` elements of a row: ~8 elements a thread, 1..16 warps."""
    return max(1, min(16, block // 256))


def num_row_programs(rows: int, device: torch.device) -> int:
    """Programs of a grid-strided row kernel that also reduces over rows (a few per SM; few when
    interpreted, where every program instance costs milliseconds)."""
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))
