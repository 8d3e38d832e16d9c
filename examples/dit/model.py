"""An Open-Sora-style video diffusion transformer (toy size by default) and its synthetic latent data.

Model. Video latents ``[B, C, T, H, W]`` are cut into ``p x p`` spatial patches per frame (``T * H/p * W/p``
tokens of width ``hidden``) with learned spatial and temporal position embeddings. Each block is a *spatial*
attention block (tokens of one frame attend to each other) followed by a *temporal* attention block (the
tokens at one spatial position attend across frames), each attention + MLP with adaLN-zero conditioning: a
linear map of the conditioning vector (timestep embedding + class embedding) gives shift, scale and gate
for both sub-layers, initialized to zero so every block starts as the identity. The final layer (adaLN,
zero-initialized linear) predicts a velocity per patch.

Loss. Rectified flow: ``x_t = (1 - t) x0 + t noise`` and the model regresses the velocity ``noise - x0``
(mean squared error). ``forward(x0, noise, t, y)`` returns that loss so autopar plans the whole step;
``velocity(x_t, t, y)`` is what a sampler calls (``infer.py``: Euler steps from t = 1 to 0).

Data. No video dataset is used: :class:`SyntheticLatents` makes, per sample index, a latent clip of its
class (a fixed random pattern per class drifting one pixel per frame, plus noise), a noise tensor and a
timestep, all seeded by the index, so every run and every rank sees the same samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    channels: int = 4
    frames: int = 4
    size: int = 8
    patch: int = 2
    hidden: int = 64
    heads: int = 4
    depth: int = 2
    mlp_ratio: int = 4
    num_classes: int = 4

    @property
    def tokens(self) -> int:
        return self.frames * (self.size // self.patch) ** 2


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class AdaLNBlock(nn.Module):
    """Attention + MLP, each wrapped in adaLN-zero modulation by the conditioning vector."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        h = cfg.hidden
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(h, cfg.heads)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(h, cfg.mlp_ratio * h), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * h, h))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))
        nn.init.zeros_(self.ada[1].weight)      # adaLN-zero: the block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of ``t`` in [0, 1] (scaled by 1000, as diffusion timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        p, h = cfg.patch, cfg.hidden
        self.n_side = cfg.size // p
        self.patch_embed = nn.Linear(cfg.channels * p * p, h)
        self.pos_spatial = nn.Parameter(torch.randn(1, self.n_side ** 2, h) * 0.02)
        self.pos_temporal = nn.Parameter(torch.randn(1, cfg.frames, h) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, h)     # the last class is "none" (guidance)
        self.spatial = nn.ModuleList(AdaLNBlock(cfg) for _ in range(cfg.depth))
        self.temporal = nn.ModuleList(AdaLNBlock(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        self.final = nn.Linear(h, cfg.channels * p * p)
        for m in (self.final_ada[1], self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, T, N, C*p*p]."""
        b, c, t, _, _ = x.shape
        p, n = self.cfg.patch, self.n_side
        x = x.reshape(b, c, t, n, p, n, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, t, n * n, c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, N, C*p*p] -> [B, C, T, H, W]."""
        b, t = x.shape[:2]
        p, n, c = self.cfg.patch, self.n_side, self.cfg.channels
        x = x.reshape(b, t, n, n, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, t, n * p, n * p)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, t_frames = x.shape[0], self.cfg.frames
        n, h = self.n_side ** 2, self.cfg.hidden
        tok = self.patch_embed(self.patchify(x)) + self.pos_spatial.unsqueeze(1) + self.pos_temporal.unsqueeze(2)
        c = self.t_mlp(timestep_embedding(t, h)) + self.y_embed(y)
        for spatial, temporal in zip(self.spatial, self.temporal):
            # spatial: the tokens of one frame attend to each other
            tok = spatial(tok.reshape(b * t_frames, n, h), c.repeat_interleave(t_frames, 0)).reshape(b, t_frames, n, h)
            # temporal: the tokens at one position attend across frames
            tt = tok.transpose(1, 2).reshape(b * n, t_frames, h)
            tok = temporal(tt, c.repeat_interleave(n, 0)).reshape(b, n, t_frames, h).transpose(1, 2)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tok.reshape(b, t_frames * n, h)), shift, scale))
        return self.unpatchify(out.reshape(b, t_frames, n, -1))

    def forward(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Rectified-flow loss: regress the velocity ``noise - x0`` at ``x_t = (1 - t) x0 + t noise``."""
        tb = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        return F.mse_loss(self.velocity(xt, t, y), noise - x0)


class SyntheticLatents:
    """Sample ``i``: a clip of class ``i % num_classes`` (its pattern drifting one pixel per frame, plus 0.1
    noise), a noise tensor and a timestep ``t ~ U(0, 1)``, all seeded by ``i`` (and ``seed``)."""

    def __init__(self, cfg: DiTConfig, *, num_samples: int = 512, seed: int = 0):
        self.cfg, self.n, self.seed = cfg, num_samples, seed
        gen = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(cfg.num_classes, cfg.channels, cfg.size, cfg.size, generator=gen)
        self.tokens_per_sample = cfg.tokens

    def __len__(self) -> int:
        return self.n

    def clip(self, y: int, gen: torch.Generator | None = None) -> torch.Tensor:
        frames = [torch.roll(self.patterns[y], shifts=f, dims=-1) for f in range(self.cfg.frames)]
        x = torch.stack(frames, dim=1)
        return x if gen is None else x + 0.1 * torch.randn(x.shape, generator=gen)

    def get(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        y = index % self.cfg.num_classes
        x0 = self.clip(y, gen)
        return {"x0": x0, "noise": torch.randn(x0.shape, generator=gen), "t": torch.rand((), generator=gen),
                "y": torch.tensor(y)}
