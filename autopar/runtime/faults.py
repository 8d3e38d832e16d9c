"""Rank failures and disagreements: ``autopar.guard_step()`` turns a lost rank into a RankFailureError
naming it; ``check_same_plan`` (called by ``autopar.apply``) makes sure every rank holds the same plan.

When a rank dies (or stops responding) mid-step, the survivors' next collective fails: gloo reports
"Connection closed by peer" at once, or a timeout after the process group's ``timeout``
(``autopar.init_distributed(timeout_s=...)`` or the config's ``distributed.timeout_s``); NCCL
raises a DistBackendError. Neither says which rank is gone. Inside ``guard_step`` such an error
starts a roll call on the process group's store (the rendezvous key-value store, which outlives
the collectives): each survivor writes ``autopar/alive/<step>/<rank>`` and waits up to the grace
period (``distributed.fault_grace_s``, default the timeout) for the others; the ranks that never
answer are the lost ones, and every survivor raises ``RankFailureError(lost_ranks=...)`` chained to
the original error. The process group cannot be used afterwards: exit, restart the job, and resume
from the last checkpoint (``autopar.load``). Errors that are not communication failures pass
through unchanged.

Wraps the step from outside: the runtime's collectives (autopar/collectives.py, grad_sync.py) are
not touched. Imports autopar's core only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from autopar.core.errors import PlanMismatchError, RankFailureError
from autopar.runtime.distributed import active_distributed_config

log = logging.getLogger(__name__)

__all__ = ["check_same_plan", "guard_step", "is_comm_failure", "plan_digest"]

# what gloo / NCCL / c10d say when a peer is gone or a collective timed out
_COMM_FAILURE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|Timed out waiting|"
                           r"timed out|Socket Timeout|NCCL (communicator|error)|ProcessGroup.*(abort|timeout)|"
                           r"remote worker crashing|Connection refused", re.IGNORECASE)
_STEPS = {"n": 0}  # how many guarded steps this process has entered (the same count on every rank)


def is_comm_failure(exc: BaseException) -> bool:
    """Does ``exc`` come from a collective that lost its peers (not from a bug in the step)?"""
    if isinstance(exc, dist.DistError) and not isinstance(exc, dist.DistStoreError):
        return True
    return isinstance(exc, RuntimeError) and bool(_COMM_FAILURE.search(str(exc)))


def _default_grace() -> float:

    cfg = active_distributed_config()
    if cfg is not None:
        return cfg.grace_s
    with contextlib.suppress(Exception):  # the timeout the default group was started with
        return dist.distributed_c10d._get_default_group()._get_backend(
            torch.device("cpu")).options._timeout.total_seconds()
    return 30.0


def _roll_call(step: int, grace_s: float) -> tuple[tuple[int, ...], str | None]:
    """Ranks that did not report alive within ``grace_s`` (and why none could be named, if so)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"autopar/alive/{step}/{rank}", "1")
        deadline = time.monotonic() + grace_s
        missing = [r for r in range(world) if r != rank]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"autopar/alive/{step}/{r}"])]
            if missing:
                time.sleep(0.05)
        return tuple(missing), None
    except Exception as e:  # noqa: BLE001 - the store lives with a rank (often 0) that may be the one lost
        return (), f"the rendezvous store is unreachable too ({type(e).__name__}), so its host (usually rank 0) " \
                   f"is probably the one lost"


@contextlib.contextmanager
def guard_step(*, grace_s: float | None = None) -> Iterator[None]:
    """Run one training step (forward, backward, optimizer step) so that a lost rank raises RankFailureError.

    ``grace_s``: how long survivors wait for each other's roll call (default: the config's
    ``fault_grace_s``, else the process-group timeout). Without a process group this does nothing."""
    _STEPS["n"] += 1
    step = _STEPS["n"]
    try:
        yield
    except Exception as e:
        if not (dist.is_available() and dist.is_initialized()) or not is_comm_failure(e):
            raise
        world = dist.get_world_size()
        wait = _default_grace() if grace_s is None else grace_s
        lost, why = _roll_call(step, wait)
        if lost:
            msg = (f"rank(s) {list(lost)} of {world} died or stopped responding during step {step} (no answer "
                   f"within {wait:g} s after the collective failed: {str(e).splitlines()[0][:200]}); "
                   f"the process group is unusable: exit, restart the job and resume from the last checkpoint "
                   f"(autopar.load)")
        elif why:
            msg = (f"a collective failed during step {step} and {why}; exit, restart the job and resume from "
                   f"the last checkpoint (autopar.load)")
        else:
            raise  # every rank answered: not a lost rank
        log.error(msg)
        raise RankFailureError(msg, lost_ranks=lost) from e


# ------------------------------------------------------------------------------- plan agreement

def plan_digest(plan) -> int:
    """A 63-bit hash of everything a plan decides (its JSON without the solver's wall times)."""

    d = plan.to_dict()
    d["solver"] = {k: v for k, v in d["solver"].items() if k != "phase_times_s"}
    text = json.dumps(d, sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def check_same_plan(plan, device: torch.device | str = "cpu") -> None:
    """Every rank of the default process group must hold the same plan; else PlanMismatchError naming
    the ranks that differ from rank 0 (raised on every rank). A collective: call it on all ranks."""

    world = dist.get_world_size()
    if world == 1:
        return
    mine = torch.tensor([plan_digest(plan)], dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    digests = [int(t.item()) for t in every]
    differ = [r for r, h in enumerate(digests) if h != digests[0]]
    if differ:
        same = [r for r, h in enumerate(digests) if h == digests[0]]
        raise PlanMismatchError(f"ranks {differ} hold a different plan than rank 0 (and ranks {same}); every rank "
                                f"must apply the same plan: load one plan file everywhere, or use "
                                f"autopar.parallelize, which plans on rank 0 and shares the plan")
