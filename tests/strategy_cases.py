"""Small modules, one per op family, and a worker that forces every strategy of every rule.

``force_every_strategy`` (run in the gloo pools) captures a case's module, finds its node(s) of the
op under test, and for each of the node's strategies builds a plan in which that node uses the
strategy and every other node is replicated (so the rewritten graph reshards replicated values into
the strategy's input placements and its output back), runs it on local shards and compares the
output and the gradients of every input and parameter with the single-device module (fp32, rtol
1e-4, atol 1e-5). No ILP per strategy: the rule itself is under test, not the solver.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from autopar.core.capture import capture
from autopar.codegen import build_parallel_graph
from autopar.core.graph import index_graph
from autopar.core.mesh import MeshSpec
from autopar.ops.parallel_ops import local_chunk
from autopar.cluster.profile import PRESETS
from autopar.core.placement import format_sharding
from autopar.core.plan import NodeSharding
from autopar.solver.planner import plan_graph
from autopar.solver.strategies.base import strategies_for

aten = torch.ops.aten


class Fn(nn.Module):
    """Wraps a function of (x, *params) with the given parameter shapes."""

    def __init__(self, fn, *param_shapes):
        super().__init__()
        self.fn = fn
        self.ps = nn.ParameterList(nn.Parameter(torch.randn(*s) * 0.5) for s in param_shapes)

    def forward(self, x):
        return self.fn(x, *self.ps)


class Embed(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(16, 8, **kw)

    def forward(self, idx):
        return self.emb(idx)


class CE(nn.Module):
    def __init__(self, ignore: bool, reduction: str = "mean"):
        super().__init__()
        self.ignore = ignore
        self.reduction = reduction

    def forward(self, logits, target):
        if self.ignore:
            target = target.masked_fill(target == 0, -100)
        return F.cross_entropy(logits, target, reduction=self.reduction)


def _x(*shape):
    return lambda: (torch.randn(*shape),)


# name -> (module factory, inputs factory, ops under test)
CASES = {
    "linear": (lambda: Fn(lambda x, w, b: F.linear(x, w, b), (8, 12), (8,)), lambda: (torch.randn(4, 4, 12),),
               [aten.linear.default]),
    "linear_nobias": (lambda: Fn(lambda x, w: F.linear(x, w), (8, 12)), lambda: (torch.randn(4, 12),),
                      [aten.linear.default]),
    "mm": (lambda: Fn(lambda x, w: torch.mm(x, w), (12, 8)), lambda: (torch.randn(4, 12),), [aten.mm.default]),
    "addmm": (lambda: Fn(lambda x, w, b: torch.addmm(b, x, w), (12, 8), (8,)), lambda: (torch.randn(4, 12),),
              [aten.addmm.default]),
    "bmm": (lambda: Fn(lambda x, w: torch.bmm(x, w), (4, 12, 8)), lambda: (torch.randn(4, 4, 12),),
            [aten.bmm.default]),
    "matmul": (lambda: Fn(lambda x, w: torch.matmul(x, w), (12, 8)), lambda: (torch.randn(4, 4, 12),),
               [aten.matmul.default]),
    "sdpa": (lambda: Fn(lambda x: F.scaled_dot_product_attention(x, x * 0.5, x, is_causal=True)),
             lambda: (torch.randn(4, 4, 8, 4),), [aten.scaled_dot_product_attention.default]),
    "embedding": (Embed, lambda: (torch.randint(0, 16, (4, 6)),), [aten.embedding.default]),
    # padding_idx (row 12: on the last vocabulary shard, at another local row) gets no gradient;
    # scale_grad_by_freq counts ids over the whole batch
    "embedding_padding": (lambda: Embed(padding_idx=12), lambda: (torch.arange(24).reshape(4, 6) % 16,),
                          [aten.embedding.default]),
    "embedding_freq": (lambda: Embed(scale_grad_by_freq=True), lambda: (torch.arange(24).reshape(4, 6) % 5,),
                       [aten.embedding.default]),
    "layer_norm": (lambda: Fn(lambda x, w, b: F.layer_norm(x, (8,), w, b), (8,), (8,)),
                   lambda: (torch.randn(4, 4, 8),), [aten.layer_norm.default]),
    "rms_norm": (lambda: Fn(lambda x, w: F.rms_norm(x, (8,), w), (8,)), lambda: (torch.randn(4, 4, 8),),
                 [aten.rms_norm.default]),
    "softmax": (lambda: Fn(lambda x: torch.softmax(x, -1) * x), _x(4, 4, 8), [aten.softmax.int]),
    "log_softmax": (lambda: Fn(lambda x: torch.log_softmax(x, 1)), _x(4, 4, 8), [aten.log_softmax.int]),
    "cross_entropy": (lambda: CE(False), lambda: (torch.randn(8, 12), torch.randint(0, 12, (8,))),
                      [aten.cross_entropy_loss.default]),
    "cross_entropy_ignore": (lambda: CE(True), lambda: (torch.randn(8, 12), torch.randint(0, 12, (8,))),
                             [aten.cross_entropy_loss.default]),
    "cross_entropy_none": (lambda: CE(True, "none"), lambda: (torch.randn(8, 12), torch.randint(0, 12, (8,))),
                           [aten.cross_entropy_loss.default]),
    "cross_entropy_sum": (lambda: CE(False, "sum"), lambda: (torch.randn(8, 12), torch.randint(0, 12, (8,))),
                          [aten.cross_entropy_loss.default]),
    "pointwise": (lambda: Fn(lambda x, b: F.gelu(x + b) * x - x / (b + 3.0), (4, 8)), _x(4, 4, 8),
                  [aten.add.Tensor, aten.gelu.default, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor]),
    "silu_neg": (lambda: Fn(lambda x: -F.silu(x)), _x(4, 8), [aten.silu.default, aten.neg.default]),
    "view": (lambda: Fn(lambda x: x.view(4, 4, 2, 4).transpose(1, 2).reshape(4, 2, 16)), _x(4, 4, 8),
             [aten.view.default, aten.transpose.int, aten.reshape.default]),
    "flatten_unsqueeze": (lambda: Fn(lambda x: x.flatten(0, 1).unsqueeze(1)), _x(4, 4, 8),
                          [aten.flatten.using_ints, aten.unsqueeze.default]),
    "permute_t": (lambda: Fn(lambda x: x.permute(2, 0, 1).sum(0).t()), _x(4, 4, 8),
                  [aten.permute.default, aten.t.default]),
    "expand": (lambda: Fn(lambda x, b: x + b.expand(4, 4, 8), (1, 4, 8)), _x(4, 4, 8), [aten.expand.default]),
    "slice_select": (lambda: Fn(lambda x: x[:, 1:3] * x[:, 1:3, 2].unsqueeze(-1)), _x(4, 4, 8),
                     [aten.slice.Tensor, aten.select.int]),
    "split_cat": (lambda: Fn(lambda x: torch.cat([b * (i + 1) for i, b in enumerate(x.split(4, dim=2))], dim=2)),
                  _x(4, 4, 8), [aten.split.Tensor, operator.getitem, aten.cat.default]),
    "chunk": (lambda: Fn(lambda x: x.chunk(2, dim=-1)[1] * 2), _x(4, 4, 8), [aten.chunk.default]),
    "repeat_interleave": (lambda: Fn(lambda x: x.repeat_interleave(2, dim=1)), _x(4, 4, 8),
                          [aten.repeat_interleave.self_int]),
    "sum_mean": (lambda: Fn(lambda x: x.sum(-1) + x.mean(1, keepdim=True).squeeze(1).sum(-1, keepdim=True)),
                 _x(4, 4, 8), [aten.sum.dim_IntList, aten.mean.dim]),
    "dropout": (lambda: Fn(lambda x: F.dropout(x, 0.0, training=True) * 2), _x(4, 8), [aten.dropout.default]),
    "arange": (lambda: Fn(lambda x: x + torch.arange(8, dtype=torch.float32)), _x(4, 8), [aten.arange.start_step,
                                                                                           aten.arange.default]),
    # MoE routing: top-k experts per token, their one-hot mask, gathered and scattered rows (DTensor's rules
    # for topk / gather / scatter_add / argmax / cumsum / sort, autopar's for one_hot / index_add)
    "topk": (lambda: Fn(lambda x: torch.topk(x, 2, dim=-1).values * 2), _x(4, 4, 8), [aten.topk.default]),
    "gather_argmax": (lambda: Fn(lambda x: x.gather(-1, x.argmax(-1, keepdim=True)) * x), _x(4, 4, 8),
                      [aten.gather.default, aten.argmax.default]),
    "scatter_add": (lambda: Fn(lambda x: torch.zeros_like(x).scatter_add(-1, x.argsort(-1), x) * x), _x(4, 4, 8),
                    [aten.scatter_add.default]),
    "sort_cumsum": (lambda: Fn(lambda x: torch.sort(x, dim=-1).values.cumsum(1)), _x(4, 4, 8),
                    [aten.sort.default, aten.cumsum.default]),
    "one_hot": (lambda: Fn(lambda x: F.one_hot(x.argmax(-1), 8).to(x.dtype) * x), _x(4, 4, 8),
                [aten.one_hot.default]),
    "index_add": (lambda: Fn(lambda x, w: w.index_add(0, torch.arange(4) % 2, x), (2, 4, 8)), _x(4, 4, 8),
                  [aten.index_add.default]),
}


def case_strategy_counts(name: str, mesh_shape: tuple[int, ...]) -> int:
    model_fn, inputs_fn, ops = CASES[name]
    torch.manual_seed(0)
    cap = capture(model_fn(), inputs_fn(), fold_layers=False)
    gi = index_graph(cap)
    return sum(len(strategies_for(g, gi.nodes, mesh_shape)[0]) for g in gi.nodes.values()
               if g.kind == "op" and g.target in ops)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    return t.requires_grad_(t.is_floating_point())


def force_every_strategy(rank: int, world: int, name: str, mesh_shape: tuple[int, ...]) -> dict:
    model_fn, inputs_fn, ops = CASES[name]
    torch.manual_seed(0)
    model, inputs = model_fn(), inputs_fn()
    mesh = init_device_mesh("cpu", mesh_shape)
    cap = capture(model, inputs, fold_layers=False)
    gi = index_graph(cap)
    spec, profile = MeshSpec.make(mesh_shape), PRESETS["cpu-gloo"]
    # single-device reference: output and gradients for a fixed upstream gradient
    ref_in = [_leaf(x) for x in inputs]
    ref_out = model(*ref_in)
    upstream = torch.randn_like(ref_out)
    ref_params = {fqns[0]: model.get_parameter(fqns[0]) for fqns in cap.param_fqns.values()}
    for p in ref_params.values():
        p.grad = None
    (ref_out * upstream).sum().backward()
    targets = [g for g in gi.nodes.values() if g.kind == "op" and g.target in ops]
    base = plan_graph(cap, spec, profile)
    rep = tuple("R" for _ in mesh_shape)
    replicated = {key: NodeSharding(inputs=tuple(rep for _ in ns.inputs),
                                    outputs=tuple(rep if o is not None else None for o in ns.outputs))
                  for key, ns in base.node_shardings.items()}
    checked, worst, failures = 0, -1.0, []
    for g in targets:
        for strat in strategies_for(g, gi.nodes, spec.shape)[0]:
            forced = NodeSharding(inputs=tuple(tuple(format_sharding(s)) for s in strat.inputs),
                                  outputs=tuple(tuple(format_sharding(s)) if s is not None else None
                                                for s in strat.outputs))
            plan = dataclasses.replace(base, node_shardings={**replicated, g.key: forced},
                                       param_placements={k: rep for k in base.param_placements})
            gm, ctx = build_parallel_graph(cap, plan, defer_param_grads=False)
            gm.mesh = mesh
            flat, local_leaves = [], []
            for n in gm.graph.nodes:
                if n.op != "placeholder":
                    continue
                if n.name in cap.param_fqns:
                    full = ref_params[cap.param_fqns[n.name][0]]
                else:
                    full = ref_in[[i.name for i in cap.user_inputs].index(n.name)]
                loc = _leaf(local_chunk(full.detach(), ctx.output_sharding(n.name), mesh))
                flat.append(loc)
                local_leaves.append((loc, full, ctx.output_sharding(n.name)))
            out = gm(*flat)[0]
            (out * upstream).sum().backward()
            errs = [_excess(out, ref_out)]
            for loc, full, sh in local_leaves:
                if loc.requires_grad:
                    errs.append(_excess(loc.grad, local_chunk(full.grad, sh, mesh)))
            e = max(errs)
            worst = max(worst, e)
            checked += 1
            if e > 0:
                failures.append(f"{g.key}: {strat.label()} (excess {e:.2e})")
    return {"checked": checked, "worst": worst, "failures": failures}


def _excess(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(((a - b).abs() - (1e-5 + 1e-4 * b.abs())).max())
