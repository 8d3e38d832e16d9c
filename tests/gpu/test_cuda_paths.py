"""The CUDA paths, on a machine with a GPU: the fused Triton kernels inside the captured GPT and
LLaMA graphs, and ``autopar.parallelize`` on a one-rank NCCL mesh (where ``apply`` fuses kernels),
against the plain model at fp32 tolerance (rtol 1e-4, atol 1e-5).

Without CUDA (CI, laptops) the module is skipped as a whole; the same checks run on the CPU with
the kernels interpreted in tests/kernels/. Run on a GPU machine: ``python -m pytest tests/gpu``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA paths: no GPU on this machine")

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

import fuse_checks  # noqa: E402
import parallel_check  # noqa: E402


@pytest.mark.parametrize("spec", ["gpt-tiny", "llama-tiny"])
def test_fused_graph_matches_the_captured_graph_on_cuda(spec):
    r = fuse_checks.graph_numerics(spec, batch=2, seq=16, device="cuda")
    assert r["kernels"], "the Triton kernels did not run on CUDA"
    assert r["fusions"], f"{spec}: no fusion was applied"
    assert r["loss"] <= 0, f"{spec}: loss outside fp32 tolerance by {r['loss']:.2e}"
    bad = {k: v for k, v in r["grads"].items() if v > 0}
    assert not bad, f"{spec}: gradients outside fp32 tolerance by {bad}"


@pytest.mark.parametrize("spec", ["gpt-tiny", "llama-tiny"])
def test_parallelize_on_a_one_rank_nccl_mesh(spec):
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        r = parallel_check.check_training_step(0, 1, spec, (1,), device="cuda")
    finally:
        dist.destroy_process_group()
    bad = {k: v for k, v in r["errors"].items() if v > 0}
    assert not bad, f"{spec}: outside fp32 tolerance by {bad}"
    assert r["placements_are_dtensors"]
