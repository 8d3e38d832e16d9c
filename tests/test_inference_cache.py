"""Block manager (tables, refcounts, prefix sharing, copy-on-write, accounting), scheduler decisions on
synthetic sequences (no model), and the sampler against HF's logits processors."""
from __future__ import annotations

import pytest
import torch

from autopar.core.errors import AutoparError
from autopar.inference import BlockManager, KVCache, SamplingParams, SamplingParamsError
from autopar.inference.kv_cache import blocks_from_budget, bytes_per_block
from autopar.inference.sampling import process_logits, sample_token
from autopar.inference.scheduler import Scheduler, Sequence, Status


def test_blocks_grow_on_demand_and_free():
    bm = BlockManager(8, 4)
    bm.share_prefix(0, list(range(6)))
    assert bm.needed(0, 6) == 2
    assert bm.reserve(0, 6) == []
    assert len(bm.tables[0]) == 2 and bm.num_free == 6
    assert bm.slots(0, 4, 6) == [bm.tables[0][1] * 4, bm.tables[0][1] * 4 + 1]
    u = bm.usage()
    assert (u.used_slots, u.allocated_slots, u.used_blocks) == (6, 8, 2) and u.waste == pytest.approx(0.25)
    bm.reserve(0, 9)                                    # grows by one block only when the next token needs it
    assert len(bm.tables[0]) == 3 and bm.usage().used_slots == 9
    bm.free(0)
    assert bm.num_free == 8 and bm.usage().allocated_slots == 0 and sorted(bm.free_blocks) == list(range(8))


def test_prefix_sharing_refcounts_and_release():
    bm = BlockManager(8, 4)
    a = list(range(10))
    bm.share_prefix(0, a)
    bm.reserve(0, 10)
    assert bm.share_prefix(1, a[:8] + [99, 98]) == 0    # nothing registered before it is computed
    bm.free(1)
    bm.register_computed(0, a, 10)                      # blocks 0..1 full and computed
    shared = bm.share_prefix(1, a[:8] + [99, 98])
    assert shared == 8 and bm.tables[1] == bm.tables[0][:2]
    assert [bm.refcount[b] for b in bm.tables[0]] == [2, 2, 1]
    assert bm.share_prefix(2, a[:4] + [7, 7, 7, 7, 7]) == 4  # a shorter common prefix shares one block
    assert bm.share_prefix(3, a[:8]) == 4               # the block holding the last prompt token is computed
    bm.free(0)
    assert [bm.refcount[b] for b in bm.tables[1]] == [3, 1]
    for s in (1, 2, 3):
        bm.free(s)
    assert bm.num_free == 8 and bm._by_content == {}


def test_fork_copy_on_write_copies_the_block():
    bm = BlockManager(6, 4)
    bm.share_prefix(0, [1] * 6)
    bm.reserve(0, 6)
    bm.fork(0, 1)
    last = bm.tables[0][1]
    assert bm.refcount[last] == 2 and bm.needed(1, 7) == 1
    copies = bm.reserve(1, 7)                           # writing slot 6 of the shared block: copy it first
    assert len(copies) == 1 and copies[0][0] == last and bm.tables[1][1] == copies[0][1]
    assert bm.tables[1][0] == bm.tables[0][0] and bm.refcount[last] == 1
    cache = KVCache(num_layers=2, num_blocks=6, kv_heads=1, head_dim=2, block_size=4, dtype=torch.float32)
    cache.k[1][last] = 3.0
    cache.copy_blocks(copies)
    assert torch.equal(cache.k[1][copies[0][1]], cache.k[1][last])
    assert bm.usage().used_slots == 4 + 2 + 3


def test_cache_sizing_from_budget():
    per = bytes_per_block(num_layers=2, kv_heads=2, head_dim=8, block_size=16, dtype=torch.float32)
    assert per == 2 * 2 * 2 * 16 * 8 * 4
    assert blocks_from_budget(10 * per + 5, per_block=per, device=torch.device("cpu")) == 10
    assert blocks_from_budget(0.01, per_block=per, device=torch.device("cpu")) >= 1
    with pytest.raises(AutoparError, match="below one block"):
        blocks_from_budget(per - 1, per_block=per, device=torch.device("cpu"))
    with pytest.raises(AutoparError, match="fraction"):
        blocks_from_budget(1.5, per_block=per, device=torch.device("cpu"))


def _seq(i, n_prompt, n_out=0):
    return Sequence(seq_id=i, arrival=i, prompt=[1] * n_prompt, params=SamplingParams(), output=[2] * n_out)


def _finish_prefill(plan):
    for it in plan.items:
        it.seq.num_computed = it.start + it.num_tokens
        if it.seq.num_computed == it.seq.num_tokens:
            it.seq.output.append(5)


def test_scheduler_fcfs_chunks_and_budget():
    bm = BlockManager(100, 4)
    sch = Scheduler(bm, max_num_seqs=2, max_tokens_per_step=10, prefill_chunk=6)
    seqs = [_seq(i, n) for i, n in enumerate([9, 3, 4])]
    for s in reversed(seqs):
        sch.add(s)
    plan = sch.schedule()
    assert [(it.seq.seq_id, it.start, it.num_tokens) for it in plan.items] == [(0, 0, 6), (1, 0, 3)]
    assert [s.seq_id for s in sch.waiting] == [2]       # batch of 2 is full
    _finish_prefill(plan)
    plan = sch.schedule()                                # rest of the chunked prompt, then a decode row
    assert [(it.seq.seq_id, it.start, it.num_tokens) for it in plan.items] == [(0, 6, 3), (1, 3, 1)]
    sch.finish(seqs[1], "stop")
    assert seqs[1].status is Status.FINISHED and 1 not in bm.tables


def test_scheduler_preempts_newest_and_readmits_in_order():
    bm = BlockManager(4, 4)                              # 16 slots
    sch = Scheduler(bm, max_num_seqs=4, max_tokens_per_step=64, prefill_chunk=64)
    a, b = _seq(0, 4), _seq(1, 4)
    sch.add(a)
    sch.add(b)
    plan = sch.schedule()
    assert [it.seq.seq_id for it in plan.items] == [0, 1]
    _finish_prefill(plan)
    for _ in range(4):                                  # decode until both need a third block
        plan = sch.schedule()
        _finish_prefill(plan)
    plan = sch.schedule()
    assert [s.seq_id for s in plan.preempted] == [1] and [it.seq.seq_id for it in plan.items] == [0]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    sch.finish(a, "stop")
    plan = sch.schedule()                               # b comes back, recomputing prompt and output
    assert plan.admitted == [b] and plan.items[0].num_tokens == b.num_tokens


def test_scheduler_head_of_line_waits_for_blocks():
    bm = BlockManager(4, 4)
    sch = Scheduler(bm, max_num_seqs=4, max_tokens_per_step=64, prefill_chunk=64)
    for s in (_seq(0, 9), _seq(1, 9), _seq(2, 2)):
        sch.add(s)
    plan = sch.schedule()
    assert [it.seq.seq_id for it in plan.items] == [0]   # 1 does not fit; 2 would, but may not pass it
    assert [s.seq_id for s in sch.waiting] == [1, 2] and 1 not in bm.tables


def test_sampling_params_validation():
    for bad in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5}, {"repetition_penalty": 0},
                {"max_new_tokens": 0}, {"seed": -1}, {"stop_token_ids": (-3,)}, {"temperature": float("nan")}):
        with pytest.raises(SamplingParamsError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_processors_match_hf():
    tlp = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    logits = torch.randn(50) * 3
    seen = torch.tensor([1, 4, 4, 7, 30])
    p = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    ids = seen[None]
    hf = tlp.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[None].clone())
    hf = tlp.TemperatureLogitsWarper(0.7)(ids, hf)
    hf = tlp.TopKLogitsWarper(20)(ids, hf)
    hf = tlp.TopPLogitsWarper(0.8)(ids, hf)
    ours = process_logits(logits, p, seen)
    assert torch.equal(torch.isinf(ours), torch.isinf(hf[0]))
    torch.testing.assert_close(ours[~torch.isinf(ours)], hf[0][~torch.isinf(hf[0])])


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(40)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    draw = [sample_token(logits, p, torch.tensor([0]), torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draw[0] == draw[1]
    assert sample_token(logits, SamplingParams(), torch.tensor([0]), None) == int(logits.argmax())
    many = {sample_token(logits, SamplingParams(temperature=1.0, top_k=3), torch.tensor([0]), None)
            for _ in range(60)}
    assert many <= set(torch.topk(logits, 3).indices.tolist()) and len(many) > 1
