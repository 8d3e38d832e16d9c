"""Built-in model specs: every one builds on meta at its published size; module:callable specs; errors."""
import sys
import textwrap

import pytest
import torch

from autopar.core.errors import AutoparError, ConfigError
from autopar.models import BUILTIN_MODELS, build_model, builtin_names, load_example_module

# Published parameter counts (GPT-2 with its tied LM head; Llama 3.2 1B ties too, Llama 3 8B/70B do not).
PUBLISHED = {"gpt2-small": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.558e9,
             "llama3-1b": 1.24e9, "llama3-8b": 8.03e9, "llama3-70b": 70.6e9}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters once


@pytest.mark.parametrize("name", builtin_names())
def test_builds_on_meta(name):
    model, x = build_model(name, batch=2, seq=32)
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    assert set(x) == {"idx", "labels"}
    for t in x.values():
        assert t.is_meta and t.shape == (2, 32) and t.dtype == torch.long
    if name in PUBLISHED:
        assert _count(model) == pytest.approx(PUBLISHED[name], rel=0.03)


def test_shapes_of_the_big_ones():
    llama, _ = build_model("llama3-70b", batch=1, seq=8)
    assert len(llama.blocks) == 80 and llama.blocks[0].attn.k_proj.weight.shape == (1024, 8192)
    assert llama.blocks[0].mlp.up_proj.weight.shape == (28672, 8192) and llama.cfg.rope_theta == 500000.0
    gpt, _ = build_model("gpt2-xl", batch=1, seq=8)
    assert len(gpt.blocks) == 48 and gpt.wte.weight.shape == (50257, 1600) and gpt.lm_head.weight is gpt.wte.weight
    one, _ = build_model("llama3-1b", batch=1, seq=8)
    assert one.lm_head.weight is one.embed.weight


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_tiny_on_cpu_runs_and_is_deterministic(name):
    model, x = build_model(name, batch=2, seq=16, device="cpu")
    _, y = build_model(name, batch=2, seq=16, device="cpu")
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert x["idx"].device.type == "cpu" and int(x["idx"].max()) < BUILTIN_MODELS[name].vocab_size
    loss = model(**x)
    assert loss.shape == () and torch.isfinite(loss)


def test_seq_longer_than_model_and_bad_sizes():
    with pytest.raises(ConfigError, match="at most 64 tokens"):
        build_model("gpt-tiny", batch=1, seq=65)
    with pytest.raises(ConfigError, match="positive integers"):
        build_model("gpt-tiny", batch=0, seq=8)


def test_unknown_spec_lists_builtins():
    with pytest.raises(ConfigError) as ei:
        build_model("gpt5", batch=1, seq=8)
    msg = str(ei.value)
    assert isinstance(ei.value, AutoparError) and "unknown model 'gpt5'" in msg
    for name in builtin_names():
        assert name in msg
    assert "module:callable" in msg


def test_example_modules_load_once():
    gpt = load_example_module("gpt")
    assert gpt is load_example_module("gpt") and hasattr(gpt, "GPTConfig")
    assert hasattr(load_example_module("llama"), "Llama")
    with pytest.raises(ConfigError, match="no built-in model family"):
        load_example_module("nope")


_FACTORIES = '''
import torch
from torch import nn


def build(batch, seq):
    return nn.Linear(seq, 3), (torch.zeros(batch, seq),)


def three_things(batch, seq, device):
    return nn.Linear(seq, 3), {"input": torch.zeros(batch, seq)}, device


def build_dev(batch, seq, device):
    return nn.Linear(seq, 3, device=device), {"input": torch.zeros(batch, seq, device=device)}


def build_fixed():
    return nn.Linear(4, 2), torch.zeros(1, 4)


def needs_more(batch, seq, width):
    return nn.Linear(width, 1), ()


def not_a_pair():
    return nn.Linear(4, 2)


class Factories:
    @staticmethod
    def make(**kw):
        return nn.Linear(kw["seq"], 2), (torch.zeros(kw["batch"], kw["seq"]),)


value = 3
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_factories.py").write_text(textwrap.dedent(_FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_factories"
    sys.modules.pop("my_factories", None)


def test_module_callable_spec(factories):
    model, x = build_model(f"{factories}:build", batch=3, seq=5)
    assert model.weight.is_meta and model.weight.shape == (3, 5)  # built under the meta device
    assert isinstance(x, tuple) and x[0].shape == (3, 5)
    model, x = build_model(f"{factories}:build", batch=3, seq=5, device="cpu")
    assert not model.weight.is_meta and torch.equal(x[0], torch.zeros(3, 5))
    model, x = build_model(f"{factories}:build_dev", batch=2, seq=4, device="cpu")
    assert x["input"].device.type == "cpu"
    model, x = build_model(f"{factories}:build_fixed", batch=9, seq=9)
    assert model.weight.shape == (2, 4) and x.shape == (1, 4)
    model, x = build_model(f"{factories}:Factories.make", batch=2, seq=6)
    assert model.weight.shape == (2, 6) and x[0].shape == (2, 6)


@pytest.mark.parametrize("spec,match", [
    ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    ("{m}:nope", "has no attribute 'nope'"),
    ("{m}:value", "not a callable"),
    ("{m}:needs_more", r"needs arguments \['width'\]"),
    ("{m}:not_a_pair", r"must return \(nn.Module, example_inputs\)"),
    ("{m}:three_things", r"must return \(nn.Module, example_inputs\)"),
    ("{m}:", "must be a built-in name or 'module:callable'"),
])
def test_module_callable_errors(factories, spec, match):
    with pytest.raises(ConfigError, match=match):
        build_model(spec.format(m=factories), batch=1, seq=4)
