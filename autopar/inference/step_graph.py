"""The engine's model path: the model's forward over one packed step, captured once and rewritten by the codegen
pass :func:`autopar.codegen.paged_attention_pass.swap_paged_attention` so its attention runs on the paged KV cache.

A step packs the new tokens of every scheduled sequence (decode rows and prefill chunks alike) into one
``[1, N]`` batch; N changes every step, so the capture is ``torch.export`` with N (and the number of sequences B)
symbolic (``torch.export.Dim``): one graph serves every step of two or more tokens (and one more,
captured with N = 1, the step of a single decoding sequence). HF causal LMs are captured through their public
forward (``input_ids``, ``position_ids``, ``use_cache=False``, ``logits_to_keep`` = each sequence's last row) with
``attn_implementation='sdpa'`` for the capture only; autopar's built-in GPT and Llama through ``forward(idx)``, their
positions and LM-head rows supplied by the pass (``index_positions``, ``keep_rows``). The user's model object is not
edited (its attention implementation is restored after the capture).

The captured graph reads the model's parameters (the same tensors), so it is built once per engine; a model that
cannot be captured with a symbolic N raises :class:`~autopar.core.errors.CaptureError` naming the export error.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx
from torch.export import Dim

from autopar.codegen.paged_attention_pass import bind_cache, swap_paged_attention
from autopar.codegen.shard_step import shard_step_graph
from autopar.core.errors import CaptureError, ConfigError
from autopar.models.gpt import GPT
from autopar.models.llama import Llama

__all__ = ["StepGraph"]


class _HFStep(torch.nn.Module):
    """HF causal LM forward over a packed step, logits of the ``keep`` rows only."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, keep):
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                          logits_to_keep=keep).logits


@contextlib.contextmanager
def _sdpa(model):
    before = model.config._attn_implementation
    if before != "sdpa":
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if before != "sdpa":
            model.set_attn_implementation(before)


class StepGraph:
    """``step(ids [N], positions [N], keep [B], slot_mapping [N], block_tables [B, W], seq_lens [B],
    query_lens [B])`` -> logits ``[B, vocab]`` of the rows ``keep``, attention over the bound cache.

    Two graphs: ``multi`` for N >= 2 (N and B symbolic) and ``single`` for N = 1 (one sequence decoding alone):
    export specialises sizes 0 and 1, and HF models branch on a one-token query in their mask code, so a graph
    captured for N >= 2 is guarded against N = 1 (and the reverse); each is exact for its sizes."""

    def __init__(self, model: torch.nn.Module, *, num_splits: int = 1, layouts=None, mesh=None,
                 prefill_layouts=None) -> None:
        """``layouts`` (:class:`~autopar.inference.tensor_parallel.DecodeLayouts` of the plan) and ``mesh`` (a 1-D
        DeviceMesh): the graphs are sharded for tensor-parallel decoding by the codegen pass
        :func:`~autopar.codegen.shard_step.shard_step_graph` (this rank's weight slices, the plan's collectives);
        the model itself stays whole. ``prefill_layouts`` (of a second plan, made for a prefill-sized step): steps
        that carry prompt tokens run a graph sharded by it, decode-only steps (one token per sequence) one sharded
        by ``layouts``; both must hold the same kv heads per rank (they share the KV cache)."""
        self.builtin = isinstance(model, (GPT, Llama))
        self.bound = None                      # the KVCache whose tensors the graphs read (set by the runner)
        if prefill_layouts is not None:
            if layouts is None:
                raise ConfigError("a prefill plan needs the decode plan too (plan=..., prefill_plan=...)")
            if prefill_layouts.kv_heads != layouts.kv_heads:
                raise ConfigError(f"the prefill plan holds {prefill_layouts.kv_heads} kv heads per rank and the decode "
                                  f"plan {layouts.kv_heads}: both steps share one KV cache, so both plans must split "
                                  "the attention heads alike (pin q/k/v with fix=, or plan prefill with the same "
                                  "kv_cache_bytes and budget)")
        self.multi = _capture(model, self.builtin, num_splits, single=False)
        self.single = _capture(model, self.builtin, num_splits, single=True)
        self.decode: fx.GraphModule | None = None     # decode-only steps, when prefill has its own plan
        if prefill_layouts is not None:
            self.decode = _capture(model, self.builtin, num_splits, single=False)
        if layouts is not None:
            rank, world = mesh.get_local_rank(), mesh.size()
            prefix = "" if self.builtin else "model."
            for gm, lay in ((self.multi, prefill_layouts or layouts), (self.single, layouts), (self.decode, layouts)):
                if gm is None:
                    continue
                gm.mesh = mesh
                shard_step_graph(gm, lay.layouts, rank=rank, world=world, prefix=prefix, local_heads=lay.local_heads)

    def bind(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        for gm in (self.multi, self.single, self.decode):
            if gm is not None:
                bind_cache(gm, k, v)

    def __call__(self, ids, positions, keep, slot_mapping, block_tables, seq_lens, query_lens) -> torch.Tensor:
        meta = (slot_mapping, block_tables, seq_lens, query_lens)
        if ids.numel() == 1:
            gm = self.single
        elif self.decode is not None and ids.numel() == keep.numel():    # one token per sequence: decode only
            gm = self.decode
        else:
            gm = self.multi
        out = gm(ids.unsqueeze(0), positions if self.builtin else positions.unsqueeze(0), keep, *meta)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out[0]


def _capture(model: torch.nn.Module, builtin: bool, num_splits: int, *, single: bool) -> fx.GraphModule:
    dev = next(model.parameters()).device
    n_ex = 1 if single else 5                  # example step: 1 token, or 5 packed tokens of 2 sequences
    ids = torch.zeros(1, n_ex, dtype=torch.long, device=dev)
    keep = torch.tensor([0] if single else [1, n_ex - 1], device=dev)
    # a built-in model slices its position tables to N (guarded N <= their length: the pass replaces the slices)
    top = model.cfg.max_seq_len if builtin else 1 << 20
    n, b = Dim("tokens", min=2, max=top), Dim("seqs", min=2, max=1 << 16)
    try:
        if builtin:
            ep = torch.export.export(model, (ids,), dynamic_shapes=None if single else ({1: n},), strict=False)
        else:
            pos = torch.arange(n_ex, device=dev).unsqueeze(0)
            with _sdpa(model):
                ep = torch.export.export(_HFStep(model), (ids, pos, keep), strict=False,
                                         dynamic_shapes=None if single else ({1: n}, {1: n}, {0: b}))
    except Exception as e:  # any export failure is reported as a capture error with its cause
        raise CaptureError(f"could not capture {type(model).__name__}'s forward over a packed step with a symbolic "
                           f"token count (torch.export): {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    return swap_paged_attention(ep.module(), index_positions=builtin, keep_rows=builtin, num_splits=num_splits)
