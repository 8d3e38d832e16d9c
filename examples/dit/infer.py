"""Sample short clips from a DiT checkpoint written by train.py and save them as a PNG strip (or a GIF).

    python examples/dit/infer.py --config examples/dit/tiny.toml --out clip.png --classes 0 1 2 3

Sampler: Euler integration of the rectified-flow ODE from pure noise at t = 1 to t = 0 (``--steps``), with
classifier-free guidance (``--guidance`` > 1 mixes in the prediction for the "no class" label). The latents
are synthetic (model.py), so a frame is shown by mapping its first three latent channels to RGB (each clip
normalized to its own range) and enlarging every latent pixel: a row per class, a column per frame.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from autopar.runtime.checkpoint import load
from autopar.train import load_train_config
from autopar.train.checkpoints import latest_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import SECTION, build


@torch.no_grad()
def sample(model, classes: list[int], *, steps: int, guidance: float, seed: int) -> torch.Tensor:
    c = model.cfg
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(classes), c.channels, c.frames, c.size, c.size, generator=gen)
    y = torch.tensor(classes)
    null = torch.full_like(y, c.num_classes)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = ts[i].expand(len(classes))
        v = model.velocity(x, t, y)
        if guidance != 1.0:
            v = model.velocity(x, t, null) + guidance * (v - model.velocity(x, t, null))
        x = x + (ts[i + 1] - ts[i]) * v          # dt < 0: toward the data at t = 0
    return x


def to_frames(x: torch.Tensor, scale: int) -> list[torch.Tensor]:
    """[B, C, T, H, W] latents -> one uint8 [H*B*scale, W*scale, 3] image per frame."""
    rgb = x[:, :3]
    lo = rgb.amin(dim=(1, 2, 3, 4), keepdim=True)
    hi = rgb.amax(dim=(1, 2, 3, 4), keepdim=True)
    rgb = ((rgb - lo) / (hi - lo + 1e-8) * 255).round().to(torch.uint8)
    frames = []
    for f in range(x.shape[2]):
        img = torch.cat(list(rgb[:, :, f]), dim=1)                      # [3, B*H, W]: a row per clip
        img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        frames.append(img.permute(1, 2, 0).contiguous())
    return frames


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(Path(__file__).with_name("tiny.toml")))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--checkpoint", default=None, help="a step_<N> directory (default: the newest in checkpoint.dir)")
    p.add_argument("--out", default="dit_samples.png", help=".png (frames side by side) or .gif")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="class of each clip (default: all)")
    p.add_argument("--steps", type=int, default=20, help="Euler steps")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=8, help="pixels per latent pixel")
    args = p.parse_args(argv)
    from PIL import Image

    cfg = load_train_config(args.config, args.set, extra_sections=(SECTION,))
    model, data = build(cfg)
    ckpt = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(cfg.path(cfg.checkpoint.dir))
    if ckpt is None:
        raise SystemExit(f"infer.py: no checkpoint in {cfg.path(cfg.checkpoint.dir)}; run train.py first")
    step = load(ckpt, model)["step"]
    model.eval()
    classes = args.classes if args.classes is not None else list(range(model.cfg.num_classes))
    x = sample(model, classes, steps=args.steps, guidance=args.guidance, seed=args.seed)
    frames = to_frames(x, args.scale)
    out = Path(args.out)
    if out.suffix == ".gif":
        imgs = [Image.fromarray(f.numpy()) for f in frames]
        imgs[0].save(out, save_all=True, append_images=imgs[1:], duration=250, loop=0)
    else:
        Image.fromarray(torch.cat(frames, dim=1).numpy()).save(out)
    # how close each sample is to its class's clean clip, against the other classes' (lower is better)
    own = [float(((x[i] - data.clip(y)) ** 2).mean()) for i, y in enumerate(classes)]
    other = [float(min(((x[i] - data.clip(z)) ** 2).mean() for z in range(model.cfg.num_classes) if z != y))
             for i, y in enumerate(classes)]
    report = {"checkpoint": str(ckpt), "step": step, "out": str(out), "classes": classes,
              "mse_to_own_class": own, "mse_to_nearest_other_class": other}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
