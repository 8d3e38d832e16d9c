"""Train a GPT with autopar under torchrun.

    torchrun --standalone --nproc-per-node 4 examples/train_gpt.py --mesh 2x2
    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --mesh 2
    python examples/train_gpt.py                  # one process: the plain model, for reference

Every rank builds the same GPT (autopar/models/gpt.py, seeded) and reads the same deterministic
token stream; ``autopar.parallelize`` plans it on rank 0 for the mesh and applies the plan on
every rank, then AdamW trains it. The parallel module takes the global batch on every rank and
returns the global loss, so the loop is the single-device loop. Rank 0 prints ``step N loss X``
per step and, with ``--loss-out``, writes the losses as JSON. On CPU the ranks talk over gloo,
with CUDA over NCCL (one GPU per rank). With one process there is no process group and no
autopar: the same loop on the plain model, so its losses are the reference for a parallel run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from autopar.core.mesh import default_dim_names, parse_mesh_shape
from autopar.models import load_example_module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", default=None,
                   help="mesh shape, e.g. 2x2 (dims dp, tp) or 2 (dp); default: 1-D over all ranks")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialization and the token stream")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--cluster", default=None,
                   help="cluster preset or profile JSON for the plan's costs (default cpu-gloo on CPU, h100-sxm on GPU)")
    p.add_argument("--no-pin-batch", action="store_true",
                   help="let the solver place the batch too (default: the batch is split over the dp mesh dim)")
    p.add_argument("--loss-out", default=None, help="rank 0 writes the per-step losses to this JSON file")
    p.add_argument("--plan-out", default=None, help="rank 0 writes the plan to this JSON file (parallel runs)")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> nn.Module:
    """The example GPT, initialized on CPU from ``--seed``: the same weights on every rank."""
    gpt = load_example_module("gpt")
    torch.manual_seed(args.seed)
    return gpt.GPT(gpt.GPTConfig(n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                                 vocab_size=args.vocab, max_seq_len=args.seq))


def batches(args: argparse.Namespace, device: torch.device):
    """``--steps`` batches from a fixed token stream (a repeated random phrase with 10% random tokens
    mixed in, so the loss falls); ``labels`` are ``idx`` shifted by one token."""
    gen = torch.Generator().manual_seed(10_000 + args.seed)
    per_step = args.batch * args.seq
    n = args.steps * per_step + 1
    phrase = torch.randint(0, args.vocab, (61,), generator=gen)
    stream = phrase.repeat(n // len(phrase) + 1)[:n]
    noise = torch.rand(n, generator=gen) < 0.1
    stream = torch.where(noise, torch.randint(0, args.vocab, (n,), generator=gen), stream)
    for s in range(args.steps):
        lo = s * per_step
        idx = stream[lo:lo + per_step].view(args.batch, args.seq)
        labels = stream[lo + 1:lo + 1 + per_step].view(args.batch, args.seq)
        yield {"idx": idx.to(device), "labels": labels.to(device)}


def parallelize(model: nn.Module, args: argparse.Namespace, world: int, device: torch.device) -> nn.Module:
    """Plan (rank 0) and apply on a DeviceMesh of ``--mesh`` over all ranks."""
    import autopar
    from torch.distributed.device_mesh import init_device_mesh

    shape = parse_mesh_shape(args.mesh) if args.mesh else (world,)
    if math.prod(shape) != world:
        raise SystemExit(f"train_gpt.py: --mesh {args.mesh} has {math.prod(shape)} positions but there are {world} "
                         f"ranks; launch with --nproc-per-node {math.prod(shape)}")
    names = default_dim_names(len(shape))
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    example = next(batches(args, device))
    # The batch splits over the mesh dim named dp (data parallel); the solver decides the rest.
    fix = None if args.no_pin_batch or "dp" not in names else {"input:*": ["S(0)" if n == "dp" else "R" for n in names]}
    return autopar.parallelize(model, mesh, example, cluster=args.cluster, fix=fix)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:  # torchrun's env:// rendezvous: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        model = build_model(args).to(device)
        if world > 1:
            model = parallelize(model, args, world, device)
            if rank == 0:
                from autopar.tools.report import render
                print(render(model.plan), file=sys.stderr, flush=True)
                if args.plan_out:
                    model.plan.to_json(args.plan_out)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
        losses = []
        for step, batch in enumerate(batches(args, device)):
            loss = model(**batch)  # the global loss, the same on every rank
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if rank == 0:
                print(f"step {step} loss {losses[-1]:.6f}", flush=True)
        if rank == 0 and args.loss_out:
            with open(args.loss_out, "w") as f:
                json.dump({"world_size": world, "mesh": args.mesh, "losses": losses}, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # After destroy_process_group a plain interpreter exit sometimes aborts in gloo's destructors
        # ("terminate called without an active exception"), failing a finished run: flush and leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
