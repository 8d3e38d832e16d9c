"""Sampling parameters (a typed, validated object) and the sampler that turns one row of logits into a token.

Semantics follow HF ``generate``'s logits processors, in its order: repetition penalty over every token
seen (prompt and output), temperature, top-k, top-p; greedy when ``temperature == 0``. A request with a
``seed`` draws from its own generator, so its tokens do not depend on what else runs in the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from autopar.inference.errors import SamplingParamsError


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request samples and stops.

    temperature: 0 is greedy (argmax); > 0 divides the logits. top_k: keep the k most likely (0 = all).
    top_p: keep the smallest set whose probability reaches top_p (1 = all). repetition_penalty: HF's
    (> 1 discourages tokens already seen). seed: per-request generator. max_new_tokens: output budget.
    stop_token_ids: any of them ends the request (kept in the output, like EOS). ignore_eos: do not stop
    at the model's EOS (benchmarks).
    """
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name, why):
            raise SamplingParamsError(f"sampling parameter {name}={getattr(self, name)!r} {why}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = no top-k)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", "must be in (0, 1]")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            bad("repetition_penalty", "must be a finite number > 0 (1 = none)")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", "must be a non-negative integer or None")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.repetition_penalty == 1.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's: a seen token's logit is divided by ``penalty`` when positive, multiplied when negative."""
    picked = logits[seen]
    logits = logits.clone()
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor) -> torch.Tensor:
    """The ``[vocab]`` logits a non-greedy request samples from (-inf where top-k / top-p drop a token)."""
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature > 0:
        logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - params.top_p             # the low tail whose mass stays within 1 - top_p
        drop[-1] = False                           # always keep the most likely token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor,
                 generator: torch.Generator | None) -> int:
    """One token from a ``[vocab]`` row of fp32 logits."""
    if params.temperature == 0:
        if params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        return int(torch.argmax(logits))
    probs = process_logits(logits, params, seen).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
