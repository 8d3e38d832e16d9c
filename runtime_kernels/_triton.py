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


def autotune(configs: list[dict], key: list[str]):
    """``triton.autotune`` over launch configurations, each a dict of meta-parameters plus an optional
    ``num_warps``: on a GPU the fastest one per ``key`` (and argument dtypes) is measured at the
    first call and cached for the process. Interpreted (and without Triton) only the first
    configuration is used, so tests pay for one run. Stack it above :func:`jit`; launchers then
    pass neither the tuned meta-parameters nor ``num_warps``, and size grids with ``lambda meta:``.
    """
    def wrap(fn):
        if triton is None:
            return fn
        chosen = configs[:1] if INTERPRET else configs
        return triton.autotune([triton.Config({k: v for k, v in c.items() if k != "num_warps"},
                                              num_warps=c.get("num_warps", 4)) for c in chosen], key=key)(fn)
    return wrap


ROW_WARPS = [{"num_warps": w} for w in (8, 4, 16, 32)]   # one-row-per-program kernels: tune warps only
# flat elementwise kernels: elements per program and warps (the first is what the interpreter runs)
FLAT_BLOCKS = [{"BLOCK_SIZE": b, "num_warps": w} for b in (1024, 2048, 4096, 8192) for w in (4, 8)]


def flat_grid(n: int):
    """Grid of a flat elementwise kernel over ``n`` elements, for whichever BLOCK_SIZE is tuned."""
    return lambda meta: (-(-n // meta["BLOCK_SIZE"]),)


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


# grid-strided row kernels that also sum over rows into per-program partials: programs per SM, rows
# per tile (loads of several rows in flight at once) and warps; the first is what the interpreter
# runs (4 programs, tiles of 2 rows, so the tests cover partly masked tiles)
STRIDED = [{"PROGS_PER_SM": p, "BLOCK_SIZE_M": m, "num_warps": w}
           for p, m, w in ((4, 2, 16), (4, 1, 16), (2, 1, 16), (4, 1, 8), (2, 2, 16), (1, 4, 16), (2, 4, 16),
                           (1, 2, 16), (4, 2, 8), (2, 2, 8), (1, 4, 8), (1, 8, 16))]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs few programs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def strided_launch(rows: int, device: torch.device, configs: list[dict] = STRIDED):
    """(rows of the partial-sum buffer, grid) of a grid-strided kernel: the grid has
    ``PROGS_PER_SM`` programs per SM (tuned among ``configs``, the kernel's autotune list), at most
    one per tile of ``BLOCK_SIZE_M`` rows; the buffer has room for the largest configuration. Kernels store zeros in the buffer rows past their grid (every configuration
    leaves the whole buffer defined, so the partials can be summed whichever one ran)."""
    sms = sm_count(device)
    part_rows = max(1, min(rows, max(c["PROGS_PER_SM"] for c in configs) * sms))
    return part_rows, lambda meta: (max(1, min(-(-rows // meta.get("BLOCK_SIZE_M", 1)), meta["PROGS_PER_SM"] * sms)),)
