"""autopar.plan(..., precision=...) records the compute precision in the plan (the parallel module then
runs under that autocast: tests/test_memory.py checks the numerics on 2 ranks)."""
from __future__ import annotations

import pytest

import autopar
from autopar.models import build_model


@pytest.fixture(scope="module")
def gpt():
    return build_model("gpt-tiny", batch=4, seq=16, device="meta")


@pytest.mark.parametrize(("value", "dtype", "scaling"), [("bf16", "bfloat16", "none"), ("fp16", "float16", "dynamic"),
                                                         ({"compute_dtype": "float32"}, "float32", "none")])
def test_precision_option_lands_in_the_plan(gpt, value, dtype, scaling, tmp_path):
    p = autopar.plan(*gpt, mesh_shape=(2,), cluster="cpu-gloo", precision=value)
    assert p.precision == {"param_dtype": "float32", "compute_dtype": dtype, "loss_scaling": scaling}
    p.to_json(tmp_path / "p.json")
    assert autopar.Plan.from_json(tmp_path / "p.json").precision == p.precision


@pytest.mark.parametrize(("value", "match"), [("int8", "not one of"), ({"param_dtype": "bfloat16"}, "param_dtype"),
                                              (16, "string like 'bf16'")])
def test_bad_precision_option_is_a_config_error(gpt, value, match):
    with pytest.raises(autopar.ConfigError, match=match):
        autopar.plan(*gpt, mesh_shape=(2,), cluster="cpu-gloo", precision=value)
