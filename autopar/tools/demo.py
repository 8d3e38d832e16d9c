"""``python -m autopar.tools.demo``: plan, parallelize and train a small GPT on 4 local CPU processes.

The demo spawns one gloo process per mesh position (default a 2x2 mesh named ``dp``, ``tp``),
builds the same small GPT from ``autopar/models/gpt.py`` on every rank (fixed seed), lets
``autopar.parallelize`` plan it on rank 0 and apply the plan on every rank, trains a few AdamW
steps on a fixed synthetic token stream, and compares the loss of every step with the same model
trained in one process. Rank 0 prints the plan table; the parent prints the loss table and
writes the plan JSON. Exit code 0: the losses match (fp32: rtol 1e-4, atol 1e-5); 1: they do not,
or a worker failed; 2: bad usage.

Progress goes to stderr, tables to stdout. The parent never waits forever: workers that fail,
die or overrun ``--timeout`` are killed and reported. This module is a runnable example built on
the public API (``autopar.parallelize``, ``autopar.tools.report``); the library never imports it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import queue as queue_mod
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import autopar
from autopar.cluster.profile import load_cluster
from autopar.core.errors import AutoparError
from autopar.core.mesh import default_dim_names, parse_mesh_shape
from autopar.models import load_example_module
from autopar.tools.report import render

RTOL, ATOL = 1e-4, 1e-5
_HOST = "127.0.0.1"
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The model, data and training run; identical in every process."""

    n_layer: int = 2
    d_model: int = 128
    n_head: int = 4
    vocab_size: int = 512
    seq: int = 32
    batch: int = 8
    steps: int = 5
    lr: float = 1e-3
    seed: int = 0


# ------------------------------------------------------------------------------ model, data, training


def build_gpt(cfg: DemoConfig) -> nn.Module:
    """The example GPT at the demo's size, initialized from ``cfg.seed`` (the same on every rank)."""

    gpt = load_example_module("gpt")
    torch.manual_seed(cfg.seed)
    return gpt.GPT(gpt.GPTConfig(n_layer=cfg.n_layer, d_model=cfg.d_model, n_head=cfg.n_head,
                                 vocab_size=cfg.vocab_size, max_seq_len=cfg.seq))


def token_batches(cfg: DemoConfig) -> list[dict[str, torch.Tensor]]:
    """``cfg.steps`` batches cut from one fixed token stream: ``labels`` are ``idx`` shifted by one token.

    The stream repeats a short random phrase with a few random tokens mixed in, so the loss falls
    within a few steps.
    """
    gen = torch.Generator().manual_seed(1234 + cfg.seed)
    n = cfg.steps * cfg.batch * cfg.seq + 1
    phrase = torch.randint(0, cfg.vocab_size, (61,), generator=gen)
    stream = phrase.repeat(n // len(phrase) + 1)[:n]
    noise = torch.rand(n, generator=gen) < 0.1
    stream = torch.where(noise, torch.randint(0, cfg.vocab_size, (n,), generator=gen), stream)
    batches = []
    for s in range(cfg.steps):
        lo = s * cfg.batch * cfg.seq
        idx = stream[lo:lo + cfg.batch * cfg.seq].view(cfg.batch, cfg.seq)
        labels = stream[lo + 1:lo + 1 + cfg.batch * cfg.seq].view(cfg.batch, cfg.seq)
        batches.append({"idx": idx.clone(), "labels": labels.clone()})
    return batches


def train(model: nn.Module, cfg: DemoConfig) -> list[float]:
    """``cfg.steps`` AdamW steps; the loss of each step (before its update)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    for batch in token_batches(cfg):
        loss = model(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# ------------------------------------------------------------------------------------------ workers


def _progress(msg: str) -> None:
    print(f"[autopar.tools.demo] {msg}", file=sys.stderr, flush=True)


def _worker(rank: int, world: int, port: int, cfg: DemoConfig, mesh_shape: tuple[int, ...],
            dim_names: tuple[str, ...], cluster: str, out: str, result_q) -> None:
    """One rank: join the gloo group, parallelize the GPT, train, report the losses; always exits."""

    try:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh


        torch.set_num_threads(1)
        store = dist.TCPStore(_HOST, port, is_master=False, timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=dim_names)
        model = build_gpt(cfg)
        example = token_batches(cfg)[0]
        # The batch is pinned to split over the mesh dim named dp, which makes it the data-parallel dim;
        # the solver decides everything else (which weights to shard over tp, where to reshard).
        fix = {"input:*": ["S(0)" if n == "dp" else "R" for n in dim_names]} if "dp" in dim_names else None
        t0 = time.perf_counter()
        pm = autopar.parallelize(model, mesh, example, cluster=cluster, fix=fix)  # the solver keeps stdout clean
        if rank == 0:
            _progress(f"planned and applied in {time.perf_counter() - t0:.1f}s; training {cfg.steps} steps")
            pm.plan.to_json(out)
            print(render(pm.plan), flush=True)
            print(flush=True)
        losses = train(pm, cfg)
        result_q.put((rank, "ok", losses))
    except AutoparError as e:  # says what to fix: one line, no traceback
        result_q.put((rank, "err", f"{type(e).__name__}: {e}"))
    except BaseException:  # noqa: BLE001 - every failure is reported to the parent
        result_q.put((rank, "err", traceback.format_exc()))
    _exit_worker(result_q)


def _exit_worker(result_q) -> None:
    """destroy_process_group, flush, os._exit(0): a plain exit sometimes aborts in gloo's destructors."""

    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()
    with contextlib.suppress(Exception):
        result_q.close()
        result_q.join_thread()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)


class DemoError(RuntimeError):
    """A worker failed, died or did not finish in time."""


def run_parallel(cfg: DemoConfig, mesh_shape: tuple[int, ...], dim_names: tuple[str, ...], cluster: str, out: str,
                 timeout: float, while_waiting: Callable[[], T]) -> tuple[list[float], T]:
    """Train on ``prod(mesh_shape)`` spawned gloo processes: rank 0's losses, and the result of
    ``while_waiting()``, which the parent runs while the workers start up and plan. Raises DemoError."""

    world = math.prod(mesh_shape)
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(_HOST, 0, is_master=True, wait_for_workers=False)  # port 0: a free port, no race
    result_q = ctx.Queue()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # spawned children copy the environment at start
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(r, world, store.port, cfg, mesh_shape, dim_names, cluster, out, result_q))
             for r in range(world)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        mine = while_waiting()
        results = _collect(result_q, procs, deadline, timeout)
        for p in procs:
            p.join(timeout=10)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        result_q.cancel_join_thread()
        result_q.close()
        del store
    return results[0], mine


def _collect(result_q, procs, deadline: float, timeout: float) -> dict[int, list[float]]:
    """Every rank's losses, or DemoError on the first failure, a death, or the deadline (time.monotonic)."""
    results: dict[int, list[float]] = {}
    dead_since: dict[int, float] = {}
    while len(results) < len(procs):
        if time.monotonic() > deadline:
            missing = sorted(set(range(len(procs))) - set(results))
            raise DemoError(f"rank(s) {missing} did not finish within {timeout:.0f}s (raise --timeout on a slow "
                            f"machine); their processes were killed")
        try:
            rank, status, payload = result_q.get(timeout=0.2)
        except queue_mod.Empty:
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in results and p.exitcode is not None and now - dead_since.setdefault(r, now) > 2.0:
                    raise DemoError(f"rank {r} exited with code {p.exitcode} without reporting")
            continue
        if status != "ok":
            raise DemoError(f"rank {rank} failed:\n{payload.rstrip()}")
        results[rank] = payload
    return results


# --------------------------------------------------------------------------------------- comparison


def compare(parallel: list[float], single: list[float]) -> tuple[str, bool, float]:
    """The side-by-side table, whether every step is within tolerance, and the largest |diff|."""
    rows = [("step", "parallel loss", "single-device loss", "|diff|")]
    ok, worst = len(parallel) == len(single), 0.0
    for i, (a, b) in enumerate(zip(parallel, single)):
        d = abs(a - b)
        worst = max(worst, d)
        ok &= d <= ATOL + RTOL * abs(b)
        rows.append((str(i), f"{a:.6f}", f"{b:.6f}", f"{d:.2e}"))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines), ok, worst


# ---------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autopar.tools.demo",
        description="Plan and parallelize a small GPT with autopar on local CPU processes (gloo), train it a few "
                    "steps, and check every step's loss against the same model trained in one process.")
    p.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    p.add_argument("--out", default="plan.json", help="where to write the plan JSON (default ./plan.json)")
    # cpu-gloo, not h100-sxm: on the H100 preset each op of a model this small costs about its fixed
    # per-op overhead (5 us) sharded or not, while every collective costs >= 10 us, so the solver
    # replicates every weight (and all-gathers the batch). At CPU speeds the matmuls are worth
    # splitting: the solver shards the embedding, QKV and MLP weights over tp (Megatron-style)
    # while the batch splits over dp.
    p.add_argument("--cluster", default="cpu-gloo",
                   help="cluster preset or profile JSON the plan is costed for (default cpu-gloo)")
    p.add_argument("--mesh", default="2x2", help="mesh shape: 2x2 (dims dp, tp; the default) or 2 (dp); the batch "
                                                 "is split over dp, the solver decides the rest")
    p.add_argument("--nproc", type=int, default=None, help="processes to spawn; must equal the mesh size")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before stuck workers are killed")
    return p


def main(argv: list[str] | None = None) -> int:

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        mesh_shape = parse_mesh_shape(args.mesh)
    except AutoparError as e:
        parser.error(str(e))
    if args.nproc is not None and args.nproc != math.prod(mesh_shape):
        parser.error(f"--nproc {args.nproc} does not fit mesh {args.mesh}, which needs "
                     f"{math.prod(mesh_shape)} processes")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    out = os.path.abspath(args.out)
    if not os.path.isdir(os.path.dirname(out)):
        parser.error(f"--out {args.out}: directory {os.path.dirname(out)} does not exist")
    try:
        load_cluster(args.cluster)  # fail here, not in four processes
    except AutoparError as e:
        print(f"autopar.tools.demo: error: {e}", file=sys.stderr)
        return 1
    cfg = DemoConfig(steps=args.steps)
    dim_names = default_dim_names(len(mesh_shape))
    world = math.prod(mesh_shape)

    t0 = time.perf_counter()
    _progress(f"GPT {cfg.n_layer} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}; batch {cfg.batch}x{cfg.seq}; "
              f"mesh {'x'.join(map(str, mesh_shape))} {dim_names}; cluster {args.cluster}; "
              f"spawning {world} gloo processes")
    # The single-process reference trains while the workers import torch and rank 0 plans (a core is
    # idle then); one thread, like every worker.
    torch.set_num_threads(1)
    try:
        parallel, single = run_parallel(cfg, mesh_shape, dim_names, args.cluster, out, args.timeout,
                                        while_waiting=lambda: train(build_gpt(cfg), cfg))
    except DemoError as e:
        print(f"autopar.tools.demo: error: {e}", file=sys.stderr, flush=True)
        return 1

    table, ok, worst = compare(parallel, single)
    print(table)
    if ok:
        print(f"losses match (max |diff| = {worst:.2e}; tolerance rtol {RTOL:g}, atol {ATOL:g})")
    else:
        print(f"LOSSES DO NOT MATCH: max |diff| = {worst:.2e} exceeds rtol {RTOL:g}, atol {ATOL:g} "
              f"(the parallel plan changed the numerics; see {args.out})")
    sys.stdout.flush()
    _progress(f"plan written to {args.out}; done in {time.perf_counter() - t0:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
