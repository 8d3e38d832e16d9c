"""Pinned placements: fix (hard) and prefer (soft) patterns, and typos that match nothing."""
import pytest

import autopar
from autopar.models import build_model


def _tiny():
    return build_model("gpt-tiny", batch=4, seq=16, device="meta")


def test_fix_pins_and_prefer_guides():
    model, inputs = _tiny()
    p = autopar.plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo",
                     fix={"input:*": ["S(0)"], "param:*qkv.weight": ["S(0)"], "param:*": ["R"]},
                     prefer={"*": ["S(0)"]})
    assert p.param_placements["blocks.0.attn.qkv.weight"] == ("S(0)",)
    assert p.param_placements["ln_f.weight"] == ("R",)
    assert p.node_shardings["input:idx"].outputs[0] == ("S(0)",)
    assert p.node_shardings["blocks.*/mlp/gelu#0"].outputs[0] == ("S(0)",)  # preferred where possible
    assert p.node_shardings["root/cross_entropy_loss#0"].outputs[0] == ("P(sum)",)  # cannot be S(0): free


def test_split_over_a_mesh_dim_of_one_device_is_replicated():
    """A data-parallel fix written for many devices also plans on one (and on a size-1 dim of a 2-D mesh)."""
    model, inputs = _tiny()
    dp = {"input:*": ["S(0)"], "param:*": ["R"]}
    p = autopar.plan(model, inputs, mesh_shape=(1,), cluster="cpu-gloo", fix=dp, prefer={"*": ["S(0)"]})
    assert p.node_shardings["input:idx"].outputs[0] == ("R",)
    assert set(p.param_placements.values()) == {("R",)}
    p = autopar.plan(model, inputs, mesh_shape=(2, 1), cluster="cpu-gloo",
                     fix={"input:*": ["S(0)", "S(0)"], "param:*": ["R", "R"]})
    assert p.node_shardings["input:idx"].outputs[0] == ("S(0)", "R")


@pytest.mark.parametrize("option", ["fix", "prefer"])
def test_pattern_matching_nothing_is_an_error(option):
    model, inputs = _tiny()
    with pytest.raises(autopar.ConfigError, match=r"param:\*nonexistent\*.*match no input, parameter or graph key"):
        autopar.plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo", **{option: {"param:*nonexistent*": ["R"]}})
