"""The multi-process test harness itself: results, exceptions, survival, hangs, deaths, shutdown."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from dist_utils import DistPool, WorkerError, run_distributed


def _sum_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t * scale, "view": torch.arange(100.0)[::50], "env": os.environ["OMP_NUM_THREADS"],
            "tmp": os.environ["TMPDIR"]}


def _fail_on(rank, world_size, bad_rank):
    if bad_rank is None or rank == bad_rank:
        raise ValueError(f"boom on rank {rank}")
    t = torch.ones(1)
    dist.all_reduce(t)  # the other ranks wait here for the failed one
    return t.item()


def _die(rank, world_size):
    if rank == 1:
        os._exit(3)
    return rank


def _sleep(rank, world_size, seconds):
    time.sleep(seconds)
    return rank


def test_run_distributed_results_and_errors():
    results = run_distributed(_sum_ranks, 2, 3.0)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(torch.equal(r["sum"], torch.tensor([3.0])) for r in results)
    assert results[0]["view"].tolist() == [0.0, 50.0] and results[0]["view"].is_contiguous()
    assert results[0]["env"] == "1" and "autopar-dist-" in results[0]["tmp"]
    with pytest.raises(ValueError, match="boom on rank 0") as info:
        run_distributed(_fail_on, 2, None)
    notes = "\n".join(info.value.__notes__)
    assert "traceback in rank 0" in notes and "traceback in rank 1" in notes and "_fail_on" in notes


def test_pool_survives_symmetric_failures(dist2):
    assert [r["sum"].item() for r in dist2.run(_sum_ranks, 1.0)] == [1.0, 1.0]
    starts = dist2.starts
    with pytest.raises(ValueError, match="boom on rank 0"):
        dist2.run(_fail_on, None)
    assert [r["sum"].item() for r in dist2.run(_sum_ranks, 2.0)] == [2.0, 2.0]
    assert dist2.starts == starts  # same worker processes
    with pytest.raises(TypeError, match="module-level function"):  # fails in the parent, nothing is sent
        dist2.run(_sum_ranks, lambda: 1)
    assert dist2.run(_sleep, 0.0) == [0, 1]


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_pool_recovers_from_hangs_deaths_and_timeouts():
    with DistPool(2, error_grace=1.0) as pool:
        assert pool.run(_sleep, 0.0) == [0, 1]
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="boom on rank 1") as info:
            pool.run(_fail_on, 1)  # rank 0 is stuck in all_reduce: killed after the grace period
        assert "did not finish" in "\n".join(info.value.__notes__)
        assert time.monotonic() - t0 < 10
        assert pool.run(_sleep, 0.0) == [0, 1] and pool.starts == 2  # restarted
        with pytest.raises(WorkerError, match="rank 1 exited with code 3"):
            pool.run(_die)
        assert pool.run(_sleep, 0.0) == [0, 1] and pool.starts == 3
        with pytest.raises(WorkerError, match=r"rank\(s\) \[0, 1\] did not finish within 1 s"):
            pool.run(_sleep, 60.0, timeout=1.0)
        assert not pool.alive  # killed; the next run would start fresh workers
    assert not pool.alive
