"""Train the Open-Sora-style video DiT (examples/dit/model.py) with autopar.train on synthetic latents.

    python examples/dit/train.py --config examples/dit/tiny.toml                 # one process
    torchrun --standalone --nproc-per-node 2 examples/dit/train.py --config examples/dit/tiny.toml

The model's forward returns the rectified-flow loss, so ``autopar.parallelize`` plans the whole training
step (the batch of clips, noises, timesteps and labels is split over the ``dp`` mesh dim). Model sizes come
from the job's ``[dit]`` section; everything else is an ``autopar train`` job (autopar/train/config.py).
Checkpoints (``autopar.save``) go to ``checkpoint.dir``; ``infer.py`` samples from the newest one.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch.distributed as dist

import autopar
from autopar.train import load_train_config, train
from autopar.train.model import Adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import DiT, DiTConfig, SyntheticLatents

SECTION = "dit"


def dit_config(cfg) -> tuple[DiTConfig, int]:
    """(DiTConfig, number of synthetic samples) from the job's ``[dit]`` section."""
    raw = dict(cfg.extra.get(SECTION, {}))
    n = raw.pop("num_samples", 512)
    known = {f.name for f in dataclasses.fields(DiTConfig)}
    bad = sorted(set(raw) - known)
    if bad:
        raise autopar.ConfigError(f"[dit]: unknown key(s) {bad}; known: {sorted(known | {'num_samples'})}")
    return DiTConfig(**raw), int(n)


def build(cfg):
    """The DiT (seeded by ``model.init_seed``) and its synthetic latents (seeded by ``data.seed``)."""
    import torch
    dcfg, n = dit_config(cfg)
    torch.manual_seed(cfg.model.init_seed)
    return DiT(dcfg), SyntheticLatents(dcfg, num_samples=n, seed=cfg.data.seed)


def main(argv: list[str] | None = None) -> dict[int, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).with_name("tiny.toml")))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key (repeatable), e.g. --set training.steps=10 --set dit.hidden=128")
    args = p.parse_args(argv)
    cfg = load_train_config(args.config, args.set, extra_sections=(SECTION,))
    model, source = build(cfg)
    result = train(cfg, parallelize=autopar.parallelize, apply=autopar.apply, model=model, source=source,
                   adapter=Adapter("passthrough"))
    if (not dist.is_initialized() or dist.get_rank() == 0) and result.losses:
        steps = sorted(result.losses)
        print(f"steps {steps[0]}..{steps[-1]}: loss {result.losses[steps[0]]:.4f} -> {result.losses[steps[-1]]:.4f}")
    return result.losses


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:   # gloo's destructors sometimes abort a finished run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
