"""HF weights in and out: a tiny random HF LLaMA (safetensors) loaded into a (2,2) plan, each rank reading only
its blocks; one training step; exported; reloaded in plain transformers with the same logits and loss."""
from __future__ import annotations

import pytest
import torch

import autopar
from autopar.train import load_train_config, train
from autopar.train.hf_io import export_hf, hf_weight_files

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def tiny_llama(directory, *, seed: int = 0, shard: bool = False):
    """A random 2-layer LLaMA saved with safetensors (sharded into several files with ``shard``)."""
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(str(directory), max_shard_size="200KB" if shard else "1GB")
    return model


def hf_round_trip(rank, world, model_dir: str, out_dir: str):
    from autopar.train import hf_io

    blocks = {}
    real = hf_io.load_hf_weights

    def spy(module, directory, **kw):      # what this rank read: the element count of every block
        names = real(module, directory, **kw)
        for n, p in module.named_parameters():
            local = p._local_tensor if hasattr(p, "_local_tensor") else p
            blocks[n] = (local.numel(), p.numel())
        return names

    hf_io.load_hf_weights = spy
    from autopar.train import loop as loop_mod
    loop_mod.load_hf_weights = spy
    try:
        cfg = load_train_config({"model": {"source": model_dir}, "data": {"seq_len": 16, "num_sequences": 32},
                                 "parallel": {"mesh": [2, 2]}, "training": {"steps": 1, "global_batch": 8},
                                 "optimizer": {"lr": 1e-2}, "logging": {"progress": False}})
        r = train(cfg, parallelize=autopar.parallelize, apply=autopar.apply)
    finally:
        hf_io.load_hf_weights = real
        loop_mod.load_hf_weights = real
    module = r.module
    export_hf(module, out_dir, transformers.AutoConfig.from_pretrained(model_dir))
    # the parallel module on a fixed batch (local mode: this dp rank's rows of it)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 256, (8, 16), generator=gen)
    dp_rank = module.mesh.get_local_rank(0)
    rows = ids[dp_rank * 4:(dp_rank + 1) * 4]
    with torch.no_grad():
        out = module(input_ids=rows, labels=rows)
    logits = out.logits
    return {"blocks": blocks, "loss": float(out.loss), "logits": logits, "dp_rank": dp_rank, "ids": ids,
            "sharded": {n: str(tuple(p.placements)) for n, p in module.named_parameters()
                        if any(not pl.is_replicate() for pl in p.placements)}}


@pytest.mark.slow
def test_hf_llama_in_a_2x2_plan_one_step_export_reload(tmp_path, dist4):
    src = tmp_path / "src"
    before = tiny_llama(src, shard=True)
    files = set(hf_weight_files(src).values())
    assert len(files) > 1, "the checkpoint is sharded into several safetensors files"
    out = tmp_path / "out"
    res = dist4.run(hf_round_trip, str(src), str(out), timeout=300)
    r0 = res[0]
    assert r0["sharded"], "the (2,2) plan shards some weights, so ranks read different blocks"
    for r in res:
        read = sum(a for a, _ in r["blocks"].values())
        total = sum(b for _, b in r["blocks"].values())
        assert read < total, f"a rank read {read} of {total} elements: only its blocks"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    reloaded.eval()
    # the exported weights are the trained ones (one AdamW step moved them), not the initial ones
    moved = [n for n, p in reloaded.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])]
    assert len(moved) == len(list(reloaded.parameters())), "every weight took a step"
    ids = r0["ids"]
    with torch.no_grad():
        ref = reloaded(input_ids=ids, labels=ids)
    for r in res:
        lo = r["dp_rank"] * 4
        local = r["logits"]
        want = ref.logits[lo:lo + 4] if local.shape[0] == 4 else ref.logits
        torch.testing.assert_close(local, want, rtol=1e-4, atol=1e-5)
        assert abs(r["loss"] - float(ref.loss)) <= 1e-5 + 1e-4 * abs(float(ref.loss)), (r["loss"], float(ref.loss))


def test_hf_model_with_weights_is_built_without_parameter_storage(tmp_path):
    # parameters on the meta device (no storage, no random init), buffers real (the rotary tables no checkpoint
    # holds); load_hf_weights allocates and fills every parameter, and refuses to leave one unread
    from autopar.core.errors import PlanMismatchError
    from autopar.train.hf_io import load_hf_weights
    from autopar.train.model import build_model

    ref = tiny_llama(tmp_path / "src")
    cfg = load_train_config({"model": {"source": str(tmp_path / "src")}, "data": {"seq_len": 16}})
    model, adapter = build_model(cfg)
    assert adapter.hf_dir is not None and all(p.is_meta for p in model.parameters())
    ref_buffers = dict(ref.named_buffers())
    for n, b in model.named_buffers():
        assert not b.is_meta and torch.equal(b, ref_buffers[n]), n
    read = load_hf_weights(model, tmp_path / "src")
    assert set(read) == {n for n, _ in ref.named_parameters()}
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert not p.is_meta and torch.equal(p, ref_params[n]), n
    again, _ = build_model(cfg)
    again.model.norm.weight2 = torch.nn.Parameter(torch.ones(4, device="meta"))   # a parameter no file holds
    with pytest.raises(PlanMismatchError, match="weight2"):
        load_hf_weights(again, tmp_path / "src", strict=False)
