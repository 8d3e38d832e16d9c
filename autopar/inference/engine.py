"""The engine: loops scheduler -> model runner -> sampler, one iteration per step, and keeps the requests.

It owns no policy of its own: the block manager owns the cache, the scheduler decides who runs, the runner
executes, the sampler picks tokens. Single-threaded; :mod:`autopar.inference.server` drives it from one
thread.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from autopar.core.errors import ConfigError
from autopar.inference.errors import RequestError, SamplingParamsError
from autopar.inference.kv_cache import BlockManager, CacheUsage, KVCache, blocks_from_budget, bytes_per_block
from autopar.inference.runner import ModelRunner, model_shape
from autopar.inference.sampling import SamplingParams, sample_token
from autopar.inference.scheduler import Scheduler, Sequence, Status

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Cache and batching limits.

    block_size: tokens per KV block. The cache is sized by the first given of num_blocks, kv_cache_bytes
    (bytes for K and V of every layer) and kv_cache_fraction (of free device memory); by default 256 MiB.
    max_num_seqs: most sequences in one step (the batch). max_tokens_per_step: most tokens computed in one
    step (decode rows plus prefill chunks). prefill_chunk: most prompt tokens of one sequence per step.
    prefix_sharing: share cached blocks of identical prompt prefixes. num_splits: split-KV programs per
    sequence in the GPU decode kernel. runner_path: how the model attends over the cache
    (:class:`~autopar.inference.runner.ModelRunner`): "auto" (the captured graph rewritten by the paged-attention
    pass; HF models it cannot capture fall back to transformers' attention interface), "graph", "interface",
    "modules".
    """
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float | None = None
    max_num_seqs: int = 32
    max_tokens_per_step: int = 1024
    prefill_chunk: int = 512
    prefix_sharing: bool = True
    num_splits: int = 1
    runner_path: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_tokens_per_step", "prefill_chunk", "num_splits"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"EngineConfig.{name}={v!r} must be an integer >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"EngineConfig.num_blocks={self.num_blocks} must be >= 1")


@dataclass
class KVStats:
    """KV slot use over the steps run so far (a running summary: a server runs unboundedly many steps)."""
    steps: int = 0
    used_slots: int = 0            # summed over steps
    allocated_slots: int = 0       # summed over steps
    waste_sum: float = 0.0
    waste_max: float = 0.0
    peak_allocated_slots: int = 0

    def add(self, u: CacheUsage) -> None:
        self.steps += 1
        self.used_slots += u.used_slots
        self.allocated_slots += u.allocated_slots
        self.waste_sum += u.waste
        self.waste_max = max(self.waste_max, u.waste)
        self.peak_allocated_slots = max(self.peak_allocated_slots, u.allocated_slots)

    @property
    def waste_mean(self) -> float:
        return self.waste_sum / self.steps if self.steps else 0.0

    @property
    def waste_aggregate(self) -> float:
        return 1.0 - self.used_slots / self.allocated_slots if self.allocated_slots else 0.0


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None     # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_preemptions: int = 0


@dataclass(frozen=True)
class TokenEvent:
    """A request produced ``token`` (None when it finished without one, e.g. out of cache)."""
    request_id: int
    token: int | None
    finish_reason: str | None


class Engine:
    def __init__(self, model: torch.nn.Module, config: EngineConfig | None = None, *,
                 eos_token_id: int | Seq[int] | None = None, kv_heads: int | None = None,
                 step_graph=None) -> None:
        """``kv_heads``: kv heads this process holds when the model runs sharded by heads (tensor-parallel
        decoding, :mod:`autopar.inference.tensor_parallel`); default the model's. ``step_graph``: a
        :class:`~autopar.inference.step_graph.StepGraph` captured (and sharded) by the caller."""
        self.config = cfg = config or EngineConfig()
        self.shape = shape = model_shape(model)
        if kv_heads is not None:
            self.shape = shape = dataclasses.replace(shape, kv_heads=kv_heads)
        p = next(model.parameters())
        per_block = bytes_per_block(num_layers=shape.num_layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                                    block_size=cfg.block_size, dtype=p.dtype)
        if cfg.num_blocks is not None:
            num_blocks = cfg.num_blocks
        else:
            budget = cfg.kv_cache_bytes if cfg.kv_cache_bytes is not None else cfg.kv_cache_fraction
            num_blocks = blocks_from_budget(budget if budget is not None else 256 << 20, per_block=per_block,
                                            device=p.device)
        self.cache = KVCache(num_layers=shape.num_layers, num_blocks=num_blocks, kv_heads=shape.kv_heads,
                             head_dim=shape.head_dim, block_size=cfg.block_size, dtype=p.dtype, device=p.device)
        self.blocks = BlockManager(num_blocks, cfg.block_size, prefix_sharing=cfg.prefix_sharing)
        self.scheduler = Scheduler(self.blocks, max_num_seqs=cfg.max_num_seqs,
                                   max_tokens_per_step=cfg.max_tokens_per_step, prefill_chunk=cfg.prefill_chunk)
        self.runner = ModelRunner(model, self.cache, num_splits=cfg.num_splits, path=cfg.runner_path,
                                  graph=step_graph)
        if eos_token_id is None:
            eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        self._seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self.admission_order: list[int] = []     # request ids in order of first admission
        self.steps = 0
        self.generated_tokens = 0
        self.computed_tokens = 0                  # prompt and output tokens run through the model
        self.block_copies = 0                     # copy-on-write block copies made
        self.kv_stats = KVStats()

    # --- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: Seq[int], params: SamplingParams | None = None) -> int:
        """Queue a request; raises :class:`RequestError` (bad or too-long prompt) before it is queued."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise SamplingParamsError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise RequestError("empty prompt: give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.shape.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.shape.vocab_size})")
        limit = min(self.shape.max_model_len, self.blocks.capacity_tokens)
        if len(prompt) + 1 > limit:
            what = "model's context" if limit == self.shape.max_model_len else "whole KV cache"
            raise RequestError(f"prompt of {len(prompt)} tokens does not fit the {what} ({limit} tokens with one "
                               "generated token): shorten the prompt or enlarge the cache")
        rid = next(self._ids)
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        seq = Sequence(seq_id=rid, arrival=rid, prompt=prompt, params=params, generator=gen)
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def add_parallel(self, prompt_token_ids: Seq[int], params: SamplingParams | None, n: int) -> list[int]:
        """``n`` samples of one prompt. The prompt is computed once; when its last chunk is done the other
        samples fork its block table (reference counts, no copy) and draw their own first token from the same
        logits; a sample's first write into a shared block copies that block (copy-on-write). With a seed,
        sample ``i`` uses ``seed + i``. The samples count as one request at admission (the batch may exceed
        ``max_num_seqs`` by ``n - 1``)."""
        if not isinstance(n, int) or n < 1:
            raise SamplingParamsError(f"n={n!r} must be an integer >= 1")
        params = params if params is not None else SamplingParams()
        rid = self.add_request(prompt_token_ids, params)
        parent = self._seqs[rid]
        for i in range(1, n):
            cid = next(self._ids)
            p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            gen = None if p.seed is None else torch.Generator().manual_seed(p.seed)
            child = Sequence(seq_id=cid, arrival=parent.arrival, prompt=list(parent.prompt), params=p, generator=gen)
            self._seqs[cid] = child
            parent.forks.append(child)
        return [rid, *(c.seq_id for c in parent.forks)]

    def abort(self, request_id: int) -> None:
        """Stop a request and free its blocks (a client went away)."""
        seq = self._seqs.get(request_id)
        if seq is not None:
            for child in seq.forks:                    # samples not forked yet go with their parent
                self.scheduler.finish(child, "abort")
            seq.forks = []
            self.scheduler.finish(seq, "abort")

    def output(self, request_id: int) -> RequestOutput:
        s = self._seqs[request_id]
        return RequestOutput(request_id, list(s.prompt), list(s.output), s.finish_reason, s.error, s.num_preemptions)

    def release(self, request_id: int) -> None:
        """Forget a finished request's record."""
        seq = self._seqs.get(request_id)
        if seq is not None and seq.status is Status.FINISHED:
            del self._seqs[request_id]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- one iteration --------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        plan = self.scheduler.schedule()
        events = []
        for seq in plan.out_of_cache:
            seq.error = "the KV cache is full with this sequence alone"
            self.scheduler.finish(seq, "length")
            events.append(TokenEvent(seq.seq_id, None, "length"))
        for seq in plan.admitted:
            if seq.num_preemptions == 0:
                self.admission_order.append(seq.seq_id)
        for seq in plan.preempted:
            log.debug("preempted request %d (recompute)", seq.seq_id)
        if not plan.items:
            return events
        self.cache.copy_blocks(plan.copies)
        self.block_copies += len(plan.copies)
        logits = self.runner.execute(plan.items, self.blocks.tables, self.blocks.block_size)
        self.steps += 1
        self.computed_tokens += sum(it.num_tokens for it in plan.items)
        self.kv_stats.add(self.blocks.usage())
        argmax = logits.argmax(-1).tolist()
        for row, it in enumerate(plan.items):
            seq = it.seq
            seq.num_computed = it.start + it.num_tokens
            self.blocks.register_computed(seq.seq_id, seq.tokens, seq.num_computed)
            if seq.num_computed < seq.num_tokens:
                continue                                   # a prefill chunk: no token yet
            forks, seq.forks = seq.forks, []
            for child in forks:                        # parallel samples: share the prompt's blocks
                self.blocks.fork(seq.seq_id, child.seq_id)
                child.num_computed = seq.num_computed
                self.scheduler.add_running(child)
            for s in (seq, *forks):
                events.append(self._sample(s, logits[row], argmax[row]))
        return events

    def _sample(self, seq: Sequence, logits: torch.Tensor, argmax: int) -> TokenEvent:
        if seq.params.greedy:
            tok = argmax
        else:
            seen = torch.tensor(seq.tokens, device=logits.device)
            tok = sample_token(logits, seq.params, seen, seq.generator)
        seq.output.append(tok)
        self.generated_tokens += 1
        reason = self._stop_reason(seq, tok)
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return TokenEvent(seq.seq_id, tok, reason)

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos):
            return "stop"
        if len(seq.output) >= p.max_new_tokens or seq.num_tokens >= self.shape.max_model_len:
            return "length"
        return None

    # --- convenience loops ----------------------------------------------------------------------
    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to completion. A prompt that cannot be served gets ``finish_reason="error"``
        and its message; the others run."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids: list[int | RequestOutput] = []
        for prompt, p in zip(prompts, plist, strict=True):
            try:
                ids.append(self.add_request(prompt, p))
            except RequestError as e:
                ids.append(RequestOutput(-1, list(prompt), finish_reason="error", error=str(e)))
        while self.has_unfinished():
            self.step()
        outs = []
        for rid in ids:
            if isinstance(rid, RequestOutput):
                outs.append(rid)
            else:
                outs.append(self.output(rid))
                self.release(rid)
        return outs

    def stream(self, prompt: Seq[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Tokens of one request as they are produced (other queued requests advance too). Closing the
        iterator early aborts the request and frees its blocks."""
        rid = self.add_request(prompt, params)
        try:
            while True:
                seq = self._seqs[rid]
                if seq.status is Status.FINISHED:
                    return
                for ev in self.step():
                    if ev.request_id == rid and ev.token is not None:
                        yield ev.token
        finally:
            self.abort(rid)
            self.release(rid)
