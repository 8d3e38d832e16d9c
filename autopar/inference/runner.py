"""Runs one scheduled step of a causal LM on the paged KV cache.

The tokens of all scheduled sequences are packed into one ``[1, N]`` batch (positions per sequence), so decode
rows and prefill chunks of any lengths share one forward. The model attends over the paged cache without any
edit to its code, by one of three paths (``ModelRunner.path``):

* ``"graph"`` (the default, every model it can capture): the model's forward over a packed step is captured
  once by ``torch.export`` with the token count symbolic, and the codegen pass
  :func:`autopar.codegen.paged_attention_pass.swap_paged_attention` turns each of its SDPA nodes into the paged
  attention op (:mod:`autopar.inference.step_graph`). HF LLaMA / Mistral / Qwen2 / GPT-2-style models and
  autopar's built-in GPT and Llama run this way.
* ``"interface"`` (fallback for HF models the graph path cannot capture, and the path of tensor-parallel HF
  decoding, whose torch TP styles run as module hooks that a capture would not keep): autopar's paged
  attention registered under transformers' ``AttentionInterface`` (with a mask function that builds no mask,
  since the paged attention applies causality and lengths itself), switched on for each step only.
* ``"modules"`` (autopar's built-in models when sharded for tensor-parallel decoding): the model's forward
  run module by module on the paged attention (:mod:`autopar.inference.builtin`).
Other models are refused with a clear error.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from autopar.core.errors import AutoparError, CaptureError, ConfigError
from autopar.inference.builtin import builtin_dims, builtin_forward, is_builtin
from autopar.inference.kv_cache import KVCache
from autopar.inference.scheduler import Scheduled
from autopar.inference.step_graph import StepGraph
from autopar.runtime_kernels.paged_attention import paged_attention, write_kv

PAGED = "autopar_paged"
PATHS = ("auto", "graph", "interface", "modules")
log = logging.getLogger(__name__)


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


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step_graph(model: torch.nn.Module, num_splits: int) -> StepGraph:
    """The model's step graph, captured once per model object (engines on one model share it; the graph reads
    the model's parameter tensors, so in-place weight updates show; a parameter *replaced* by a new tensor does
    not: build a new model object, or call ``autopar.inference.runner.forget(model)``)."""
    graphs = _GRAPHS.setdefault(model, {})
    if num_splits not in graphs:
        graphs[num_splits] = StepGraph(model, num_splits=num_splits)
    return graphs[num_splits]


def forget(model: torch.nn.Module) -> None:
    """Drop the step graphs captured for ``model`` (the next engine captures it again)."""
    _GRAPHS.pop(model, None)


class ModelRunner:
    """``path``: "auto" (the captured graph, falling back to the attention interface for an HF model that cannot
    be captured, with a warning), or one of "graph", "interface" (HF only), "modules" (built-in only)."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, *, num_splits: int = 1, path: str = "auto",
                 graph: StepGraph | None = None) -> None:
        if path not in PATHS:
            raise ConfigError(f"runner path {path!r} is not one of {PATHS}")
        self.builtin = is_builtin(model)   # autopar.models
        if path in ("interface", "modules") and (path == "modules") != self.builtin:
            raise ConfigError(f"the {path!r} path runs {'autopar built-in' if path == 'modules' else 'HF'} models; "
                              f"{type(model).__name__} is {'built-in' if self.builtin else 'not built-in'}")
        self.model = model.eval()
        self.cache = cache
        self.num_splits = num_splits
        self.device = next(model.parameters()).device
        self.graph: StepGraph | None = graph      # given: captured (and sharded) by the caller; bound at each step
        if graph is None and path in ("auto", "graph"):
            try:
                self.graph = _step_graph(self.model, num_splits)
            except CaptureError as e:
                if path == "graph" or self.builtin:
                    raise
                log.warning("serving %s through transformers' attention interface: %s", type(model).__name__, e)
        self.path = "graph" if self.graph is not None else ("modules" if self.builtin else "interface")
        if self.path == "interface":
            register_paged_attention()

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
        dev = self.device
        bt = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=dev)
        ids_t, pos_t, keep_t = (torch.tensor(x, device=dev) for x in (ids, pos, keep))
        ctx = PagedContext(cache=self.cache, slot_mapping=torch.tensor(slots, device=dev), block_tables=bt,
                           seq_lens=torch.tensor(lens, device=dev), query_lens=torch.tensor(qlens, device=dev),
                           num_splits=self.num_splits)
        if self.graph is not None:
            if self.graph.bound is not self.cache:     # a graph shared by engines on one model: this one's cache
                self.graph.bind(self.cache.k, self.cache.v)
                self.graph.bound = self.cache
            return self.graph(ids_t, pos_t, keep_t, ctx.slot_mapping, bt, ctx.seq_lens, ctx.query_lens).float()
        if self.builtin:
            return builtin_forward(self.model, ids_t, pos_t, ctx, keep_t).float()
        # the model attends over the paged cache for this call only (it stays usable on its own; ~0.1 ms)
        before = self.model.config._attn_implementation
        self.model.set_attn_implementation(PAGED)
        try:
            out = self.model(input_ids=ids_t[None], position_ids=pos_t[None], use_cache=False, paged_ctx=ctx,
                             logits_to_keep=keep_t)
        finally:
            self.model.set_attn_implementation(before)
        return out.logits[0].float()
