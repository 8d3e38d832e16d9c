"""Capture: torch.export of the example and HuggingFace models, folding, tied weights, and errors."""
import importlib.util
import textwrap

import pytest
import torch
from torch import nn

from autopar.core.capture import capture
from autopar.core.errors import AutoparError, CaptureError
from autopar.models import build_model


def _all_fqns(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters(remove_duplicate=False)}


def _captured_fqns(cap) -> set[str]:
    return {f for fqns in cap.param_fqns.values() for f in fqns}


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_example_models_tuple_and_dict_inputs(name):
    model, x = build_model(name, batch=2, seq=16, device="cpu")
    by_dict = capture(model, x)
    by_tuple = capture(model, (x["idx"], x["labels"]))
    for cap in (by_dict, by_tuple):
        assert [(i.name, i.shape, i.dtype) for i in cap.user_inputs] == [("idx", (2, 16), "int64"),
                                                                          ("labels", (2, 16), "int64")]
        assert _captured_fqns(cap) == _all_fqns(model)
        assert not cap.on_meta and cap.folded_layers == {}
        for n in cap.graph.nodes:  # every op carries its shape and dtype
            if n.op == "call_function":
                assert "val" in n.meta, n
    assert by_dict.args == () and set(by_dict.kwargs) == {"idx", "labels"}
    assert len(by_tuple.args) == 2 and by_tuple.kwargs == {}
    assert by_dict.fingerprint() == by_tuple.fingerprint()
    assert capture(model, build_model(name, batch=4, seq=16, device="cpu")[1]).fingerprint() != by_dict.fingerprint()
    # the exported program computes what the model computes
    torch.testing.assert_close(by_dict.program.module()(**x), model(**x))


def test_single_tensor_input_and_param_shapes():
    model, x = build_model("gpt-tiny", batch=2, seq=8, device="cpu")
    cap = capture(model, x["idx"])
    assert [i.name for i in cap.user_inputs] == ["idx"]
    assert cap.param_shapes["blocks.0.attn.qkv.weight"] == (192, 64)
    assert cap.buffer_fqns == {}


def test_meta_llama3_1b_folded():
    model, x = build_model("llama3-1b", batch=2, seq=128)
    cap = capture(model, x, fold_layers=True)
    assert cap.on_meta and cap.folded_layers == {"blocks": 16}
    assert len(model.blocks) == 16  # the model is restored after folding
    layers = {f.split(".")[1] for f in _captured_fqns(cap) if f.startswith("blocks.")}
    assert layers == {"0", "1"}
    assert cap.param_shapes["blocks.1.mlp.gate_proj.weight"] == (8192, 2048)
    for n in cap.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert val.device.type == "meta"
    assert capture(model, x, fold_layers=False).folded_layers == {}


def test_gpt_tied_weights_one_placeholder():
    model, x = build_model("gpt-tiny", batch=2, seq=8, device="meta")
    cap = capture(model, x)
    tied = {k: v for k, v in cap.param_fqns.items() if len(v) > 1}
    assert list(tied.values()) == [("wte.weight", "lm_head.weight")]


def test_gpt_tied_weights_fqns_grouped():
    model, x = build_model("gpt-tiny", batch=2, seq=8, device="meta")
    cap = capture(model, x)
    groups = {v for v in cap.param_fqns.values() if len(v) > 1}
    assert groups == {("wte.weight", "lm_head.weight")}
    used = [k for k, v in cap.param_fqns.items() if len(v) > 1
            and any(n.name == k and n.users for n in cap.graph.nodes)]
    assert len(used) == 1  # the graph reads the tied tensor through one placeholder


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def test_hf_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = _ids(128)
    cap = capture(model, {"input_ids": ids, "labels": ids, "use_cache": False})
    assert [(i.name, i.shape) for i in cap.user_inputs] == [("input_ids", (2, 16)), ("labels", (2, 16))]
    assert _captured_fqns(cap) == _all_fqns(model)
    assert {v for v in cap.param_fqns.values() if len(v) > 1} == {("transformer.wte.weight", "lm_head.weight")}
    out = cap.program.module()(input_ids=ids, labels=ids, use_cache=False)
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids, use_cache=False).loss)


def test_hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = _ids(128)
    cap = capture(model, {"input_ids": ids, "labels": ids, "use_cache": False})
    assert [(i.name, i.shape) for i in cap.user_inputs] == [("input_ids", (2, 16)), ("labels", (2, 16))]
    assert _captured_fqns(cap) == _all_fqns(model)
    assert "model.layers.1.mlp.gate_proj.weight" in _captured_fqns(cap)


_DATA_DEPENDENT = '''
import torch
from torch import nn


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:
            return y * 2
        return y
'''


def _load(path):
    spec = importlib.util.spec_from_file_location(f"dd_{abs(hash(str(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data_dependent_error(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(_DATA_DEPENDENT))
    line = 1 + textwrap.dedent(_DATA_DEPENDENT).splitlines().index("        if y.sum() > 0:")
    with pytest.raises(CaptureError) as ei:
        capture(_load(path).DataDependent(), (torch.randn(2, 4),))
    return str(ei.value), line


def test_data_dependent_control_flow_names_source_line(tmp_path):
    msg, line = _data_dependent_error(tmp_path / "ddmodel.py")
    assert f"{tmp_path / 'ddmodel.py'}:{line}" in msg
    assert "if y.sum() > 0" in msg


def test_data_dependent_line_named_under_a_folder_called_autopar(tmp_path):
    msg, line = _data_dependent_error(tmp_path / "autopar" / "ddmodel.py")
    assert f"{tmp_path / 'autopar' / 'ddmodel.py'}:{line}" in msg


@pytest.mark.parametrize("bad", [3, "idx", None, {1, 2}])
def test_bad_example_inputs(bad):
    model, _ = build_model("gpt-tiny", batch=2, seq=8)
    with pytest.raises(CaptureError, match="example_inputs must be a tuple") as ei:
        capture(model, bad)
    assert isinstance(ei.value, AutoparError)


def test_not_a_module():
    with pytest.raises(CaptureError, match="needs an nn.Module"):
        capture(lambda x: x, (torch.ones(2),))
