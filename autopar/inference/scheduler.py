"""Iteration-level (continuous) batching: every step decides which sequences run and how many of their tokens,
without touching tensors.

Per step, oldest first: running sequences continue (one decode token, or the next prefill chunk); when the
cache has no block for one, the newest running sequence is preempted by recompute (its blocks freed, its
prompt plus output so far recomputed when it is readmitted). Then waiting sequences are admitted first come,
first served (head of line: a sequence that does not fit blocks the ones behind it) while the batch, the
token budget of the step and the free blocks for its whole remaining prompt allow. Nothing is dropped: a
preempted sequence goes back to the waiting queue in arrival order.
"""
from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field

import torch

from autopar.inference.kv_cache import BlockManager
from autopar.inference.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's state. ``num_computed`` tokens of ``tokens`` have K/V in the cache."""
    seq_id: int
    arrival: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    generator: torch.Generator | None = None
    num_preemptions: int = 0
    forks: list[Sequence] = field(default_factory=list)   # parallel samples that share this prompt's blocks

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    start: int          # first token position computed this step
    num_tokens: int     # tokens computed this step


@dataclass
class StepPlan:
    items: list[Scheduled] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)     # copy-on-write block copies to make first
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    out_of_cache: list[Sequence] = field(default_factory=list)      # alone and still no block: finished (length)


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_tokens_per_step: int,
                 prefill_chunk: int) -> None:
        self.blocks = blocks
        self.max_num_seqs, self.max_tokens_per_step, self.prefill_chunk = max_num_seqs, max_tokens_per_step, prefill_chunk
        self.waiting: list[Sequence] = []          # sorted by arrival
        self.running: list[Sequence] = []          # sorted by arrival

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one (its blocks already shared): it runs from the next step."""
        seq.status = Status.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.arrival)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        plan.preempted.append(seq)
        self.add(seq)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_tokens - seq.num_computed
        return min(remaining, budget, self.prefill_chunk) if remaining > 1 else min(remaining, budget)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_tokens_per_step
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = self._chunk(seq, budget)
            while self.blocks.needed(seq.seq_id, seq.num_computed + n) > self.blocks.num_free:
                victim = self.running[-1]                   # newest running sequence
                if victim is seq and len(self.running) == 1:
                    plan.out_of_cache.append(seq)           # the whole cache holds only this sequence
                    break
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING or seq in plan.out_of_cache:
                continue
            plan.copies += self.blocks.reserve(seq.seq_id, seq.num_computed + n)
            plan.items.append(Scheduled(seq, seq.num_computed, n))
            budget -= n
        if plan.preempted:                                  # blocks are scarce: admit nobody this step
            return plan
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            shared = self.blocks.share_prefix(seq.seq_id, seq.tokens)
            held = len(self.blocks.tables[seq.seq_id])
            if self.blocks.blocks_for(seq.num_tokens) - held > self.blocks.num_free:
                self.blocks.free(seq.seq_id)                # head of line waits for blocks
                break
            self.waiting.pop(0)
            seq.num_computed = shared
            n = self._chunk(seq, budget)
            plan.copies += self.blocks.reserve(seq.seq_id, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.running.sort(key=lambda s: s.arrival)
            plan.items.append(Scheduled(seq, seq.num_computed, n))
            plan.admitted.append(seq)
            budget -= n
        return plan
