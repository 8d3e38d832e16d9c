"""Worker functions (module level, run in the gloo pools) that check pipelined plans against one device.

``check_pipeline_step`` builds a model on every rank with the same seed, keeps a single-device copy,
parallelizes it with ``pipeline=`` on a mesh with a ``pp`` dim, runs ``autopar.forward_backward``
and compares the loss and every gradient of this rank's stages (``full_tensor()`` of DTensors) with
the single-device model, plus the parameters after one AdamW step.
"""
from __future__ import annotations

import copy
import json

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
    # the blocks each stage runs under torch.utils.checkpoint (stage plans with recompute)
    out["checkpointed"] = sorted(m.fqn for st in pm.stage_modules.values() if hasattr(st, "graph_module")
                                 for m in st.graph_module.modules() if type(m).__name__ == "CheckpointedRegion")
    out["reducer_calls"] = pm.reducer.calls()   # the once-per-step data-parallel sums (0: no replicated weight)
    out["stage_checkpoint"] = sorted(e for r in pm.plan.pipeline["stages"] if r["plan"] is not None
                                     for e in r["plan"].get("checkpoint", []))
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


def fast_net_profile():
    """cpu-gloo with a fast network (1 us, 1 TB/s): compute dominates, so the stage plans split the batch over
    dp (data parallelism, gradients summed over dp) with the same placements for 2 and 4 micro-batches."""
    import dataclasses

    from autopar.cluster.profile import PRESETS, LinkSpec

    fast = LinkSpec.uniform("fast", alpha=1e-6, bandwidth=1e12)
    return dataclasses.replace(PRESETS["cpu-gloo"], name="cpu-fastnet", intra_node=fast, inter_node=fast)


def count_grad_sync(rank: int, world: int, microbatches: tuple[int, ...], batch: int = 8) -> dict:
    """Per micro-batch count: the all-reduce calls (and their elements) on this rank's dp group during one
    ``forward_backward`` of the tiny GPT on a (pp=2, dp=2) mesh, the calls and elements the stages' reducer makes
    once per step, and the errors against one device (loss, every gradient)."""
    import torch.distributed as dist

    out = {}
    for m in microbatches:
        torch.manual_seed(0)
        model, inputs = build("gpt-tiny", batch, 8)
        ref = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        pm = autopar.parallelize(model, mesh, inputs, pipeline={"schedule": "1f1b", "microbatches": m},
                                 cluster=fast_net_profile())
        dp_group = mesh.get_group("dp")
        calls: list[int] = []
        real = dist.all_reduce

        dist.all_reduce = _spy(real, dp_group, calls)
        try:
            loss = autopar.forward_backward(pm, inputs)
        finally:
            dist.all_reduce = real
        ref_loss = ref(**inputs)
        ref_loss.backward()
        ref_params = dict(ref.named_parameters(remove_duplicate=False))
        errors = {"loss": _err(loss, ref_loss)}
        errors.update({f"grad:{n}": _err(_full(p.grad), ref_params[n].grad) for n, p in pm.named_parameters()})
        reduced = [mod._leaf(f) for mod, _, buckets in pm.reducer.stages for fqns, _ in buckets for f in fqns]
        out[m] = {"calls": len(calls), "elements": sum(calls), "reducer_calls": pm.reducer.calls(),
                  "reducer_elements": sum(t.numel() for t in reduced), "errors": errors,
                  "group_size": dist.get_world_size(dp_group),
                  "stage_plans": [json.dumps(r["plan"]["node_shardings"], sort_keys=True)
                                  for r in pm.plan.pipeline["stages"]]}
    return out


def _spy(real, group, calls: list[int]):
    """``torch.distributed.all_reduce`` recording the element count of each call on ``group``."""
    def all_reduce(t, *args, **kwargs):
        if kwargs.get("group") is not None and kwargs["group"] == group:
            calls.append(t.numel())
        return real(t, *args, **kwargs)
    return all_reduce
