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


def test_gradients_are_views_of_their_buckets(dist2):
    from grad_sync_check import small_buckets
    # two backward calls per step: the first starts from no gradient, the second accumulates onto the first
    r = dist2.run(small_buckets, True)[0]
    assert r["grad_err_0"] < 1e-5 and r["grad_err_1"] < 1e-5, r
    assert r["shared_buckets"] > 3 and r["buckets"] > r["shared_buckets"], "16 KiB buckets: several per step"
    # the gradients of a bucket live in its buffer: one buffer per bucket, nothing copied back
    assert r["views"] == r["in_shared"] and r["bucket_buffers"] == r["shared_buckets"], r
    # the gradients kept after backward hold their bytes once: no second (flat) copy is kept alive
    assert r["grad_storage_bytes"] == r["grad_bytes"], r


def test_replaced_parameter_is_reduced(dist2):
    from grad_sync_check import replaced_parameter
    r = dist2.run(replaced_parameter)[0]
    assert r["reduced"] and r["err"] < 1e-5 and r["max_err"] < 1e-5, r
