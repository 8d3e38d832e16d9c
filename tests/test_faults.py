"""Faults: when a rank dies (or hangs) mid-step, the others raise RankFailureError naming it within the
process-group timeout (+ the roll-call grace), never hang.

Each case starts its own 2 processes (a rank is killed, so the shared pools are not used), with the
process group started by ``autopar.init_distributed`` from a config: timeout 3 s, grace 2 s.
Rank 0 writes what it saw to a JSON file; the parent checks it.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import autopar
from autopar.runtime.distributed import init_distributed
from autopar.core.errors import RankFailureError
from autopar.runtime.faults import guard_step, is_comm_failure

CONFIG = {"distributed": {"backend": "gloo", "timeout_s": 3, "fault_grace_s": 2}}


def _worker(rank: int, world: int, port: int, mode: str, plan_json: str | None, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=30))
    # both ranks up before the 3 s process-group rendezvous (a rank slow to start on a loaded host is no fault)
    store.add("started", 1)
    while int(store.add("started", 0)) < world:
        time.sleep(0.05)
    init_distributed(CONFIG, rank=rank, world_size=world, store=store)
    report = {"rank": rank}
    t0 = time.monotonic()
    try:
        if plan_json is not None:  # a real step of an applied model: rank 1 dies between forward and backward
            from torch.distributed.device_mesh import init_device_mesh

            from autopar.models import build_model
            torch.manual_seed(0)
            model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="cpu")
            pm = autopar.apply(model, autopar.Plan.from_json(plan_json), init_device_mesh("cpu", (world,)))
            t0 = time.monotonic()
            with guard_step():
                loss = pm(**inputs)
                if rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                t0 = time.monotonic()
                loss.backward()
        else:
            t = torch.ones(8)
            dist.all_reduce(t)
            t0 = time.monotonic()
            with guard_step():
                if mode == "bug":  # both ranks are fine; rank 0's own code fails
                    dist.all_reduce(t)
                    if rank == 0:
                        raise RuntimeError("size mismatch in user code")
                else:
                    if rank == 1:
                        if mode == "hang":
                            time.sleep(15)   # alive, but never reaches the collective
                        os._exit(0)
                    dist.all_reduce(t)
        report["result"] = "no error"
    except Exception as e:  # noqa: BLE001 - reported to the parent
        report.update(type=type(e).__name__, message=str(e), seconds=time.monotonic() - t0,
                      lost_ranks=list(getattr(e, "lost_ranks", ())), cause=type(e.__cause__).__name__)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    os._exit(0)   # the process group is broken: no clean teardown


def _launch(mode: str, tmp_path, plan_json: str | None = None, deadline: float = 180.0) -> dict:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    out = str(tmp_path / f"{mode}.json")
    env = {"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        procs = [ctx.Process(target=_worker, args=(r, 2, store.port, mode, plan_json, out), daemon=True)
                 for r in range(2)]
        for p in procs:
            p.start()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    t0 = time.monotonic()
    procs[0].join(deadline)
    hung = procs[0].is_alive()
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    assert not hung, f"rank 0 did not finish within {deadline} s: it hangs"
    assert os.path.exists(out), f"rank 0 exited with {procs[0].exitcode} without a report"
    with open(out) as f:
        rep = json.load(f)
    rep["wall"] = time.monotonic() - t0
    return rep


def test_a_rank_that_dies_mid_step_is_named(tmp_path):
    from autopar.models import build_model
    model, inputs = build_model("gpt-tiny", batch=4, seq=16, device="meta")
    # data parallel (batch split through the whole graph, so backward all-reduces the gradients)
    plan = autopar.plan(model, inputs, mesh_shape=(2,), cluster="cpu-gloo",
                        fix={"input:*": ["S(0)"], "param:*": ["R"]},
                        prefer={"root/arange*": ["R"], "wpe/*": ["R"], "*": ["S(0)"]})
    assert plan.node_shardings["blocks.*/mlp.fc/linear#0"].outputs[0] == ("S(0)",)
    rep = _launch("die", tmp_path, plan.to_json())
    assert rep.get("type") == "RankFailureError", rep
    assert rep["lost_ranks"] == [1], rep
    assert "rank(s) [1] of 2 died or stopped responding" in rep["message"] and "autopar.load" in rep["message"]
    assert rep["seconds"] < 3 + 2 + 2, f"took {rep['seconds']:.1f} s: more than timeout + grace"


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_a_rank_that_hangs_is_named_after_the_timeout(tmp_path):
    rep = _launch("hang", tmp_path)
    assert rep.get("type") == "RankFailureError" and rep["lost_ranks"] == [1], rep
    assert rep["cause"] == "RuntimeError"
    assert 2.5 < rep["seconds"] < 3 + 2 + 2, f"took {rep['seconds']:.1f} s: timeout 3 s + grace 2 s expected"


def test_an_error_that_is_not_a_lost_rank_passes_through(tmp_path):
    rep = _launch("bug", tmp_path)
    assert rep.get("type") == "RuntimeError" and rep["message"] == "size mismatch in user code", rep
    assert rep["seconds"] < 2, "a plain error must not wait for a roll call"


def test_guard_without_a_process_group_changes_nothing():
    with pytest.raises(ValueError, match="plain"):
        with guard_step():
            raise ValueError("plain")
    assert not is_comm_failure(RuntimeError("size mismatch"))
    assert is_comm_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:909"))
    assert is_comm_failure(RuntimeError("Timed out waiting 4000ms for recv operation to complete"))


def test_rank_failure_error_survives_pickling():
    import pickle
    e = pickle.loads(pickle.dumps(RankFailureError("rank 3 lost", lost_ranks=(3,))))
    assert isinstance(e, autopar.AutoparError) and e.lost_ranks == (3,) and str(e) == "rank 3 lost"
