"""Runs one scheduled step of a HF causal LM on the paged KV cache.

How the model attends over the paged cache, with no edit to the model's code: the runner registers
autopar's paged attention under transformers' ``AttentionInterface`` (and a mask function that builds no
mask, since the paged attention applies causality and lengths itself) and switches the model's attention
implementation to it for the duration of each step (then back). Every HF model whose attention goes through that interface (LLaMA, Mistral, Qwen2,
GPT-2, ...) then writes its new K/V into the cache and attends over its blocks, with RoPE and everything
else of the model untouched. The tokens of all scheduled sequences are packed into one ``[1, N]`` batch
(positions per sequence), so decode rows and prefill chunks of any lengths share one forward.

Why this and not swapping ``aten.scaled_dot_product_attention`` on a ``torch.export`` graph: the exported
graph is specialised to one token count per step (a continuous batch changes it every step) and HF's
exported attention carries its mask construction and DynamicCache handling, which a pass would have to
undo; the attention interface is the model family's own, stable hook at exactly the point where q, k, v
are ready. autopar's built-in models, which have no such interface, run module by module on the same
paged attention (autopar.inference.builtin); other models are refused with a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from autopar.core.errors import AutoparError, ConfigError
from autopar.inference.builtin import builtin_dims, builtin_forward, is_builtin
from autopar.inference.kv_cache import KVCache
from autopar.inference.scheduler import Scheduled
from autopar.runtime_kernels.paged_attention import paged_attention, write_kv

PAGED = "autopar_paged"


@dataclass
class PagedContext:
    """What the paged attention of every layer needs for one step (built once per step)."""
    cache: KVCache
    slot_mapping: torch.Tensor      # [N] cache slot of each new token
    block_tables: torch.Tensor      # [B, max_blocks] int32
    seq_lens: torch.Tensor          # [B] tokens in the cache after this step
    query_lens: torch.Tensor        # [B] new tokens per sequence
    num_splits: int = 1


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            paged_ctx: PagedContext | None = None, **kwargs):
    """transformers attention function: q [1, H, N, D], k/v [1, Hkv, N, D] -> ([1, N, H, D], None)."""
    if paged_ctx is None:
        raise AutoparError(f"the model's attention implementation is {PAGED!r}, which needs the paged KV "
                           "cache of an autopar.inference engine: run it through the engine, or call "
                           "model.set_attn_implementation('sdpa') to use it on its own")
    ctx, layer = paged_ctx, module.layer_idx
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))     # [N, heads, D]
    write_kv(ctx.cache.k[layer], ctx.cache.v[layer], k, v, ctx.slot_mapping)
    out = paged_attention(q, ctx.cache.k[layer], ctx.cache.v[layer], ctx.block_tables, ctx.seq_lens,
                          ctx.query_lens, scaling, ctx.num_splits)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    return None


def register_paged_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(PAGED, paged_attention_forward)
    AttentionMaskInterface.register(PAGED, _no_mask)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int


def model_shape(model: torch.nn.Module) -> ModelShape:
    dims = builtin_dims(model)
    if dims is not None:
        return ModelShape(**dims)
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "set_attn_implementation"):
        raise ConfigError(f"autopar.inference serves HF causal LMs (transformers PreTrainedModel) and autopar's "
                          f"built-in GPT and Llama; got {type(model).__name__}. Load or build it with transformers "
                          f"(e.g. LlamaForCausalLM).")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    max_len = getattr(cfg, "max_position_embeddings", None) or 1 << 30
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True):
        max_len = min(max_len, window)      # the paged attention is full-causal: stay inside the window
    return ModelShape(num_layers=cfg.num_hidden_layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      vocab_size=cfg.vocab_size, max_model_len=max_len)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: KVCache, *, num_splits: int = 1) -> None:
        self.builtin = is_builtin(model)   # autopar.models: run module by module (inference.builtin)
        if not self.builtin:
            register_paged_attention()
        self.model = model.eval()
        self.cache = cache
        self.num_splits = num_splits
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def execute(self, items: list[Scheduled], tables: dict[int, list[int]], block_size: int) -> torch.Tensor:
        """Run the step; returns fp32 logits ``[len(items), vocab]`` of each item's last token (rows of
        items whose prompt is not finished are computed but meaningless)."""
        ids, pos, slots, keep = [], [], [], []
        lens, qlens, rows = [], [], []
        for it in items:
            s, e = it.start, it.start + it.num_tokens
            table = tables[it.seq.seq_id]
            ids += it.seq.tokens[s:e]
            pos += range(s, e)
            slots += [table[p // block_size] * block_size + p % block_size for p in range(s, e)]
            keep.append(len(ids) - 1)
            lens.append(e)
            qlens.append(it.num_tokens)
            rows.append(table)
        width = max(len(r) for r in rows)
        bt = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=self.device)
        dev = self.device
        ctx = PagedContext(cache=self.cache, slot_mapping=torch.tensor(slots, device=dev), block_tables=bt,
                           seq_lens=torch.tensor(lens, device=dev), query_lens=torch.tensor(qlens, device=dev),
                           num_splits=self.num_splits)
        if self.builtin:
            return builtin_forward(self.model, torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), ctx,
                                   torch.tensor(keep, device=dev)).float()
        # the model attends over the paged cache for this call only (it stays usable on its own; ~0.1 ms)
        before = self.model.config._attn_implementation
        self.model.set_attn_implementation(PAGED)
        try:
            out = self.model(input_ids=torch.tensor([ids], device=dev), position_ids=torch.tensor([pos], device=dev),
                             use_cache=False, paged_ctx=ctx, logits_to_keep=torch.tensor(keep, device=dev))
        finally:
            self.model.set_attn_implementation(before)
        return out.logits[0].float()
