"""A zoo of HuggingFace architectures built the ordinary way: from a small config of each model class
(no download), default settings otherwise (``use_cache`` as it comes, dropout as configured except where a
random mask would make two runs differ), 4 layers so folding engages. ``build(name, kind)`` returns the
model and its example inputs: ``kind="bare"`` the model returning its ModelOutput, ``kind="kwargs"`` a
wrapper whose ``forward(**kwargs)`` returns the loss."""
from __future__ import annotations

import torch

VOCAB, BATCH, SEQ, LAYERS = 128, 4, 16, 4


class LossOf(torch.nn.Module):
    """The wrapper users write around an HF model: keyword inputs in, the loss out."""

    def __init__(self, m: torch.nn.Module):
        super().__init__()
        self.m = m

    def forward(self, **kw):
        return self.m(**kw).loss


def _decoder(cls_name: str, cfg_name: str, **cfg):
    def make():
        import transformers as tf
        return getattr(tf, cls_name)(getattr(tf, cfg_name)(**cfg)), "causal"
    return make


def _lm(**extra):
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                num_attention_heads=4, max_position_embeddings=64, **extra)


NO_DROPOUT = dict(attention_dropout=0.0)

ZOO = {
    "gpt2": _decoder("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4,
                     n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": _decoder("LlamaForCausalLM", "LlamaConfig", **_lm(num_key_value_heads=2)),
    "mistral": _decoder("MistralForCausalLM", "MistralConfig", **_lm(num_key_value_heads=2)),
    "qwen2": _decoder("Qwen2ForCausalLM", "Qwen2Config", **_lm(num_key_value_heads=2)),
    "gemma": _decoder("GemmaForCausalLM", "GemmaConfig", **_lm(num_key_value_heads=2, head_dim=16)),
    "phi3": _decoder("Phi3ForCausalLM", "Phi3Config", **_lm(num_key_value_heads=2, pad_token_id=0,
                                                             resid_pdrop=0.0, embd_pdrop=0.0)),
    "opt": _decoder("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=64, ffn_dim=128,
                    num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64,
                    word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0),
    "gpt_neox": _decoder("GPTNeoXForCausalLM", "GPTNeoXConfig", **_lm(hidden_dropout=0.0)),
    "falcon": _decoder("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0),
    "mixtral": _decoder("MixtralForCausalLM", "MixtralConfig", **_lm(num_key_value_heads=2, num_local_experts=4,
                                                                     num_experts_per_tok=2)),
}


def _encoder(cls_name: str, cfg_name: str, task: str, **cfg):
    def make():
        import transformers as tf
        return getattr(tf, cls_name)(getattr(tf, cfg_name)(**cfg)), task
    return make


ZOO.update({
    "bert": _encoder("BertForMaskedLM", "BertConfig", "masked", vocab_size=VOCAB, hidden_size=64,
                     num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta": _encoder("RobertaForMaskedLM", "RobertaConfig", "masked", vocab_size=VOCAB, hidden_size=64,
                        num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=1, type_vocab_size=1),
    "t5": _encoder("T5ForConditionalGeneration", "T5Config", "seq2seq", vocab_size=VOCAB, d_model=64, d_ff=128,
                   d_kv=16, num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=4, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0),
    "bart": _encoder("BartForConditionalGeneration", "BartConfig", "seq2seq", vocab_size=VOCAB, d_model=64,
                     encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                     max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     decoder_start_token_id=2, pad_token_id=1),
    "vit": _encoder("ViTForImageClassification", "ViTConfig", "image", hidden_size=64, num_hidden_layers=LAYERS,
                    num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8, num_labels=10,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "resnet": _encoder("ResNetForImageClassification", "ResNetConfig", "image", embedding_size=16,
                       hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_labels=10),
})


def inputs_for(task: str, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    labels = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    if task == "causal":
        return {"input_ids": ids, "labels": labels}
    if task == "masked":
        return {"input_ids": ids, "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
                "token_type_ids": torch.zeros(BATCH, SEQ, dtype=torch.long), "labels": labels}
    if task == "seq2seq":
        return {"input_ids": ids, "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long), "labels": labels}
    if task == "image":
        return {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=gen),
                "labels": torch.randint(0, 10, (BATCH,), generator=gen)}
    raise ValueError(task)


def build(name: str, kind: str = "bare", seed: int = 0):
    """(model in train mode, example inputs) for a zoo entry; ``kind``: "bare" or "kwargs" (loss wrapper)."""
    torch.manual_seed(seed)
    model, task = ZOO[name]()
    model.train()
    if kind == "kwargs":
        model = LossOf(model)
    return model, inputs_for(task)
