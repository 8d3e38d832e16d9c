"""Multi-process gloo harness for tests: one-shot launches and a long-lived worker pool.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` fresh processes, runs
``fn(rank, world_size, *args)`` in each under a gloo process group and returns the per-rank
results. ``DistPool(world_size)`` keeps the processes (and their process group) alive and runs
one function after another in them; ``tests/conftest.py`` shares pools across a session as
the ``dist2`` / ``dist4`` fixtures, because a 4-rank launch costs ~5-6 s on 2 cores.

Rules for ``fn``: a module-level function (it is pickled by reference and imported in the
workers), same call on every rank, picklable arguments and results. Tensors in results come
back as plain, compact CPU tensors (a DTensor as its local tensor). An exception in a worker
is re-raised in the parent as the same exception type when it can be pickled (else
:class:`WorkerError`), with every failing rank's traceback added as a note.

Never hangs: results are awaited with a deadline; when a rank fails and the others do not
report within a grace period (they are stuck in a collective), or a worker dies, the
processes are killed; a pool then restarts on its next ``run``. Workers follow PITFALLS.md:
``OMP_NUM_THREADS=1``, a private ``TMPDIR``, and ``destroy_process_group()``, flush,
``os._exit(0)`` at the end.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import pickle
import queue as queue_mod
import shutil
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "DistPool", "WorkerError"]

_CTX = mp.get_context("spawn")
_HOST = "127.0.0.1"
_ERROR_GRACE_S = 10.0  # after one rank fails, how long the others get to report before being killed
_DEATH_GRACE_S = 1.0  # after a worker exits, how long its last message gets to arrive


class WorkerError(RuntimeError):
    """A worker failed (exception that could not be re-raised as itself, death, timeout)."""


# ----------------------------------------------------------------------------------------- helpers


def _to_plain(obj):
    """Results as plain values: tensors become compact CPU tensors without autograd history."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "to_local") and type(obj).__name__ == "DTensor":
            obj = obj.to_local()
        return obj.detach().cpu().clone(memory_format=torch.contiguous_format)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_plain(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _exc_payload(exc: BaseException) -> tuple[bytes | None, str]:
    text = "".join(traceback.format_exception(exc))
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:
        blob = None
    return blob, text


def _raise_failures(failures: dict[int, tuple[bytes | None, str]], what: str, problem: str | None = None) -> None:
    ranks = sorted(failures)
    blob, _ = failures[ranks[0]]
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, Exception):
        exc = WorkerError(f"{what}: rank(s) {ranks} failed; see the notes for their tracebacks")
    for r in ranks:
        exc.add_note(f"--- {what}: traceback in rank {r} ---\n{failures[r][1].rstrip()}")
    if problem:
        exc.add_note(f"--- {problem} (their processes were killed)")
    raise exc


@contextlib.contextmanager
def _child_env(tmpdir: str):
    """Environment that spawned children inherit (spawn copies os.environ at start)."""
    new = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": tmpdir, "PYTHONUNBUFFERED": "1"}
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_worker(rank: int, world_size: int, port: int, pg_timeout_s: float) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore(_HOST, port, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=pg_timeout_s))


def _exit_worker(*queues) -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()
    for q in queues:
        with contextlib.suppress(Exception):
            q.close()
            q.join_thread()  # the feeder thread must have written everything before _exit
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)


def _kill(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def _collect(result_q, procs, task_id: int, timeout: float, what: str, grace: float = _ERROR_GRACE_S):
    """Wait for every rank's message about ``task_id``: (results by rank, failures by rank, problem)."""
    world_size = len(procs)
    results: dict[int, object] = {}
    failures: dict[int, tuple[bytes | None, str]] = {}
    deadline = time.monotonic() + timeout
    dead_since: dict[int, float] = {}
    while len(results) + len(failures) < world_size:
        now = time.monotonic()
        if now > deadline:
            missing = sorted(set(range(world_size)) - set(results) - set(failures))
            why = "after a failure in rank(s) " + str(sorted(failures)) if failures else f"within {timeout:.0f} s"
            return results, failures, f"{what}: rank(s) {missing} did not finish {why}"
        try:
            rank, tid, status, payload = result_q.get(timeout=0.1)
        except queue_mod.Empty:
            for r, p in enumerate(procs):
                if r in results or r in failures or p.exitcode is None:
                    continue
                first = dead_since.setdefault(r, now)
                if now - first > _DEATH_GRACE_S:
                    failures[r] = (None, f"rank {r} exited with code {p.exitcode} without reporting")
                    deadline = min(deadline, now + grace)
            continue
        if tid != task_id:
            continue  # a stale message from an earlier task
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            failures[rank] = payload
            deadline = min(deadline, time.monotonic() + grace)
    return results, failures, None


def _pickle_task(fn, args) -> bytes:
    try:
        return pickle.dumps((fn, args))
    except Exception as e:
        raise TypeError(f"cannot send {getattr(fn, '__qualname__', fn)!r} and its arguments to the workers: {e}; "
                        f"use a module-level function and picklable arguments") from e


# -------------------------------------------------------------------------------- one-shot launches


def _oneshot_worker(rank, world_size, port, pg_timeout_s, blob, result_q):
    try:
        _init_worker(rank, world_size, port, pg_timeout_s)
        fn, args = pickle.loads(blob)
        out = pickle.dumps(_to_plain(fn(rank, world_size, *args)))
        result_q.put((rank, 0, "ok", out))
    except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
        result_q.put((rank, 0, "err", _exc_payload(e)))
    _exit_worker(result_q)


def run_distributed(fn, world_size: int, *args, timeout: float = 120.0, pg_timeout: float = 60.0) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh gloo processes; per-rank results."""
    blob = _pickle_task(fn, args)
    store = dist.TCPStore(_HOST, 0, is_master=True, wait_for_workers=False)  # a free port, no race
    tmpdir = tempfile.mkdtemp(prefix="autopar-dist-")
    result_q = _CTX.Queue()
    procs = [_CTX.Process(target=_oneshot_worker, args=(r, world_size, store.port, pg_timeout, blob, result_q),
                          daemon=True) for r in range(world_size)]
    try:
        with _child_env(tmpdir):
            for p in procs:
                p.start()
        results, failures, problem = _collect(result_q, procs, 0, timeout, f"run_distributed({fn.__name__})")
        for p in procs:
            p.join(timeout=10)
    finally:
        _kill(procs)
        result_q.cancel_join_thread()
        result_q.close()
        del store
        shutil.rmtree(tmpdir, ignore_errors=True)
    if failures:
        _raise_failures(failures, f"run_distributed({fn.__name__})")
    if problem:
        raise WorkerError(problem)
    return [results[r] for r in range(world_size)]


# ------------------------------------------------------------------------------------------ the pool


def _pool_worker(rank, world_size, port, pg_timeout_s, task_q, result_q):
    try:
        _init_worker(rank, world_size, port, pg_timeout_s)
        result_q.put((rank, -1, "ok", pickle.dumps(None)))
    except BaseException as e:  # noqa: BLE001
        result_q.put((rank, -1, "err", _exc_payload(e)))
        _exit_worker(result_q, task_q)
    while True:
        item = task_q.get()
        if item is None:
            break
        task_id, blob = item
        try:
            fn, args = pickle.loads(blob)
            out = pickle.dumps(_to_plain(fn(rank, world_size, *args)))
            result_q.put((rank, task_id, "ok", out))
        except BaseException as e:  # noqa: BLE001 - the worker survives and reports
            result_q.put((rank, task_id, "err", _exc_payload(e)))
    _exit_worker(result_q, task_q)


def _health_check(rank: int, world_size: int, token: int) -> float:
    t = torch.tensor([float(token)])
    dist.all_reduce(t)
    if t.item() != token * world_size:
        raise WorkerError(f"health check: all_reduce gave {t.item()}, expected {token * world_size}")
    return t.item()


class DistPool:
    """``world_size`` long-lived gloo worker processes that run module-level functions on request.

    ``run(fn, *args)`` runs ``fn(rank, world_size, *args)`` on every rank and returns the
    per-rank results (like :func:`run_distributed`). Workers survive exceptions in ``fn``; after
    a failure the pool checks with one all_reduce that the process group is still in step and
    restarts (next ``run``) when it is not, or when ranks hang, die or time out. Workers are
    started on the first ``run``. State a function leaves in its worker's module globals (e.g. a
    cached DeviceMesh) lives as long as the pool's processes.
    """

    def __init__(self, world_size: int, *, timeout: float = 120.0, pg_timeout: float = 60.0,
                 error_grace: float = _ERROR_GRACE_S) -> None:
        self.world_size = world_size
        self.error_grace = error_grace
        self.timeout = timeout
        self.pg_timeout = pg_timeout
        self.starts = 0  # how many times worker processes were launched (tests can see restarts)
        self._procs: list = []
        self._task_qs: list = []
        self._result_q = None
        self._store = None
        self._tmpdir: str | None = None
        self._ids = itertools.count(1)

    # lifecycle
    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        if self.alive:
            return
        self.close()
        self._store = dist.TCPStore(_HOST, 0, is_master=True, wait_for_workers=False)
        self._tmpdir = tempfile.mkdtemp(prefix="autopar-pool-")
        self._result_q = _CTX.Queue()
        self._task_qs = [_CTX.Queue() for _ in range(self.world_size)]
        self._procs = [_CTX.Process(target=_pool_worker, daemon=True,
                                    args=(r, self.world_size, self._store.port, self.pg_timeout,
                                          self._task_qs[r], self._result_q))
                       for r in range(self.world_size)]
        self.starts += 1
        with _child_env(self._tmpdir):
            for p in self._procs:
                p.start()
        _, failures, problem = _collect(self._result_q, self._procs, -1, self.timeout,
                                        f"DistPool({self.world_size}) start")
        if failures or problem:
            self.close(kill=True)
            if failures:
                _raise_failures(failures, f"DistPool({self.world_size}) start")
            raise WorkerError(problem)

    def close(self, kill: bool = False) -> None:
        """Stop the workers: ask them to exit (fast, clean), kill whatever is left after a few seconds."""
        procs, self._procs = self._procs, []
        if procs and not kill:
            for q in self._task_qs:
                with contextlib.suppress(Exception):
                    q.put(None)
            deadline = time.monotonic() + 5.0
            for p in procs:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
        _kill(procs)
        for q in [*self._task_qs, self._result_q]:
            if q is not None:
                with contextlib.suppress(Exception):
                    q.cancel_join_thread()
                    q.close()
        self._task_qs, self._result_q = [], None
        self._store = None
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> "DistPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # running
    def _submit(self, fn, blob: bytes, timeout: float):
        task_id = next(self._ids)
        for q in self._task_qs:
            q.put((task_id, blob))
        return _collect(self._result_q, self._procs, task_id, timeout, f"DistPool({self.world_size}).run("
                        f"{getattr(fn, '__name__', fn)})", self.error_grace)

    def run(self, fn, *args, timeout: float | None = None) -> list:
        """``fn(rank, world_size, *args)`` on every rank; per-rank results, or the first rank's exception."""
        blob = _pickle_task(fn, args)  # fails here, not in the workers, on unpicklable input
        self.start()
        results, failures, problem = self._submit(fn, blob, self.timeout if timeout is None else timeout)
        if problem:
            self.close(kill=True)  # some ranks are stuck or dead: restart on the next run
        elif failures and not self._healthy():
            self.close(kill=True)
        if failures:
            _raise_failures(failures, f"DistPool({self.world_size}).run({getattr(fn, '__name__', fn)})", problem)
        if problem:
            raise WorkerError(problem)
        return [results[r] for r in range(self.world_size)]

    def _healthy(self) -> bool:
        token = next(self._ids)
        results, failures, problem = self._submit(_health_check, pickle.dumps((_health_check, (token,))), 15.0)
        return not failures and not problem and all(v == token * self.world_size for v in results.values())
