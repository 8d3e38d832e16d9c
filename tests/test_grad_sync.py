"""Data-parallel gradients: bucketed all-reduce (DDP semantics), exact under gradient accumulation."""
from grad_sync_check import accumulate_two_microbatches


def test_bucketed_reduction_with_accumulation(dist2):
    r = dist2.run(accumulate_two_microbatches)[0]
    assert r["grad_err"] < 1e-5 and r["param_err"] < 1e-5
    assert r["deferred"] == r["n_params"], "every replicated parameter goes through the reducer"
    # one bucket for this small model: one all-reduce per backward instead of one per parameter
    assert r["buckets"] == 1
    # per step: the bucket and one all-reduce of the loss with its counted-token total (not one per parameter)
    assert r["all_reduce_calls"] == 2 * (r["buckets"] + 1) < r["n_params"]
