"""Each runtime kernel against its torch reference through the Triton interpreter on the CPU, and
a fused LLaMA graph (codegen.fuse_kernels) against the unfused one with the kernels interpreted.

The checks run once, in a subprocess with TRITON_INTERPRET=1 (Triton reads it when kernels are
decorated, and it must not leak into other tests); see tests/kernel_checks.py for the cases.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed: the kernels cannot be interpreted")

TESTS = Path(__file__).resolve().parent.parent
KERNELS = ["layer_norm", "rms_norm", "add_norm", "bias_gelu-none", "bias_gelu-tanh", "swiglu", "rotary",
           "cross_entropy"]
CASES = ([f"{k}-{dt}" for dt in ("float32", "bfloat16") for k in KERNELS]
         + ["cross_entropy-4099cols-sum", "layer_norm-noncontig-9rows", "rms_norm-noweight-9rows",
            "rotary-transposed-bf16x-fp32cos"]
         + [f"vocab_parallel_cross_entropy-{dt}-rank{r}" for dt in ("float32", "bfloat16") for r in (0, 1)]
         + ["fused-llama-tiny"])


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("kernels") / "records.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", f"import kernel_checks; kernel_checks.main({str(out)!r})"],
                          cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["name"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(records, case):
    r = records.get(case)
    assert r is not None, f"no record for {case}: {sorted(records)}"
    assert r["kernel"], f"{case}: the Triton path did not run (the torch reference did)"
    bad = {k: v for k, v in r["errors"].items() if v > 0}
    assert not bad, f"{case}: outside tolerance by {bad}"


def test_bf16_outputs_keep_the_unfused_dtype(records):
    assert records["layer_norm-bfloat16"]["dtypes"] == ["torch.bfloat16"]
    assert records["add_norm-bfloat16"]["dtypes"] == ["torch.bfloat16", "torch.bfloat16"]
    # bf16 activations times fp32 cos/sin promote to fp32, as x * cos does
    assert records["rotary-transposed-bf16x-fp32cos"]["dtypes"] == ["torch.float32"]


def test_fused_llama_graph_runs_every_fusion_kind_it_has(records):
    kinds = {f["kind"] for f in records["fused-llama-tiny"]["fusions"]}
    assert kinds == {"rms_norm", "add_norm", "rotary", "swiglu", "cross_entropy"}
