"""Worker functions (module level, run in the gloo pools) that check pipelined plans against one device.

``check_pipeline_step`` builds a model on every rank with the same seed, keeps a single-device copy,
parallelizes it with ``pipeline=`` on a mesh with a ``pp`` dim, runs ``autopar.forward_backward``
and compares the loss and every gradient of this rank's stages (``full_tensor()`` of DTensors) with
the single-device model, plus the parameters after one AdamW step.
"""
from __future__ import annotations

import copy

import torch
from torch.distributed.device_mesh import init_device_mesh

import autopar
from autopar.models import build_model

RTOL, ATOL = 1e-4, 1e-5


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Excess over the fp32 tolerance: <= 0 means allclose(rtol=1e-4, atol=1e-5) holds."""
    a, b = a.detach(), b.detach()
    return float(((a - b).abs() - (ATOL + RTOL * b.abs())).max())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(d, d)

    def forward(self, h, pos):
        return h + torch.tanh(self.fc(h + pos))


class Expanded(torch.nn.Module):
    """A value every block reads, made before the blocks as an expanded (non-contiguous) view, and a
    constant made in forward (``torch.tensor``): stage boundaries carry the view, the graph the constant
    (as in HF Mistral's rotary tables and masks)."""

    def __init__(self, d: int = 16, layers: int = 2, vocab: int = 32) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.table = torch.nn.Parameter(torch.randn(1, 8, d) * 0.1)
        self.blocks = torch.nn.ModuleList(_Block(d) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, idx, labels):
        h = self.emb(idx)
        pos = self.table.expand(idx.shape[0], -1, -1)
        for blk in self.blocks:
            h = blk(h, pos)
        logits = self.head(h) * torch.tensor(0.5)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def build(spec: str, batch: int, seq: int):
    """A built-in model, ``gpt-4layer``: the tiny GPT with 4 blocks (2 ranks x 2 virtual stages), or
    ``expanded``: :class:`Expanded` (sequence 8)."""
    if spec == "expanded":
        g = torch.Generator().manual_seed(1)
        idx = torch.randint(0, 32, (batch, 8), generator=g)
        return Expanded(), {"idx": idx, "labels": torch.roll(idx, -1, dims=1)}
    if spec == "gpt-4layer":
        from autopar.models import load_example_module
        gpt = load_example_module("gpt")
        model = gpt.GPT(gpt.GPTConfig(n_layer=4, d_model=64, n_head=4, vocab_size=256, max_seq_len=64))
        _, inputs = build_model("gpt-tiny", batch=batch, seq=seq, device="cpu")
        return model, inputs
    return build_model(spec, batch=batch, seq=seq, device="cpu")


def check_pipeline_step(rank: int, world: int, spec: str, mesh_shape: tuple[int, ...], names: tuple[str, ...],
                        pipeline, batch: int = 4, seq: int = 8, steps: int = 1, options: dict | None = None) -> dict:
    torch.manual_seed(0)
    model, inputs = build(spec, batch, seq)
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    pm = autopar.parallelize(model, mesh, inputs, pipeline=pipeline, **(options or {}))
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    out = {"errors": {}, "pipeline": {k: v for k, v in pm.plan.pipeline.items() if k != "stages"},
           "stages": sorted(pm.stage_modules), "fqns": [n for n, _ in pm.named_parameters()],
           "ref_fqns": list(ref_params), "sharded": [n for n, p in pm.named_parameters()
                                                     if any(type(x).__name__ == "Shard" for x in
                                                            getattr(p, "placements", ()))]}
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for step in range(steps):
        loss = autopar.forward_backward(pm, inputs)
        ref_loss = ref(**inputs)
        ref_loss.backward()
        out["errors"][f"loss{step}"] = _err(loss, ref_loss)
        out.setdefault("losses", []).append((float(loss), float(ref_loss.detach())))
        for name, p in pm.named_parameters():
            out["errors"][f"grad{step}:{name}"] = _err(_full(p.grad), ref_params[name].grad)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for name, p in pm.named_parameters():
            out["errors"][f"param{step}:{name}"] = _err(_full(p.detach()), ref_params[name].detach())
    return out
