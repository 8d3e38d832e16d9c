"""autopar's built-in models (``autopar.models``: GPT, Llama) on the paged KV cache, module by module.

The engine's path for every model is the captured graph rewritten by the paged-attention pass
(``step_graph``); this module path serves the built-in Llama when it is sharded for tensor-parallel decoding
(torch TP styles run as module hooks, which a capture would not keep), and answers ``builtin_dims``.
The built-in models rotate or embed positions by the token's index in its (unpacked) sequence. Their
forward is therefore run here, module by module with the model's own submodules and weights (embedding,
norms, projections, rotary tables, MLPs, LM head), on the step's packed tokens ``[N]`` with each token's
position in its sequence; attention is the paged one (``runtime_kernels.paged_attention``), which applies
causality per sequence. Nothing of the model changes. A model of another class is not built-in (None).
"""
from __future__ import annotations

import torch

from autopar.models.gpt import GPT
from autopar.models.llama import Llama, rotate_half
from autopar.runtime_kernels.paged_attention import paged_attention, write_kv

__all__ = ["builtin_dims", "builtin_forward", "is_builtin"]


def is_builtin(model: torch.nn.Module) -> bool:
    return isinstance(model, (GPT, Llama))


def builtin_dims(model: torch.nn.Module) -> dict | None:
    """(layers, heads, kv heads, head dim, vocab, longest sequence) of a built-in model, or None."""
    if not is_builtin(model):
        return None
    c = model.cfg
    kv_heads = c.n_kv_head if isinstance(model, Llama) else c.n_head
    return {"num_layers": c.n_layer, "heads": c.n_head, "kv_heads": kv_heads, "head_dim": c.d_model // c.n_head,
            "vocab_size": c.vocab_size, "max_model_len": c.max_seq_len}


def _attend(ctx, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q ``[N, H, D]``, k/v ``[N, Hkv, D]`` -> ``[N, H * D]``: the new K/V into the cache, then paged attention."""
    write_kv(ctx.cache.k[layer], ctx.cache.v[layer], k, v, ctx.slot_mapping)
    out = paged_attention(q, ctx.cache.k[layer], ctx.cache.v[layer], ctx.block_tables, ctx.seq_lens,
                          ctx.query_lens, None, ctx.num_splits)
    return out.reshape(out.shape[0], -1)


def _llama(model: Llama, ids: torch.Tensor, pos: torch.Tensor, ctx) -> torch.Tensor:
    x = model.embed(ids)
    for i, block in enumerate(model.blocks):
        a = block.attn
        h = block.attn_norm(x)
        n = h.shape[0]
        q = a.q_proj(h).view(n, -1, a.head_dim)     # -1: the heads this rank holds
        k = a.k_proj(h).view(n, -1, a.head_dim)
        v = a.v_proj(h).view(n, -1, a.head_dim)
        cos, sin = a.rope.cos[pos].unsqueeze(1), a.rope.sin[pos].unsqueeze(1)   # [N, 1, D]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        x = x + a.o_proj(_attend(ctx, i, q, k, v))
        x = x + block.mlp(block.mlp_norm(x))
    return model.norm(x)


def _gpt(model: GPT, ids: torch.Tensor, pos: torch.Tensor, ctx) -> torch.Tensor:
    x = model.wte(ids) + model.wpe(pos)
    for i, block in enumerate(model.blocks):
        a = block.attn
        h = block.ln_1(x)
        n, c = h.shape
        q, k, v = (t.reshape(n, a.n_head, c // a.n_head) for t in a.qkv(h).split(c, dim=1))
        x = x + a.proj(_attend(ctx, i, q, k, v))
        x = x + block.mlp(block.ln_2(x))
    return model.ln_f(x)


def builtin_forward(model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, ctx, keep: torch.Tensor
                    ) -> torch.Tensor:
    """Logits ``[len(keep), vocab]`` of the packed tokens ``ids`` ``[N]`` at positions ``pos`` ``[N]``
    (each token's index in its sequence), rows ``keep`` (each sequence's last token of the step)."""
    hidden = _llama(model, ids, pos, ctx) if isinstance(model, Llama) else _gpt(model, ids, pos, ctx)
    return model.lm_head(hidden[keep])
