"""A CI slice of the HF zoo (tests/zoo/models.py; the whole zoo is benchmarks/zoo.py): architectures whose
failure classes the rest of the suite does not cover -- an encoder-decoder returning an EncoderDecoderCache
(T5), a mixture of experts (Mixtral: top-k routing, one_hot, index_add), an encoder with token types and an
attention mask (BERT), a vision transformer -- planned with the batch split over a (2,) mesh and checked
against one device: loss, every gradient, one AdamW step under an LR scheduler."""
from __future__ import annotations

import pytest

import autopar
from zoo.check import check_zoo_step
from zoo.models import build

pytestmark = pytest.mark.slow   # HF models on gloo ranks

pytest.importorskip("transformers")

DP = {"input:*": ["S(0)"], "param:*": ["R"]}     # pinned: a small ILP, the runtime and capture under test


@pytest.mark.parametrize(("name", "kind"), [("t5", "bare"), ("mixtral", "kwargs"), ("bert", "bare"),
                                            ("vit", "kwargs")])
def test_zoo_model_matches_one_device(dist2, name, kind):
    model, inputs = build(name, kind)
    plan = autopar.plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo", fix=DP)
    assert set(plan.param_placements) == {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for r in dist2.run(check_zoo_step, name, kind, (2,), plan.to_json()):
        assert not r["missing_grads"] and not r["bad"], r
        assert r["checked"] > len(list(model.parameters())) + 1   # loss, gradients, every parameter after the step
